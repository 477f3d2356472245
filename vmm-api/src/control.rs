//! The control socket's protocol: the requests a client sends, the replies the VMM gives,
//! and the protocol version that tells a client what it may ask.
//!
//! One JSON object per line each way. A reply always has `ok`; a refused request's reply
//! has `error` (for people) and `code` (an [`ErrorCode`], for programs). See docs/vmm.md
//! for the compatibility rules: requests are strict (an unknown op or field is refused),
//! replies are lenient (a client ignores fields it does not know), and the version only
//! grows.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::metrics::MetricsSample;

/// The protocol version this crate speaks. It grows by one whenever an op, a request
/// field or a reply field is added; nothing is ever removed or changes meaning.
///
/// - 1: `version`, `state`, `metrics`, `shutdown`, `pause`, `resume`, `power-button`.
/// - 2: `metrics` endpoints carry `client` (how the newest socket client's stream begins:
///   each socket client is first sent the endpoint's 64 KiB output history).
/// - 3: `snapshot` (a full or diff snapshot into a new directory; [`SnapshotReply`]).
/// - 4: `migrate`, `migration` and `migrate-cancel` (live migration to another
///   quantix-vmm; [`MigrationStatus`]).
pub const PROTOCOL_VERSION: u32 = 4;

/// Longest request line the VMM reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest reply line a client should accept (a metrics sample of a VM with every
/// device is a few KiB).
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The protocol version and the ops this VMM serves ([`VersionReply`]).
    Version {},
    /// The VM's state ([`StateReply`]).
    State {},
    /// Stop the VM in order: vCPUs stop, the process exits with status 0 ([`StateChange`]).
    Shutdown {},
    /// The VM's counters ([`MetricsSample`]).
    Metrics {},
    /// Press the guest's ACPI power button: ask the guest to shut itself down
    /// ([`PowerButtonReply`]).
    PowerButton {},
    /// Stop the vCPUs and devices; the process and its control socket stay up
    /// ([`StateChange`]).
    Pause {},
    /// Run a paused VM again ([`StateChange`]).
    Resume {},
    /// Save the VM's whole state and memory into `dir`, a directory the VMM creates (it
    /// must not exist; its parent must), then do `after` ([`SnapshotReply`]). Disks are
    /// not copied: the caller keeps its images consistent with the snapshot.
    Snapshot {
        /// The snapshot directory, as the VMM sees paths (inside its jail, if any).
        dir: String,
        /// What the VM does once the snapshot is written.
        #[serde(default)]
        after: AfterSnapshot,
        /// Save only the pages written since this VMM's previous snapshot (which the new
        /// one names as its parent); refused with `conflict` when there is none.
        #[serde(default)]
        diff: bool,
    },
    /// Start a live migration to the quantix-vmm listening on `to` (its `--incoming`
    /// socket); the reply comes at once ([`MigrationStatus`], phase `connecting`), the
    /// migration goes on in the background (`migration` reports it). When it completes the
    /// VMM exits with status 0 and the exit reason `migrated`.
    Migrate {
        /// The destination's Unix socket, as this VMM sees paths.
        to: String,
        /// What the migration may do.
        #[serde(default)]
        policy: MigrationPolicy,
    },
    /// The current or last migration's progress ([`MigrationStatus`]).
    Migration {},
    /// Cancel the migration under way: the VM runs on here, the destination exits
    /// ([`MigrationStatus`]); refused with `conflict` once the switch has begun.
    MigrateCancel {},
}

/// Limits of a live migration's pre-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationPolicy {
    /// Pause for the last round once its expected time (dirty bytes ÷ measured bandwidth)
    /// is at most this, ms.
    pub downtime_ms: u64,
    /// Most pre-copy rounds after the first full pass.
    pub max_rounds: u32,
    /// Most time for the pre-copy, ms.
    pub max_precopy_ms: u64,
    /// When a limit is reached before the expected downtime is within the target: switch
    /// anyway (a longer downtime) or cancel.
    pub on_limit: OnLimit,
    /// Send at most this many bytes per second (0: as fast as the link carries).
    pub bandwidth_bytes_per_s: u64,
    /// Throttle the vCPUs of a guest that dirties memory faster than the link carries it
    /// (auto-converge).
    pub auto_converge: bool,
    /// Both VMMs on one host: hand the guest memory's memfd to the destination
    /// (`SCM_RIGHTS`) instead of copying it; the guest is paused only for the state.
    pub share_memory: bool,
    /// When a limit is reached before the pre-copy converges, switch at once and let the
    /// destination fetch the pages it lacks on demand (userfaultfd) while the rest streams
    /// in (instead of `on_limit`). A failure after that switch cannot fall back.
    pub post_copy: bool,
}

