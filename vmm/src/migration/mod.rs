//! Live migration between two quantix-vmm processes (docs/migration.md): the stream's
//! framing ([`protocol`]), the sending side ([`source`]) with its auto-converge
//! ([`throttle`]), and the receiving side ([`destination`]).

pub mod destination;
pub mod postcopy;
pub mod protocol;
pub mod source;
pub mod throttle;
