//! The gRPC services: request decoding, error mapping, audit log lines and API metrics around
//! the manager's operations.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quantix_proto::v1::node_service_server::NodeService;
use quantix_proto::v1::vm_service_server::VmService;
use quantix_proto::v1::{
    console_input, ConsoleDevice, ConsoleInput, ConsoleOutput, CreateVmRequest,
    DeleteSnapshotRequest, DeleteSnapshotResponse, DeleteVmRequest, DeleteVmResponse, EventKind,
    GetNodeRequest, GetSnapshotRequest, GetVmRequest, ListSnapshotsRequest, ListSnapshotsResponse,
    ListVmsRequest, ListVmsResponse, Node, PauseVmRequest, RebootVmRequest, RestoreVmRequest,
    ResumeVmRequest, Snapshot, SnapshotVmRequest, StartVmRequest, StopVmRequest, Vm, VmEvent,
    VmState, WatchVmsRequest,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::access::{caller_of, Caller, Door, Policy, Role};
use crate::error::AgentError;
use crate::manager::Manager;
use crate::metrics::ApiMetrics;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The services' shared state.
/// The largest console output message: well under the 4 MiB that gRPC clients accept by
/// default.
pub const REPLAY_CHUNK_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct Api {
    manager: Arc<Manager>,
    metrics: Arc<ApiMetrics>,
    node: Arc<Node>,
    policy: Arc<Policy>,
    door: Door,
}

impl Api {
    /// Services over `manager`, for callers on the Unix socket; [`Api::door`] makes the
    /// services of another listener.
    pub fn new(manager: Arc<Manager>, metrics: Arc<ApiMetrics>, policy: Policy) -> Self {
        let node = crate::node::describe(
            &manager.cgroups,
            manager.vmm_binary(),
            manager.allocatable(),
        );
        Self {
            manager,
            metrics,
            node: Arc::new(node),
            policy: Arc::new(policy),
            door: Door::Unix,
        }
    }

    /// The same services for callers that come through `door`.
    pub fn door(&self, door: Door) -> Self {
        Self {
            door,
            ..self.clone()
        }
    }

    /// Identifies the caller and checks it holds `role`; a refusal is counted and audited.
    #[allow(clippy::result_large_err)]
    fn admit<T>(
        &self,
        req: &Request<T>,
        method: &str,
        role: Role,
        started: Instant,
    ) -> Result<Caller, Status> {
        let caller = caller_of(&self.policy, self.door, req);
        match caller.require(role) {
            Ok(()) => Ok(caller),
            Err(why) => {
                let e = AgentError::PermissionDenied(why);
                self.record(method, "", &caller, true, started, e.code(), &e.to_string());
                Err(e.into())
            }
        }
    }

    /// Counts a call and, for a mutating one, writes its audit line.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        method: &str,
        vm_id: &str,
        caller: &Caller,
        mutating: bool,
        started: Instant,
        code: tonic::Code,
        error: &str,
    ) {
        let elapsed = started.elapsed();
        self.metrics.observe(method, code, elapsed);
        if mutating {
            info!(
                target: "audit",
                method,
                vm = vm_id,
                caller = %caller.who,
                role = caller.role.map(|r| r.to_string()).unwrap_or_else(|| "none".into()),
                code = ?code,
                elapsed_ms = elapsed.as_secs_f64() * 1e3,
                error,
                "audit"
            );
        }
    }

    /// Counts the call, writes the audit line for mutating calls, maps the error.
    fn finish<T>(
        &self,
        method: &str,
        vm_id: &str,
        caller: &Caller,
        mutating: bool,
        started: Instant,
        result: Result<T, AgentError>,
    ) -> Result<Response<T>, Status> {
        let (code, error) = match &result {
            Ok(_) => (tonic::Code::Ok, String::new()),
            Err(e) => (e.code(), e.to_string()),
        };
        self.record(method, vm_id, caller, mutating, started, code, &error);
        result.map(Response::new).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl VmService for Api {
    async fn create_vm(&self, req: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "CreateVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self.manager.create(&r.vm_id, r.spec, r.start).await;
        self.finish("CreateVm", &r.vm_id, &c, true, t, res)
    }

    async fn start_vm(&self, req: Request<StartVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "StartVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self.manager.start(&r.vm_id).await;
        self.finish("StartVm", &r.vm_id, &c, true, t, res)
    }

    async fn stop_vm(&self, req: Request<StopVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "StopVm", Role::Admin, t)?;
        let r = req.into_inner();
        let timeout = if r.timeout_ms == 0 {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(r.timeout_ms.into())
        };
        let res = self.manager.stop(&r.vm_id, timeout, r.force).await;
        self.finish("StopVm", &r.vm_id, &c, true, t, res)
    }

    async fn reboot_vm(&self, req: Request<RebootVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "RebootVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self.manager.reboot(&r.vm_id).await;
        self.finish("RebootVm", &r.vm_id, &c, true, t, res)
    }

    async fn pause_vm(&self, req: Request<PauseVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "PauseVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self.manager.pause(&r.vm_id, true).await;
        self.finish("PauseVm", &r.vm_id, &c, true, t, res)
    }

    async fn resume_vm(&self, req: Request<ResumeVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "ResumeVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self.manager.pause(&r.vm_id, false).await;
        self.finish("ResumeVm", &r.vm_id, &c, true, t, res)
    }

    async fn delete_vm(
        &self,
        req: Request<DeleteVmRequest>,
    ) -> Result<Response<DeleteVmResponse>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "DeleteVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self
            .manager
            .delete(&r.vm_id, r.force)
            .await
            .map(|_| DeleteVmResponse {});
        self.finish("DeleteVm", &r.vm_id, &c, true, t, res)
    }

    async fn get_vm(&self, req: Request<GetVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "GetVm", Role::Viewer, t)?;
        let r = req.into_inner();
        let res = self.manager.get(&r.vm_id);
        self.finish("GetVm", &r.vm_id, &c, false, t, res)
    }

    async fn list_vms(
        &self,
        req: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "ListVms", Role::Viewer, t)?;
        let r = req.into_inner();
        let res = self
            .manager
            .list(&r.label_selector, r.page_size, &r.page_token)
            .map(|(vms, next_page_token)| ListVmsResponse {
                vms,
                next_page_token,
            });
        self.finish("ListVms", "", &c, false, t, res)
    }

    type WatchVmsStream = BoxStream<VmEvent>;

    async fn watch_vms(
        &self,
        req: Request<WatchVmsRequest>,
    ) -> Result<Response<Self::WatchVmsStream>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "WatchVms", Role::Viewer, t)?;
        let r = req.into_inner();
        // Subscribe before reading the initial states, so nothing falls in between.
        let mut rx = self.manager.events.subscribe();
        let initial = if r.initial_state {
            let vms = if r.vm_id.is_empty() {
                self.manager.all()
            } else {
                self.manager.get(&r.vm_id).map(|v| vec![v])
            };
            match vms {
                Ok(v) => v,
                Err(e) => return self.finish("WatchVms", &r.vm_id, &c, false, t, Err(e)),
            }
        } else {
            if !r.vm_id.is_empty() {
                if let Err(e) = self.manager.get(&r.vm_id) {
                    return self.finish("WatchVms", &r.vm_id, &c, false, t, Err(e));
                }
            }
            Vec::new()
        };
        let filter = r.vm_id.clone();
        let stream = async_stream(move |tx| async move {
            for vm in initial {
                let state = vm.status.as_ref().map(|s| s.state).unwrap_or(0);
                let ev = VmEvent {
                    sequence: 0,
                    vm_id: vm.id.clone(),
                    kind: EventKind::State as i32,
                    state,
                    exit: vm.status.and_then(|s| s.last_exit),
                    message: "current state".into(),
                    at_unix_ms: crate::now_ms(),
                    snapshot_id: String::new(),
                    progress: None,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if !filter.is_empty() && ev.vm_id != filter {
                            continue;
                        }
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "this watcher fell behind and lost {n} events; watch again with initial_state"
                            ))))
                            .await;
                        return;
                    }
                    Err(_) => return,
                }
            }
        });
        self.finish("WatchVms", &r.vm_id, &c, false, t, Ok(stream))
    }

    type AttachConsoleStream = BoxStream<ConsoleOutput>;

    async fn attach_console(
        &self,
        req: Request<Streaming<ConsoleInput>>,
    ) -> Result<Response<Self::AttachConsoleStream>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "AttachConsole", Role::Viewer, t)?;
        let mut input = req.into_inner();
        let first = match input.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(e),
            None => {
                return self.finish(
                    "AttachConsole",
                    "",
                    &c,
                    false,
                    t,
                    Err(AgentError::invalid(
                        "attach",
                        "the stream ended before an attach message",
                    )),
                )
            }
        };
        let Some(console_input::Input::Attach(attach)) = first.input else {
            return self.finish(
                "AttachConsole",
                "",
                &c,
                false,
                t,
                Err(AgentError::invalid(
                    "attach",
                    "the first message must be an attach message",
                )),
            );
        };
        let console = match ConsoleDevice::try_from(attach.device)
            .map_err(|_| {
                AgentError::invalid(
                    "attach.device",
                    format!("{} is no ConsoleDevice value", attach.device),
                )
            })
            .and_then(|device| self.manager.console(&attach.vm_id, device))
        {
            Ok(con) => con,
            Err(e) => return self.finish("AttachConsole", &attach.vm_id, &c, false, t, Err(e)),
        };
        let vm = self.manager.get(&attach.vm_id).ok();
        let state = vm
            .and_then(|v| v.status)
            .map(|s| s.state)
            .unwrap_or_default();
        if !crate::manager::is_active(VmState::try_from(state).unwrap_or_default())
            && !attach.replay
        {
            return self.finish(
                "AttachConsole",
                &attach.vm_id,
                &c,
                false,
                t,
                Err(AgentError::FailedPrecondition(format!(
                    "VM {:?} is not running; attach with replay to read its last output",
                    attach.vm_id
                ))),
            );
        }
        let mut view = console.attach(attach.replay);
        let writer = console.clone();
        let takes_input = self.manager.console_takes_input();
        let may_type = c.require(Role::Admin);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ConsoleOutput, Status>>(64);
        let refuse = tx.clone();
        tokio::spawn(async move {
            let mut refused = false;
            while let Some(Ok(msg)) = input.next().await {
                if let Some(console_input::Input::Data(d)) = msg.input {
                    if let Err(why) = &may_type {
                        // A viewer reads; typing ends its session with the reason. The input
                        // stream is still drained: dropping it would reset the call before
                        // the refusal reaches the client.
                        if !refused {
                            refused = true;
                            let _ = refuse
                                .send(Err(Status::permission_denied(format!(
                                    "console input: {why}"
                                ))))
                                .await;
                        }
                        continue;
                    }
                    if takes_input && !writer.write(d).await {
                        break;
                    }
                }
            }
        });
        let vm_id = attach.vm_id.clone();
        tokio::spawn(async move {
            // The ring may hold up to 16 MiB; gRPC clients refuse messages over 4 MiB by
            // default: the replay goes in chunks.
            let replay = std::mem::take(&mut view.replay);
            for chunk in replay.chunks(REPLAY_CHUNK_BYTES) {
                if tx
                    .send(Ok(ConsoleOutput {
                        data: chunk.to_vec(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            drop(replay);
            forward_live(view.live, tx, &vm_id).await;
        });
        let stream: BoxStream<ConsoleOutput> =
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        // Attaching is audited: a console is a door into the guest.
        self.finish("AttachConsole", &attach.vm_id, &c, true, t, Ok(stream))
    }

    async fn snapshot_vm(
        &self,
        req: Request<SnapshotVmRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "SnapshotVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self
            .manager
            .snapshot(&r.vm_id, &r.snapshot_id, r.diff, r.after)
            .await;
        self.finish("SnapshotVm", &r.vm_id, &c, true, t, res)
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "ListSnapshots", Role::Viewer, t)?;
        let r = req.into_inner();
        let res = self
            .manager
            .list_snapshots(&r.vm_id)
            .map(|snapshots| ListSnapshotsResponse { snapshots });
        self.finish("ListSnapshots", &r.vm_id, &c, false, t, res)
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<Snapshot>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "GetSnapshot", Role::Viewer, t)?;
        let r = req.into_inner();
        let res = self.manager.get_snapshot(&r.snapshot_id);
        self.finish("GetSnapshot", &r.snapshot_id, &c, false, t, res)
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "DeleteSnapshot", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self
            .manager
            .delete_snapshot(&r.snapshot_id)
            .map(|()| DeleteSnapshotResponse {});
        self.finish("DeleteSnapshot", &r.snapshot_id, &c, true, t, res)
    }

    async fn restore_vm(&self, req: Request<RestoreVmRequest>) -> Result<Response<Vm>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "RestoreVm", Role::Admin, t)?;
        let r = req.into_inner();
        let res = self
            .manager
            .restore(&r.snapshot_id, &r.vm_id, r.spec, r.start, r.lazy)
            .await;
        self.finish("RestoreVm", &r.vm_id, &c, true, t, res)
    }
}