impl MigrationPolicy {
    /// The defaults (`migrate` without a `policy`).
    pub const DEFAULT: MigrationPolicy = MigrationPolicy {
        downtime_ms: 50,
        max_rounds: 30,
        max_precopy_ms: 600_000,
        on_limit: OnLimit::Switch,
        bandwidth_bytes_per_s: 0,
        auto_converge: true,
        share_memory: false,
        post_copy: false,
    };
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// What a migration does when a pre-copy limit is reached first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnLimit {
    /// Pause and send the rest: the downtime is longer than the target.
    #[default]
    Switch,
    /// Give up: the VM runs on here.
    Cancel,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// No migration was asked for.
    None,
    /// Connecting; the destination builds the VM.
    Connecting,
    /// Sending memory while the guest runs.
    PreCopy,
    /// The guest is paused: the last pages and the state go.
    Switching,
    /// The guest runs at the destination, which fetches the pages it lacks from here.
    PostCopy,
    /// The destination runs the VM; this VMM exits.
    Completed,
    /// Failed or cancelled before the switch: the VM runs on here.
    Failed,
    /// The connection broke after the destination was told to run: whether it does is
    /// unknown here, so the VM stays paused here for its supervisor to decide.
    Unknown,
}

/// The reply to `migrate`, `migration` and `migrate-cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Where it is.
    pub phase: MigrationPhase,
    /// Pre-copy rounds done (0: the first full pass is under way).
    pub round: u32,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Bytes sent so far (page data; zero pages are sent as ranges only).
    pub sent_bytes: u64,
    /// Dirty bytes still to send, as of the last round.
    pub remaining_bytes: u64,
    /// Bandwidth of the last round, bytes/s.
    pub bandwidth_bytes_per_s: u64,
    /// Bytes the guest dirtied per second during the last round.
    pub dirty_bytes_per_s: u64,
    /// Share of each time slice the vCPUs are held, percent (auto-converge).
    pub throttle_percent: u32,
    /// Remaining bytes ÷ bandwidth, ms.
    pub expected_downtime_ms: u64,
    /// From the pause here to the destination's report that the guest runs, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Since the `migrate` request, ms.
    pub total_ms: u64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MigrationStatus {
    /// The status before any migration.
    pub fn none() -> Self {
        MigrationStatus {
            phase: MigrationPhase::None,
            round: 0,
            memory_bytes: 0,
            sent_bytes: 0,
            remaining_bytes: 0,
            bandwidth_bytes_per_s: 0,
            dirty_bytes_per_s: 0,
            throttle_percent: 0,
            expected_downtime_ms: 0,
            downtime_ms: None,
            total_ms: 0,
            error: None,
        }
    }
}

/// The state file's name in a snapshot directory (the VMM writes it, its supervisor
/// checks it is there).
pub const SNAPSHOT_STATE_FILE: &str = "vmstate";
/// The memory image's name in a snapshot directory.
pub const SNAPSHOT_MEMORY_FILE: &str = "memory";

/// What a VM does once its snapshot is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AfterSnapshot {
    /// Go back to what it was doing: a running VM runs on, a paused one stays paused (the
    /// default).
    #[default]
    Keep,
    /// Run, even if it was paused before.
    Resume,
    /// Stay paused.
    Pause,
    /// Stop, as a `shutdown` does.
    Stop,
}

/// The reply to `snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// The state the VM is in now.
    pub state: RunState,
    /// vCPUs saved.
    pub vcpus: u8,
    /// The memory image's size, bytes (its holes included).
    pub memory_bytes: u64,
    /// Bytes of non-zero pages written to it.
    pub data_bytes: u64,
    /// How long the guest was paused for the snapshot, ms.
    pub paused_ms: u64,
    /// How long the snapshot took, ms.
    pub total_ms: u64,
    /// For a diff: the name of the snapshot directory it applies on, which must sit
    /// beside it when it is restored (absent for a full snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

impl Request {
    /// Every op, in the order of the protocol's history.
    pub const ALL: [Request; 11] = [
        Request::Version {},
        Request::State {},
        Request::Metrics {},
        Request::Shutdown {},
        Request::Pause {},
        Request::Resume {},
        Request::PowerButton {},
        Request::Snapshot {
            dir: String::new(),
            after: AfterSnapshot::Keep,
            diff: false,
        },
        Request::Migrate {
            to: String::new(),
            policy: MigrationPolicy::DEFAULT,
        },
        Request::Migration {},
        Request::MigrateCancel {},
    ];

