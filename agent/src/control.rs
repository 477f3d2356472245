//! A client of one VMM's control socket: the typed requests and replies of
//! `quantix_vmm_api::control` (JSON lines; see docs/vmm.md).

use std::path::Path;
use std::time::Duration;

use quantix_vmm_api::control::{parse_reply, Op, ReplyError, Request, MAX_REPLY_BYTES};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Why a control call failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The socket could not be reached (no VMM, or not yet listening).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-call.
    #[error("{op}: {source}")]
    Io {
        /// The op asked.
        op: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM closed the connection without a reply.
    #[error("{op}: the VMM closed the connection without a reply")]
    NoReply {
        /// The op asked.
        op: &'static str,
    },
    /// The VMM refused the request, or its reply was malformed.
    #[error(transparent)]
    Reply(#[from] ReplyError),
    /// No reply in time.
    #[error("no reply to {op} within {limit:?}")]
    Timeout {
        /// The op asked.
        op: &'static str,
        /// The limit.
        limit: Duration,
    },
}

/// Sends `O`'s request and returns its typed reply, within `limit`.
pub async fn call<O: Op>(socket: &Path, limit: Duration) -> Result<O::Reply, ControlError> {
    call_request::<O::Reply>(socket, &O::REQUEST, limit).await
}

/// Sends `request` (an op with parameters) and reads its reply as `R`, the type its op
/// documents, within `limit`.
pub async fn call_request<R: DeserializeOwned>(
    socket: &Path,
    request: &Request,
    limit: Duration,
) -> Result<R, ControlError> {
    let op = request.op();
    let fut = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ControlError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let (r, mut w) = stream.into_split();
        w.write_all(request.to_line().as_bytes())
            .await
            .map_err(|source| ControlError::Io { op, source })?;
        // A reply longer than the protocol's cap is cut there and then refused as malformed.
        let mut line = String::new();
        let cap = u64::try_from(MAX_REPLY_BYTES + 1).unwrap_or(u64::MAX);
        let n = BufReader::new(r.take(cap))
            .read_line(&mut line)
            .await
            .map_err(|source| ControlError::Io { op, source })?;
        if n == 0 {
            return Err(ControlError::NoReply { op });
        }
        Ok(parse_reply::<R>(request, line.trim_end())?)
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| ControlError::Timeout { op, limit })?
}
