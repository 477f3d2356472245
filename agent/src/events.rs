//! The agent's event bus: every state change and event, numbered, to every watcher.

use std::sync::atomic::{AtomicU64, Ordering};

use quantix_proto::v1::{EventKind, ExitInfo, SnapshotProgress, VmEvent, VmState};
use tokio::sync::broadcast;
use tracing::info;

/// Events buffered per slow watcher before it is told it lost some.
const CAPACITY: usize = 4096;

/// The bus.
pub struct Events {
    seq: AtomicU64,
    tx: broadcast::Sender<VmEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl Events {
    /// An empty bus.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Self {
            seq: AtomicU64::new(0),
            tx,
        }
    }

    /// Emits an event (and logs it).
    pub fn emit(
        &self,
        vm_id: &str,
        kind: EventKind,
        state: VmState,
        exit: Option<ExitInfo>,
        message: impl Into<String>,
    ) {
        self.emit_with(vm_id, kind, state, exit, String::new(), message)
    }

    /// Emits an event about a snapshot (and logs it).
    pub fn emit_snapshot(
        &self,
        vm_id: &str,
        kind: EventKind,
        state: VmState,
        snapshot_id: &str,
        message: impl Into<String>,
    ) {
        self.emit_with(vm_id, kind, state, None, snapshot_id.to_string(), message)
    }

    fn emit_with(
        &self,
        vm_id: &str,
        kind: EventKind,
        state: VmState,
        exit: Option<ExitInfo>,
        snapshot_id: String,
        message: impl Into<String>,
    ) {
        let event = VmEvent {
            exit,
            ..self.next(vm_id, kind, state, snapshot_id, message.into())
        };
        info!(
            vm = vm_id,
            event = kind.as_str_name(),
            state = state.as_str_name(),
            reason = event.exit.as_ref().map(|e| e.reason.as_str()).unwrap_or(""),
            snapshot = event.snapshot_id.as_str(),
            sequence = event.sequence,
            "{}",
            event.message
        );
        let _ = self.tx.send(event);
    }

    /// Emits how far a snapshot's writing is (not logged: one a second; the VMM logs its
    /// own progress).
    pub fn emit_progress(
        &self,
        vm_id: &str,
        state: VmState,
        snapshot_id: &str,
        progress: SnapshotProgress,
    ) {
        let message = format!(
            "snapshot {snapshot_id:?}: {} of at most {} MiB written after {:.1} s",
            progress.written_bytes >> 20,
            progress.memory_bytes >> 20,
            progress.elapsed_ms as f64 / 1000.0
        );
        let event = VmEvent {
            progress: Some(progress),
            ..self.next(
                vm_id,
                EventKind::SnapshotProgress,
                state,
                snapshot_id.to_string(),
                message,
            )
        };
        let _ = self.tx.send(event);
    }

    /// The next event in sequence, stamped now, without an exit or progress.
    fn next(
        &self,
        vm_id: &str,
        kind: EventKind,
        state: VmState,
        snapshot_id: String,
        message: String,
    ) -> VmEvent {
        VmEvent {
            sequence: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            vm_id: vm_id.to_string(),
            kind: kind as i32,
            state: state as i32,
            exit: None,
            message,
            at_unix_ms: crate::now_ms(),
            snapshot_id,
            progress: None,
        }
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.tx.subscribe()
    }
}
