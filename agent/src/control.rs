//! A client of one VMM's control socket (JSON lines; see docs/vmm.md).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Sends one request line and returns the parsed reply, within `limit`.
pub async fn call(socket: &Path, op: &str, limit: Duration) -> Result<serde_json::Value, String> {
    let fut = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let (r, mut w) = stream.into_split();
        w.write_all(format!("{{\"op\":\"{op}\"}}\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        BufReader::new(r)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bad reply {line:?}: {e}"))?;
        if v["ok"] != serde_json::Value::Bool(true) {
            return Err(format!("VMM refused {op}: {}", v["error"]));
        }
        Ok(v)
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("no reply to {op} within {limit:?}"))?
}
