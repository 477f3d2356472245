//! The standard gRPC services on a real agent: health (what Kubernetes gRPC probes and
//! `grpc_health_probe` ask) and server reflection (what `grpcurl` uses), through real
//! gRPC clients on the agent's Unix socket.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_each_service() {
    let dir = scratch("health");
    let agent = Agent::start(&dir.join("state"), "health");
    let mut h = HealthClient::new(channel(&agent.socket()).await);
    for service in [
        "",
        "quantixkvm.agent.v1.VmService",
        "quantixkvm.agent.v1.NodeService",
    ] {
        let r = h.check(check(service)).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    // A name the agent does not serve is NOT_FOUND, as the health protocol says.
    let e = h
        .check(check("quantixkvm.agent.v1.Nope"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Watch sends the current status at once.
    let mut w = h.watch(check("")).await.unwrap().into_inner();
    let first = w.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
}

#[tokio::test]
async fn reflection_lists_and_describes_the_agent_api() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = scratch("reflection");
    let agent = Agent::start(&dir.join("state"), "reflection");
    let mut r = ServerReflectionClient::new(channel(&agent.socket()).await);
    let ask = |m: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "quantixkvm.agent.v1.VmService".into(),
        )),
        ask(MessageRequest::FileContainingSymbol(
            "quantixkvm.agent.v1.NoSuchThing".into(),
        )),
    ];
    let mut replies = r
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "quantixkvm.agent.v1.VmService",
        "quantixkvm.agent.v1.NodeService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor for VmService")
    };
    let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
        files.file_descriptor_proto[0].as_slice(),
    )
    .unwrap();
    assert_eq!(file.name(), "quantixkvm/agent/v1/agent.proto");
    let vm = file
        .service
        .iter()
        .find(|s| s.name() == "VmService")
        .expect("VmService in its file");
    assert!(vm.method.iter().any(|m| m.name() == "CreateVm"));

    // tonic's reflection ends the stream with NOT_FOUND for a symbol it does not know.
    let e = replies.next().await.unwrap().unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
}

#[tokio::test]
async fn reflection_answers_the_v1alpha_clients_too() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let dir = scratch("reflection-alpha");
    let agent = Agent::start(&dir.join("state"), "reflection-alpha");
    let mut r = ServerReflectionClient::new(channel(&agent.socket()).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = r
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        replies.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    assert!(list
        .service
        .iter()
        .any(|s| s.name == "quantixkvm.agent.v1.VmService"));
}
