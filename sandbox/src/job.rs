//! Jobs run by the nested host, and their results.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::error::SandboxError;

/// Default wall-clock limit of a job.
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// A command the nested host runs, in order with the others.
///
/// The command runs with [`crate::paths::SCRATCH_DIR`] as working directory, stdin from
/// `/dev/null`, stdout and stderr merged and streamed to the console (each
/// line prefixed with `[<name>] `), `PATH` including `/payload`. It gets
/// `timeout` of wall-clock time (nested host clock, whole seconds, rounded
/// up): then SIGTERM, and SIGKILL 5 s later. The job ends when its main
/// process exits; processes it left behind are killed.
///
/// A job is *under test* unless marked [`Job::reference`]: once a job under test has
/// begun, a nested host that dies or hangs is a product failure
/// ([`SandboxError::HostDied`]), never retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Name, unique in a run: `[A-Za-z0-9._-]`, at most 64 characters.
    pub name: String,
    /// Program and arguments (the program is looked up in `PATH`).
    pub argv: Vec<String>,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// What the job runs: the product (default) or only reference and setup software.
    pub role: JobRole,
}

/// Whether a job runs the product under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobRole {
    /// Runs this project's code (a `quantix-vmm`, the agent, a test that drives them).
    #[default]
    UnderTest,
    /// Runs only reference software (QEMU as the guest's VMM) or setup commands: a
    /// nested host that dies here, with no job under test before it, is infrastructure.
    Reference,
}

impl Job {
    /// A job running `argv` with [`DEFAULT_JOB_TIMEOUT`].
    pub fn new<I, S>(name: impl Into<String>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Job {
            name: name.into(),
            argv: argv.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_JOB_TIMEOUT,
            role: JobRole::UnderTest,
        }
    }

    /// Marks the job as running only reference software or setup commands (see
    /// [`JobRole::Reference`]).
    pub fn reference(mut self) -> Self {
        self.role = JobRole::Reference;
        self
    }

    /// Whether the job runs the product under test.
    pub fn under_test(&self) -> bool {
        self.role == JobRole::UnderTest
    }

    /// A job running `sh -c script` (busybox sh).
    pub fn shell(name: impl Into<String>, script: impl Into<String>) -> Self {
        Job::new(name, ["sh".to_string(), "-c".to_string(), script.into()])
    }

    /// Sets the wall-clock limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The limit in whole seconds, as the nested host applies it (at least 1).
    pub fn timeout_secs(&self) -> u64 {
        let secs = self.timeout.as_secs() + u64::from(self.timeout.subsec_nanos() > 0);
        secs.max(1)
    }

    /// Checks one job.
    pub(crate) fn validate(&self) -> Result<(), SandboxError> {
        let bad = |reason: &str| SandboxError::InvalidJob {
            name: self.name.clone(),
            reason: reason.to_string(),
        };
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(bad("name must have 1 to 64 characters"));
        }
        if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(bad("name may only contain A-Z a-z 0-9 . _ -"));
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(bad("argv is empty"));
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err(bad("NUL byte in argv"));
        }
        Ok(())
    }
}

/// Checks a job list: each job valid, names unique.
pub(crate) fn validate_all(jobs: &[Job]) -> Result<(), SandboxError> {
    let mut names = BTreeSet::new();
    for job in jobs {
        job.validate()?;
        if !names.insert(job.name.as_str()) {
            return Err(SandboxError::InvalidJob {
                name: job.name.clone(),
                reason: "duplicate name".to_string(),
            });
        }
    }
    Ok(())
}

/// What one job did (a product result, whatever it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JobResult {
    /// The job's name.
    pub name: String,
    /// Exit status as the nested host's shell saw it (128+N after signal N);
    /// `None` if the shell could not tell.
    pub status: Option<i32>,
    /// True if the job ran into its time-out (judged by elapsed time: the
    /// status after a time-out may be the program's own, e.g. QEMU exits 0 on
    /// SIGTERM).
    pub timed_out: bool,
    /// The job's stdout and stderr lines (prefix removed), `\n`-separated.
    pub output: String,
    /// Wall-clock time on the nested host's clock (10 ms resolution).
    pub elapsed: Duration,
    /// The limit that applied.
    pub timeout: Duration,
}

impl JobResult {
    /// Exited with status 0 within its time.
    pub fn success(&self) -> bool {
        self.status == Some(0) && !self.timed_out
    }

    /// The output lines.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.output.lines()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_rounds_up_to_whole_seconds() {
        let job = Job::new("a", ["true"]);
        assert_eq!(job.timeout_secs(), 120);
        assert_eq!(
            job.clone()
                .timeout(Duration::from_millis(1500))
                .timeout_secs(),
            2
        );
        assert_eq!(job.clone().timeout(Duration::ZERO).timeout_secs(), 1);
        assert_eq!(job.timeout(Duration::from_secs(7)).timeout_secs(), 7);
    }

    #[test]
    fn validation() {
        assert!(validate_all(&[Job::new("ok-1.x_y", ["true"])]).is_ok());
        assert!(Job::new("", ["true"]).validate().is_err());
        assert!(Job::new("a b", ["true"]).validate().is_err());
        assert!(Job::new("a]", ["true"]).validate().is_err());
        assert!(Job::new("a", Vec::<String>::new()).validate().is_err());
        assert!(validate_all(&[Job::new("a", ["true"]), Job::new("a", ["false"])]).is_err());
    }
}