#[tonic::async_trait]
impl NodeService for Api {
    async fn get_node(&self, req: Request<GetNodeRequest>) -> Result<Response<Node>, Status> {
        let t = Instant::now();
        let c = self.admit(&req, "GetNode", Role::Viewer, t)?;
        let res = self.manager.committed().map(|(committed, total, running)| {
            let mut node = (*self.node).clone();
            node.committed = Some(committed);
            node.vms_total = total;
            node.vms_running = running;
            node
        });
        self.finish("GetNode", "", &c, false, t, res)
    }
}

/// A stream fed by a task through a channel.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Forwards a console's live output to one client until either ends. A client that
/// read too slowly, so that the hub dropped output for it, is told so in its stream
/// ([`lag_notice`]) rather than losing the output silently.
async fn forward_live(
    mut live: tokio::sync::broadcast::Receiver<Arc<[u8]>>,
    tx: tokio::sync::mpsc::Sender<Result<ConsoleOutput, Status>>,
    vm_id: &str,
) {
    loop {
        let data = tokio::select! {
            got = live.recv() => match got {
                Ok(data) => data.to_vec(),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(vm = %vm_id, chunks = n, "console client fell behind; output dropped for it");
                    lag_notice(n).into_bytes()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            // The client went away (or a refusal was sent and the stream ended).
            _ = tx.closed() => return,
        };
        if tx.send(Ok(ConsoleOutput { data })).await.is_err() {
            return;
        }
    }
}

/// What a console client that read too slowly sees in its stream where output was
/// dropped for it (`chunks` of the hub's output; the ring still holds the newest).
fn lag_notice(chunks: u64) -> String {
    format!(
        "\r\n[quantix-agent: this console client fell behind; {chunks} chunk(s) of output were dropped for it]\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_that_fell_behind_is_told_how_much_it_lost() {
        let (out, live) = tokio::sync::broadcast::channel::<Arc<[u8]>>(4);
        for i in 0..10u8 {
            out.send(Arc::from(vec![b'0' + i])).unwrap();
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let forward = tokio::spawn(async move { forward_live(live, tx, "vm").await });
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(rx.recv().await.unwrap().unwrap().data);
        }
        // The 6 oldest chunks were dropped for this client; the 4 newest follow the notice.
        assert_eq!(String::from_utf8(got[0].clone()).unwrap(), lag_notice(6));
        assert!(lag_notice(6).contains("6 chunk(s) of output were dropped"));
        assert_eq!(
            got[1..],
            [b"6".to_vec(), b"7".to_vec(), b"8".to_vec(), b"9".to_vec()]
        );
        // The console ends: so does the stream.
        drop(out);
        forward.await.unwrap();
        assert!(rx.recv().await.is_none());
    }
}
