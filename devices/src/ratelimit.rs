//! Log lines a guest can trigger, rate-limited per kind.
//!
//! A guest that repeats a mistake (a bad descriptor, a feature it was not offered, a
//! register it may not write) in a loop could otherwise write tens of MB/s of log. Each
//! kind of such line has a [`LogLimit`]: the first line is logged, then at most
//! [`LINES_PER_MINUTE`] a minute, each saying how many were left out since the last; every
//! event is counted, and [`counts`] reports them all (the VMM's metrics).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Lines of one kind logged per minute at most (after the first).
pub const LINES_PER_MINUTE: u64 = 5;

/// The limit of one kind of guest-triggered log line.
#[derive(Debug)]
pub struct LogLimit {
    kind: &'static str,
    /// Events seen.
    events: AtomicU64,
    /// Events not logged.
    suppressed: AtomicU64,
    /// Events not logged since the last logged line.
    pending: AtomicU64,
    /// The current minute (since [`epoch`]) and the lines logged in it, packed.
    window: AtomicU64,
    registered: AtomicBool,
}

fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

static ALL: Mutex<Vec<&'static LogLimit>> = Mutex::new(Vec::new());

impl LogLimit {
    /// A limit for lines of `kind` (a short stable name: it becomes a metric label).
    pub const fn new(kind: &'static str) -> Self {
        Self {
            kind,
            events: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            window: AtomicU64::new(u64::MAX),
            registered: AtomicBool::new(false),
        }
    }

    /// Counts an event; `Some(n)` when its line may be logged now, `n` being the events
    /// left out since the last logged line.
    pub fn admit(&'static self) -> Option<u64> {
        self.admit_at(epoch().elapsed().as_secs() / 60)
    }

    fn admit_at(&'static self, minute: u64) -> Option<u64> {
        if !self.registered.swap(true, Ordering::Relaxed) {
            ALL.lock().unwrap_or_else(|p| p.into_inner()).push(self);
        }
        let first = self.events.fetch_add(1, Ordering::Relaxed) == 0;
        let ok = first
            || self
                .window
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    let (m, n) = (w >> 8, w & 0xff);
                    if w == u64::MAX || m != minute {
                        Some(minute << 8 | 1)
                    } else if n < LINES_PER_MINUTE {
                        Some(w + 1)
                    } else {
                        None
                    }
                })
                .is_ok();
        if ok {
            if first {
                self.window.store(minute << 8, Ordering::Relaxed);
            }
            Some(self.pending.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            self.pending.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Its kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }
}

/// (kind, events, suppressed) of every limit that has seen an event, sorted by kind.
pub fn counts() -> Vec<(&'static str, u64, u64)> {
    let all = ALL.lock().unwrap_or_else(|p| p.into_inner());
    let mut v: Vec<_> = all
        .iter()
        .map(|l| {
            (
                l.kind,
                l.events.load(Ordering::Relaxed),
                l.suppressed.load(Ordering::Relaxed),
            )
        })
        .collect();
    v.sort();
    v
}

/// `tracing::warn!` for a line a guest can trigger: logged when `$limit` admits it, with
/// `suppressed` (the lines left out since the last one) and `kind` fields.
#[macro_export]
macro_rules! guest_warn {
    ($limit:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new($limit);
        if let Some(suppressed) = LIMIT.admit() {
            tracing::warn!(guest_triggered = $limit, suppressed, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_then_a_few_a_minute_and_every_event_counted() {
        static L: LogLimit = LogLimit::new("test-kind");
        let mut logged = Vec::new();
        for i in 0..1000 {
            if let Some(s) = L.admit_at(7) {
                logged.push((i, s));
            }
        }
        // The first, then LINES_PER_MINUTE more in that minute.
        assert_eq!(logged.len() as u64, 1 + LINES_PER_MINUTE, "{logged:?}");
        assert_eq!(logged[0], (0, 0));
        // A new minute: a line again, reporting what was left out meanwhile.
        let s = L.admit_at(8).unwrap();
        assert_eq!(s, 1000 - 1 - LINES_PER_MINUTE);
        let c = counts().into_iter().find(|c| c.0 == "test-kind").unwrap();
        assert_eq!(c, ("test-kind", 1001, 1000 - 1 - LINES_PER_MINUTE));
    }
}
