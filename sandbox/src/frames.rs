//! The console protocol between the nested host's `/init` and the runner.
//!
//! Frames are single console lines; `<nonce>` is random per run, so nothing
//! a job prints (e.g. a nested guest's console) can forge one:
//!
//! ```text
//! QX-HOST-READY <nonce> kvm=ok uptime_ms=<n>
//! QX-HOST-FAIL <nonce> reason=<word> uptime_ms=<n> detail=<text>
//! QX-JOB-BEGIN <nonce> <name> timeout_s=<n> uptime_ms=<n>
//! [<name>] <one line of the job's stdout/stderr>
//! QX-JOB-END <nonce> <name> status=<n|none> elapsed_ms=<n> uptime_ms=<n>
//! QX-HOST-DONE <nonce> uptime_ms=<n>
//! ```
//!
//! A frame is recognised anywhere in a line (a kernel message may have been
//! printed just before it on the same line). Lines between BEGIN and END
//! that carry the job's `[<name>] ` prefix are its output; other lines are
//! kernel messages and stay in the raw console log only.

use std::time::Duration;

use crate::error::InfraFailure;
use crate::job::{Job, JobResult};

/// One parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Modules loaded, `/dev/kvm` present.
    HostReady {
        /// Nested host uptime when ready.
        uptime_ms: u64,
    },
    /// The nested host could not set itself up.
    HostFail {
        /// Short reason (`module-load`, `no-kvm`).
        reason: String,
        /// Free text.
        detail: String,
    },
    /// A job starts.
    JobBegin {
        /// Job name.
        name: String,
    },
    /// A job ended.
    JobEnd {
        /// Job name.
        name: String,
        /// Exit status (`None` for `status=none`).
        status: Option<i32>,
        /// Elapsed time on the nested host's clock.
        elapsed_ms: u64,
    },
    /// All jobs ran; the host powers off.
    HostDone,
}

/// Finds a frame with this `nonce` in `line`.
pub fn parse_frame(line: &str, nonce: &str) -> Option<Frame> {
    line.match_indices("QX-")
        .find_map(|(at, _)| parse_at(&line[at..], nonce))
}

fn parse_at(s: &str, nonce: &str) -> Option<Frame> {
    let mut tokens = s.split_whitespace();
    let kind = tokens.next()?;
    if tokens.next()? != nonce {
        return None;
    }
    let rest: Vec<&str> = tokens.collect();
    let field = |key: &str| {
        rest.iter()
            .find_map(|t| t.strip_prefix(key).and_then(|t| t.strip_prefix('=')))
    };
    let number = |key: &str| field(key).and_then(|v| v.parse::<u64>().ok());
    match kind {
        "QX-HOST-READY" => Some(Frame::HostReady {
            uptime_ms: number("uptime_ms")?,
        }),
        "QX-HOST-FAIL" => {
            let detail = s
                .split_once(" detail=")
                .map(|(_, d)| d.trim().to_string())
                .unwrap_or_default();
            Some(Frame::HostFail {
                reason: field("reason")?.to_string(),
                detail,
            })
        }
        "QX-JOB-BEGIN" => Some(Frame::JobBegin {
            name: rest.first()?.to_string(),
        }),
        "QX-JOB-END" => {
            let status = match field("status")? {
                "none" => None,
                v => Some(v.parse::<i32>().ok()?),
            };
            Some(Frame::JobEnd {
                name: rest.first()?.to_string(),
                status,
                elapsed_ms: number("elapsed_ms")?,
            })
        }
        "QX-HOST-DONE" => Some(Frame::HostDone),
        _ => None,
    }
}

/// Where the nested host is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// QEMU started, no readiness frame yet.
    Booting,
    /// Ready, between jobs (`next` is the index of the next job).
    Idle {
        /// Index of the next job.
        next: usize,
    },
    /// Running job `index`.
    InJob {
        /// Index of the running job.
        index: usize,
    },
    /// All jobs reported and `QX-HOST-DONE` seen (or all jobs ended).
    Done,
}