    /// The op's name on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Version {} => "version",
            Request::State {} => "state",
            Request::Shutdown {} => "shutdown",
            Request::Metrics {} => "metrics",
            Request::PowerButton {} => "power-button",
            Request::Pause {} => "pause",
            Request::Resume {} => "resume",
            Request::Snapshot { .. } => "snapshot",
            Request::Migrate { .. } => "migrate",
            Request::Migration {} => "migration",
            Request::MigrateCancel {} => "migrate-cancel",
        }
    }

    /// The request as one line, newline included.
    pub fn to_line(&self) -> String {
        // A unit-like variant of a tagged enum always serializes.
        let mut line =
            serde_json::to_string(self).unwrap_or_else(|_| format!("{{\"op\":\"{}\"}}", self.op()));
        line.push('\n');
        line
    }
}

/// What a VM is doing, as the VMM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Every vCPU is parked and every device stopped; `resume` runs it again.
    Paused,
    /// A stop is under way; the process is about to exit.
    Stopping,
}

impl RunState {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopping => "stopping",
        }
    }
}

/// The reply to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionReply {
    /// The protocol version the VMM speaks ([`PROTOCOL_VERSION`] of its build).
    pub protocol: u32,
    /// The VMM's release.
    pub vmm_version: String,
    /// Every op it serves.
    pub ops: Vec<String>,
}

/// The reply to `state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReply {
    /// What the VM is doing.
    pub state: RunState,
    /// Why it stops, once it does (an exit record's reason: `poweroff`, `api-shutdown`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// Milliseconds since the VMM started serving.
    pub uptime_ms: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// What it booted: `elf-pvh`, `elf`, `bzimage` or `firmware`.
    pub boot: String,
    /// The VMM's process id.
    pub pid: u32,
    /// The VMM's release.
    pub version: String,
    /// The protocol version (0 from a VMM older than the `version` op).
    #[serde(default)]
    pub protocol: u32,
}

/// The reply to `shutdown`, `pause` and `resume`: the state the VM is in now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The new state.
    pub state: RunState,
}

/// The reply to `power-button`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerButtonReply {
    /// Whether the guest has enabled the interrupt that carries the press (a guest
    /// without ACPI, or not booted that far, has not: the press goes unheard).
    pub guest_enabled: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Not a request of this protocol: bad JSON, an unknown op or field.
    InvalidRequest,
    /// The request line is longer than [`MAX_REQUEST_BYTES`].
    TooLong,
    /// This VM has no such device or capability (no power button, cannot pause).
    Unsupported,
    /// Not in the VM's current state (it is stopping).
    Conflict,
    /// The operation was tried and failed (a vCPU did not stop in time...).
    Failed,
    /// The VMM could not form its reply.
    Internal,
    /// A code this client does not know (from a newer VMM).
    #[serde(other)]
    Unknown,
}

/// A refused request's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs ([`ErrorCode::Unknown`] from a VMM older than the codes).
    #[serde(default = "unknown_code")]
    pub code: ErrorCode,
}

fn unknown_code() -> ErrorCode {
    ErrorCode::Unknown
}

