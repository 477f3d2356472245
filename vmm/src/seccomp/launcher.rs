//! The launcher: the one thread that starts device threads, so that vCPU threads (where
//! devices are activated) need not be allowed to create threads. Each new thread installs
//! the device filter before the device code runs.

use std::io;
use std::sync::mpsc::{self, Sender};
use std::sync::Mutex;

use quantix_virtio::threads::Spawner;
use tracing::warn;

use super::Kind;

type Request = (String, Box<dyn FnOnce() + Send>, Sender<io::Result<()>>);

struct Launcher {
    tx: Mutex<Sender<Request>>,
}

impl Spawner for Launcher {
    fn spawn(&self, name: String, body: Box<dyn FnOnce() + Send>) -> io::Result<()> {
        let (reply, answer) = mpsc::channel();
        let tx = self
            .tx
            .lock()
            .map_err(|_| io::Error::other("the launcher's channel is poisoned"))?
            .clone();
        tx.send((name, body, reply))
            .map_err(|_| io::Error::other("the launcher thread is gone"))?;
        answer
            .recv()
            .map_err(|_| io::Error::other("the launcher thread is gone"))?
    }
}

/// Starts the launcher thread and makes it the spawner of device threads. Call once, before
/// any device is activated.
pub fn start() -> io::Result<()> {
    let (tx, rx) = mpsc::channel::<Request>();
    let (ready_tx, ready) = mpsc::channel::<io::Result<()>>();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            let installed = super::install(Kind::Launcher).map_err(io::Error::other);
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if !ok {
                return;
            }
            for (name, body, reply) in rx {
                let (started_tx, started) = mpsc::channel::<io::Result<()>>();
                let spawned = std::thread::Builder::new()
                    .name(name.clone())
                    .spawn(move || match super::install(Kind::Device) {
                        Ok(()) => {
                            let _ = started_tx.send(Ok(()));
                            body();
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(io::Error::other(e)));
                        }
                    });
                let result = match spawned {
                    Ok(_) => started
                        .recv()
                        .unwrap_or_else(|_| Err(io::Error::other("the new thread died"))),
                    Err(e) => Err(e),
                };
                if let Err(e) = &result {
                    warn!(thread = %name, error = %e, "cannot start a device thread");
                }
                let _ = reply.send(result);
            }
        })?;
    ready
        .recv()
        .map_err(|_| io::Error::other("the launcher thread died"))??;
    if !quantix_virtio::threads::set_spawner(Box::new(Launcher { tx: Mutex::new(tx) })) {
        return Err(io::Error::other("a spawner was already installed"));
    }
    Ok(())
}