/// What a console line meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Not ours (kernel message, boot noise).
    Console,
    /// The host is ready.
    Ready {
        /// Nested host uptime.
        uptime_ms: u64,
    },
    /// Job `index` started.
    JobStarted {
        /// Job index.
        index: usize,
    },
    /// A line of the running job's output.
    JobOutput {
        /// Job index.
        index: usize,
    },
    /// Job `index` ended.
    JobEnded {
        /// Job index.
        index: usize,
    },
    /// `QX-HOST-DONE`.
    Done,
}

/// Follows the frames of one run and collects job results.
#[derive(Debug)]
pub struct Tracker {
    nonce: String,
    jobs: Vec<(String, Duration)>,
    phase: Phase,
    results: Vec<JobResult>,
    output: String,
}

impl Tracker {
    /// A tracker for `jobs`, expecting frames with `nonce`.
    pub fn new(nonce: &str, jobs: &[Job]) -> Self {
        Tracker {
            nonce: nonce.to_string(),
            jobs: jobs
                .iter()
                .map(|j| (j.name.clone(), Duration::from_secs(j.timeout_secs())))
                .collect(),
            phase: Phase::Booting,
            results: Vec::new(),
            output: String::new(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Results of the jobs that ended so far.
    pub fn results(&self) -> &[JobResult] {
        &self.results
    }

    /// Takes the results.
    pub fn into_results(self) -> Vec<JobResult> {
        self.results
    }

    /// The running job's name and its output so far.
    pub fn running(&self) -> Option<(&str, &str)> {
        match self.phase {
            Phase::InJob { index } => self
                .jobs
                .get(index)
                .map(|(name, _)| (name.as_str(), self.output.as_str())),
            _ => None,
        }
    }

    /// The name and time limit of job `index`.
    pub fn job(&self, index: usize) -> Option<(&str, Duration)> {
        self.jobs.get(index).map(|(n, t)| (n.as_str(), *t))
    }

    /// Feeds one console line (without its line terminator).
    pub fn feed(&mut self, line: &str) -> Result<Event, InfraFailure> {
        if let Phase::InJob { index } = self.phase {
            if let Some(text) = self.job_output(index, line) {
                self.output.push_str(text);
                self.output.push('\n');
                return Ok(Event::JobOutput { index });
            }
        }
        let Some(frame) = parse_frame(line, &self.nonce) else {
            return Ok(Event::Console);
        };
        let framing = |detail: String| InfraFailure::Framing { detail };
        match (frame, self.phase) {
            (Frame::HostReady { uptime_ms }, Phase::Booting) => {
                self.phase = self.idle_or_done(0);
                Ok(Event::Ready { uptime_ms })
            }
            (Frame::HostFail { reason, detail }, _) => {
                Err(InfraFailure::HostSetup { reason, detail })
            }
            (Frame::JobBegin { name }, Phase::Idle { next }) => {
                let expected = self.jobs.get(next).map(|(n, _)| n.as_str()).unwrap_or("");
                if name != expected {
                    return Err(framing(format!(
                        "job `{name}` began, expected `{expected}`"
                    )));
                }
                self.output.clear();
                self.phase = Phase::InJob { index: next };
                Ok(Event::JobStarted { index: next })
            }
            (
                Frame::JobEnd {
                    name,
                    status,
                    elapsed_ms,
                },
                Phase::InJob { index },
            ) => {
                let (expected, timeout) = self.jobs[index].clone();
                if name != expected {
                    return Err(framing(format!(
                        "job `{name}` ended while `{expected}` was running"
                    )));
                }
                let elapsed = Duration::from_millis(elapsed_ms);
                self.results.push(JobResult {
                    name,
                    status,
                    // Judged by time: after a time-out the status may be the
                    // program's own (busybox `timeout` execs the program).
                    timed_out: elapsed >= timeout,
                    output: std::mem::take(&mut self.output),
                    elapsed,
                    timeout,
                });
                self.phase = self.idle_or_done(index + 1);
                Ok(Event::JobEnded { index })
            }
            (Frame::HostDone, Phase::Done) => Ok(Event::Done),
            (frame, phase) => Err(framing(format!("unexpected {frame:?} in phase {phase:?}"))),
        }
    }

    fn idle_or_done(&self, next: usize) -> Phase {
        if next < self.jobs.len() {
            Phase::Idle { next }
        } else {
            Phase::Done
        }
    }

    /// The text of `line` if it is output of job `index`.
    fn job_output<'l>(&self, index: usize, line: &'l str) -> Option<&'l str> {
        let name = &self.jobs[index].0;
        let rest = line
            .strip_prefix('[')?
            .strip_prefix(name.as_str())?
            .strip_prefix(']')?;
        match rest.strip_prefix(' ') {
            Some(text) => Some(text),
            None if rest.is_empty() => Some(""),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "0123456789abcdef";

    fn jobs() -> Vec<Job> {
        vec![
            Job::shell("kvm", "test -c /dev/kvm").timeout(Duration::from_secs(10)),
            Job::shell("sleepy", "sleep 100").timeout(Duration::from_secs(2)),
        ]
    }

    #[test]
    fn parses_frames() {
        assert_eq!(
            parse_frame(&format!("QX-HOST-READY {N} kvm=ok uptime_ms=5120"), N),
            Some(Frame::HostReady { uptime_ms: 5120 })
        );
        assert_eq!(
            parse_frame(
                &format!("QX-JOB-END {N} a.b status=3 elapsed_ms=12 uptime_ms=9"),
                N
            ),
            Some(Frame::JobEnd {
                name: "a.b".into(),
                status: Some(3),
                elapsed_ms: 12
            })
        );
        assert_eq!(
            parse_frame(
                &format!("QX-JOB-END {N} a status=none elapsed_ms=1 uptime_ms=9"),
                N
            ),
            Some(Frame::JobEnd {
                name: "a".into(),
                status: None,
                elapsed_ms: 1
            })
        );
        assert_eq!(
            parse_frame(
                &format!("QX-HOST-FAIL {N} reason=no-kvm uptime_ms=1 detail=/dev/kvm is missing"),
                N
            ),
            Some(Frame::HostFail {
                reason: "no-kvm".into(),
                detail: "/dev/kvm is missing".into()
            })
        );
    }

    #[test]
    fn frame_after_kernel_noise_on_the_same_line() {
        let line =
            format!("[    3.1] kvm: something QX-JOB-BEGIN {N} kvm timeout_s=10 uptime_ms=1");
        assert_eq!(
            parse_frame(&line, N),
            Some(Frame::JobBegin { name: "kvm".into() })
        );
    }

    #[test]
    fn other_nonce_or_garbage_is_not_a_frame() {
        assert_eq!(
            parse_frame("QX-HOST-READY ffff kvm=ok uptime_ms=1", N),
            None
        );
        assert_eq!(parse_frame(&format!("QX-HOST-READY {N} kvm=ok"), N), None);
        assert_eq!(
            parse_frame(&format!("QX-JOB-END {N} a status=x elapsed_ms=1"), N),
            None
        );
        assert_eq!(parse_frame("QX-GUEST-INIT cpus=2", N), None);
        assert_eq!(parse_frame("", N), None);
    }

    #[test]
    fn tracks_a_whole_run() {
        let mut t = Tracker::new(N, &jobs());
        assert_eq!(t.feed("Linux version 6.1").unwrap(), Event::Console);
        assert_eq!(
            t.feed(&format!("QX-HOST-READY {N} kvm=ok uptime_ms=5000"))
                .unwrap(),
            Event::Ready { uptime_ms: 5000 }
        );
        assert_eq!(
            t.feed(&format!("QX-JOB-BEGIN {N} kvm timeout_s=10 uptime_ms=1"))
                .unwrap(),
            Event::JobStarted { index: 0 }
        );
        assert_eq!(
            t.feed("[kvm] hello").unwrap(),
            Event::JobOutput { index: 0 }
        );
        assert_eq!(t.feed("[kvm]").unwrap(), Event::JobOutput { index: 0 });
        // A kernel message in the middle is not output.
        assert_eq!(
            t.feed("[    7.0] kvm: Unhandled WRMSR").unwrap(),
            Event::Console
        );
        assert_eq!(
            t.feed(&format!(
                "QX-JOB-END {N} kvm status=0 elapsed_ms=40 uptime_ms=2"
            ))
            .unwrap(),
            Event::JobEnded { index: 0 }
        );
        t.feed(&format!("QX-JOB-BEGIN {N} sleepy timeout_s=2 uptime_ms=3"))
            .unwrap();
        t.feed("[sleepy] Terminated").unwrap();
        t.feed(&format!(
            "QX-JOB-END {N} sleepy status=143 elapsed_ms=2010 uptime_ms=4"
        ))
        .unwrap();
        assert_eq!(t.phase(), Phase::Done);
        assert_eq!(
            t.feed(&format!("QX-HOST-DONE {N} uptime_ms=5")).unwrap(),
            Event::Done
        );
        let r = t.into_results();
        assert_eq!(r[0].output, "hello\n\n");
        assert_eq!(r[0].status, Some(0));
        assert!(r[0].success());
        assert!(!r[0].timed_out);
        assert_eq!(r[0].elapsed, Duration::from_millis(40));
        assert!(r[1].timed_out);
        assert_eq!(r[1].status, Some(143));
        assert_eq!(r[1].output, "Terminated\n");
    }

    #[test]
    fn timed_out_even_if_status_is_zero() {
        let mut t = Tracker::new(N, &jobs()[1..]);
        t.feed(&format!("QX-HOST-READY {N} kvm=ok uptime_ms=1"))
            .unwrap();
        t.feed(&format!("QX-JOB-BEGIN {N} sleepy timeout_s=2 uptime_ms=3"))
            .unwrap();
        t.feed(&format!(
            "QX-JOB-END {N} sleepy status=0 elapsed_ms=2000 uptime_ms=4"
        ))
        .unwrap();
        assert!(t.results()[0].timed_out);
        assert!(!t.results()[0].success());
    }

    #[test]
    fn output_cannot_forge_frames() {
        let mut t = Tracker::new(N, &jobs());
        t.feed(&format!("QX-HOST-READY {N} kvm=ok uptime_ms=1"))
            .unwrap();
        t.feed(&format!("QX-JOB-BEGIN {N} kvm timeout_s=10 uptime_ms=1"))
            .unwrap();
        // Output that looks like frames: prefixed, or without the nonce.
        let forged = format!("[kvm] QX-JOB-END {N} kvm status=0 elapsed_ms=1 uptime_ms=1");
        assert_eq!(t.feed(&forged).unwrap(), Event::JobOutput { index: 0 });
        assert_eq!(
            t.feed("QX-JOB-END 1111 kvm status=0 elapsed_ms=1 uptime_ms=1")
                .unwrap(),
            Event::Console
        );
        assert_eq!(t.phase(), Phase::InJob { index: 0 });
    }

    #[test]
    fn protocol_violations_are_framing_failures() {
        let mut t = Tracker::new(N, &jobs());
        let err = t
            .feed(&format!("QX-JOB-BEGIN {N} kvm timeout_s=10 uptime_ms=1"))
            .unwrap_err();
        assert!(matches!(err, InfraFailure::Framing { .. }), "{err}");

        let mut t = Tracker::new(N, &jobs());
        t.feed(&format!("QX-HOST-READY {N} kvm=ok uptime_ms=1"))
            .unwrap();
        let err = t
            .feed(&format!("QX-JOB-BEGIN {N} sleepy timeout_s=2 uptime_ms=1"))
            .unwrap_err();
        assert!(err.to_string().contains("expected `kvm`"), "{err}");
    }

    #[test]
    fn host_fail_is_a_setup_failure() {
        let mut t = Tracker::new(N, &jobs());
        let err = t
            .feed(&format!(
                "QX-HOST-FAIL {N} reason=module-load uptime_ms=1 detail=insmod kvm-amd.ko failed"
            ))
            .unwrap_err();
        assert_eq!(
            err,
            InfraFailure::HostSetup {
                reason: "module-load".into(),
                detail: "insmod kvm-amd.ko failed".into()
            }
        );
        assert!(!err.is_retriable());
    }
}