impl ErrorReply {
    /// A reply refusing with `code`.
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            code,
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a, T: Serialize> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

/// A successful reply as one line (no newline).
pub fn ok_line<T: Serialize>(body: &T) -> String {
    serde_json::to_string(&Envelope { ok: true, body }).unwrap_or_else(|e| {
        error_line(&ErrorReply::new(
            ErrorCode::Internal,
            format!("internal: cannot encode the reply: {e}"),
        ))
    })
}

/// A refusal as one line (no newline).
pub fn error_line(reply: &ErrorReply) -> String {
    serde_json::to_string(&Envelope {
        ok: false,
        body: reply,
    })
    // Two strings and a unit enum: cannot fail; the fallback keeps the line well formed.
    .unwrap_or_else(|_| r#"{"ok":false,"error":"internal","code":"internal"}"#.to_string())
}

/// A reply line that a client could not use.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReplyError {
    /// The VMM refused the request.
    #[error("the VMM refused {op}: {} ({:?})", .reply.error, .reply.code)]
    Refused {
        /// The op asked.
        op: &'static str,
        /// Its reply.
        reply: ErrorReply,
    },
    /// The line is not a reply of this protocol.
    #[error("malformed reply to {op}: {detail}")]
    Malformed {
        /// The op asked.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

#[derive(Deserialize)]
struct Head {
    ok: bool,
}

/// Reads one reply line to `request` as `T` (the reply type its op documents).
pub fn parse_reply<T: DeserializeOwned>(request: &Request, line: &str) -> Result<T, ReplyError> {
    let op = request.op();
    let malformed = |e: serde_json::Error| ReplyError::Malformed {
        op,
        detail: e.to_string(),
    };
    if line.len() > MAX_REPLY_BYTES {
        return Err(ReplyError::Malformed {
            op,
            detail: format!("longer than {MAX_REPLY_BYTES} bytes"),
        });
    }
    let head: Head = serde_json::from_str(line).map_err(malformed)?;
    if head.ok {
        serde_json::from_str(line).map_err(malformed)
    } else {
        Err(ReplyError::Refused {
            op,
            reply: serde_json::from_str(line).map_err(malformed)?,
        })
    }
}

/// The reply type of each op, for typed clients.
pub trait Op {
    /// The request.
    const REQUEST: Request;
    /// What a successful reply holds.
    type Reply: DeserializeOwned;
}

macro_rules! op {
    ($name:ident, $variant:ident, $reply:ty) => {
        #[doc = concat!("The `", stringify!($variant), "` op and its reply type.")]
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl Op for $name {
            const REQUEST: Request = Request::$variant {};
            type Reply = $reply;
        }
    };
}

op!(GetVersion, Version, VersionReply);
op!(GetState, State, StateReply);
op!(GetMetrics, Metrics, MetricsSample);
op!(Shutdown, Shutdown, StateChange);
op!(Pause, Pause, StateChange);
op!(Resume, Resume, StateChange);
op!(PressPowerButton, PowerButton, PowerButtonReply);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_round_trips_and_has_its_wire_name() {
        for r in Request::ALL {
            let line = r.to_line();
            assert!(line.ends_with('\n'));
            assert!(line.contains(&format!("\"op\":\"{}\"", r.op())), "{line}");
            let back: Request = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(back, r);
        }
    }

    #[test]
    fn requests_are_strict() {
        for bad in [
            r#"{"op":"launch-missiles"}"#,
            r#"{"op":"state","x":1}"#,
            r#"{}"#,
            r#"[]"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replies_are_lenient_and_errors_typed() {
        let req = Request::State {};
        // A newer VMM's extra field is ignored; an older VMM's missing protocol reads 0.
        let s: StateReply = parse_reply(
            &req,
            r#"{"ok":true,"state":"paused","uptime_ms":5,"vcpus":1,"memory_mib":64,"boot":"elf","pid":9,"version":"0.1.0","new_field":[1]}"#,
        )
        .unwrap();
        assert_eq!((s.state, s.protocol), (RunState::Paused, 0));
        let e = parse_reply::<StateReply>(
            &Request::Pause {},
            &error_line(&ErrorReply::new(ErrorCode::Conflict, "the VM is stopping")),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the VMM refused pause: the VM is stopping (Conflict)"
        );
        // An older VMM's refusal without a code, and a newer VMM's unknown code.
        for line in [
            r#"{"ok":false,"error":"x"}"#,
            r#"{"ok":false,"error":"x","code":"quota-exceeded"}"#,
        ] {
            match parse_reply::<StateChange>(&req, line) {
                Err(ReplyError::Refused { reply, .. }) => {
                    assert_eq!(reply.code, ErrorCode::Unknown)
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in ["", "{", r#"{"state":"running"}"#, r#"{"ok":true}"#] {
            assert!(
                matches!(
                    parse_reply::<StateChange>(&req, bad),
                    Err(ReplyError::Malformed { .. })
                ),
                "{bad}"
            );
        }
        let huge = format!(
            r#"{{"ok":true,"state":"running","pad":"{}"}}"#,
            "x".repeat(MAX_REPLY_BYTES)
        );
        assert!(matches!(
            parse_reply::<StateChange>(&req, &huge),
            Err(ReplyError::Malformed { .. })
        ));
    }

    #[test]
    fn an_ok_line_carries_the_body_flat() {
        let line = ok_line(&StateChange {
            state: RunState::Stopping,
        });
        assert_eq!(line, r#"{"ok":true,"state":"stopping"}"#);
        let v: StateChange = parse_reply(&Request::Shutdown {}, &line).unwrap();
        assert_eq!(v.state, RunState::Stopping);
    }
}
