//! `quantix-jailer [OPTIONS] -- PROGRAM [ARGS...]`: see the library's documentation and
//! docs/security.md.
//!
//! Exit status: the program's (128 + N when signal N killed it); with `--detach`, 0 once it
//! runs (its pid on stdout); 125 when the jail cannot be set up; 2 on a usage error.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use quantix_jailer::{JailSpec, Outcome};

/// Runs a program (quantix-vmm) as an unprivileged uid without capabilities, in new mount,
/// PID, IPC, UTS and network namespaces, pivot_root'ed into an empty directory, inside its
/// cgroups; files reach it only as passed descriptors.
#[derive(Debug, Parser)]
#[command(name = "quantix-jailer", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    spec: JailSpec,
    /// The program's argv (argv[0] first), after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    command: Vec<OsString>,
}

const EXIT_JAIL: u8 = 125;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match quantix_jailer::run(&cli.spec, &cli.command) {
        Ok(Outcome::Detached(pid)) => {
            println!("{pid}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Exited(code)) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("quantix-jailer: {e}");
            ExitCode::from(EXIT_JAIL)
        }
    }
}
