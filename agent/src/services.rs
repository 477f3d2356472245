//! The gRPC services the agent serves on each of its listeners: its own API
//! (`quantixkvm.agent.v1`) and the two standard ones that tools expect of a gRPC server,
//! `grpc.health.v1.Health` (Kubernetes gRPC probes, `grpc_health_probe`) and server
//! reflection (`grpcurl list`, `grpcurl describe`), in its `v1` and `v1alpha` versions.
//!
//! Health and reflection answer any caller that can connect (the Unix socket's mode and
//! mutual TLS still decide who can): they tell a service's status and the published
//! schema, nothing about the VMs.

use quantix_proto::v1::node_service_server::NodeServiceServer;
use quantix_proto::v1::vm_service_server::VmServiceServer;
use tonic::service::Routes;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tonic_health::ServingStatus;

use crate::grpc::Api;

/// The names the health service reports on: the server as a whole (`""`) and each service
/// of the agent's API.
pub const HEALTH_NAMES: [&str; 3] = [
    "",
    <VmServiceServer<Api> as tonic::server::NamedService>::NAME,
    <NodeServiceServer<Api> as tonic::server::NamedService>::NAME,
];

/// The agent's health, shared by every listener.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// Every name of [`HEALTH_NAMES`] starts as `NOT_SERVING`, until [`Health::serving`].
    pub async fn new() -> Self {
        let h = Self {
            reporter: HealthReporter::new(),
        };
        h.set(ServingStatus::NotServing).await;
        h
    }

    /// The agent has recovered its VMs and takes calls.
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// The agent is going away (SIGTERM): probes see it before the listeners close.
    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    async fn set(&self, status: ServingStatus) {
        for name in HEALTH_NAMES {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// Why the services could not be built.
#[derive(Debug, thiserror::Error)]
#[error("gRPC server reflection: {0}")]
pub struct ServicesError(#[from] tonic_reflection::server::Error);

/// The routes of one listener: `api` (with that listener's door), health and reflection.
pub fn routes(api: Api, health: &Health) -> Result<Routes, ServicesError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(quantix_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut b = Routes::builder();
    b.add_service(VmServiceServer::new(api.clone()))
        .add_service(NodeServiceServer::new(api))
        .add_service(HealthServer::new(HealthService::from_health_reporter(
            health.reporter.clone(),
        )))
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    Ok(b.routes())
}
