//! Token-bucket rate limits for a device's I/O, as Firecracker's users know them: a bucket
//! of bytes and a bucket of operations, each refilled at its rate up to its burst. A request
//! that finds too few tokens waits (it stays in the guest's ring) until a timer says the
//! bucket holds enough again.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// A device's limits (the configuration's type); 0 means no limit.
pub use quantix_vmm_api::RateLimit;

/// One bucket.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    capacity: u64,
    /// Tokens, in units of 1/1e9 token (so that refills of nanoseconds count).
    nanotokens: u128,
    last: Instant,
}

impl TokenBucket {
    /// `rate` tokens a second, holding at most `burst` (the rate when 0); starts full.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let capacity = if burst == 0 { rate } else { burst }.max(1);
        Self {
            rate,
            capacity,
            nanotokens: u128::from(capacity) * 1_000_000_000,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let max = u128::from(self.capacity) * 1_000_000_000;
        self.nanotokens = (self.nanotokens + elapsed * u128::from(self.rate)).min(max);
    }

    /// What `n` costs: at most the capacity (a request larger than the burst goes when the
    /// bucket is full, rather than never).
    fn cost(&self, n: u64) -> u128 {
        u128::from(n.min(self.capacity)) * 1_000_000_000
    }

    /// Whether `n` tokens are there now (none are taken).
    pub fn has(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.nanotokens >= self.cost(n)
    }

    /// Takes `n` tokens (call after [`TokenBucket::has`]).
    pub fn take(&mut self, n: u64) {
        self.nanotokens = self.nanotokens.saturating_sub(self.cost(n));
    }

    /// How long until `n` tokens are there.
    pub fn wait_for(&self, n: u64) -> Duration {
        let need = self.cost(n).saturating_sub(self.nanotokens);
        if need == 0 || self.rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((need / u128::from(self.rate)).min(u128::from(u64::MAX)) as u64 + 1)
    }
}

/// A device's buckets and the timer that wakes it when they refill.
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    armed: bool,
    /// Requests that had to wait.
    pub throttled: u64,
}

impl RateLimiter {
    /// A limiter for `limit` (which must limit something).
    pub fn new(limit: RateLimit) -> io::Result<Self> {
        let now = Instant::now();
        let bucket = |rate: u64, burst: u64| (rate > 0).then(|| TokenBucket::new(rate, burst, now));
        Ok(Self {
            bytes: bucket(limit.bytes_per_sec, limit.bytes_burst),
            ops: bucket(limit.ops_per_sec, limit.ops_burst),
            timer: TimerFd::new().map_err(io::Error::other)?,
            armed: false,
            throttled: 0,
        })
    }

    /// Takes `bytes` and one operation if both buckets hold them; otherwise takes nothing,
    /// arms the timer for when they will, and returns false.
    pub fn consume(&mut self, bytes: u64) -> bool {
        self.consume_at(bytes, Instant::now())
    }

    fn consume_at(&mut self, bytes: u64, now: Instant) -> bool {
        let ok_bytes = self.bytes.as_mut().is_none_or(|b| b.has(bytes, now));
        let ok_ops = self.ops.as_mut().is_none_or(|b| b.has(1, now));
        if ok_bytes && ok_ops {
            if let Some(b) = &mut self.bytes {
                b.take(bytes);
            }
            if let Some(b) = &mut self.ops {
                b.take(1);
            }
            return true;
        }
        self.throttled += 1;
        let wait = self
            .bytes
            .as_ref()
            .map(|b| b.wait_for(bytes))
            .into_iter()
            .chain(self.ops.as_ref().map(|b| b.wait_for(1)))
            .max()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_micros(100));
        if !self.armed && self.timer.reset(wait, None).is_ok() {
            self.armed = true;
        }
        false
    }

    /// The timer's descriptor: readable when the buckets may hold enough again.
    pub fn fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// Clears the timer's expiry (call when its descriptor is readable).
    pub fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.armed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert!(b.has(500, t0));
        b.take(500);
        assert!(!b.has(1, t0));
        assert_eq!(b.wait_for(100), Duration::from_nanos(100_000_001));
        assert!(b.has(100, t0 + Duration::from_millis(100)));
        // Never more than the burst, however long it waits.
        let mut b = TokenBucket::new(1000, 500, t0);
        b.take(500);
        assert!(b.has(500, t0 + Duration::from_secs(60)));
        b.take(500);
        assert!(!b.has(1, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_request_larger_than_the_burst_goes_when_the_bucket_is_full() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 100, t0);
        assert!(
            b.has(1_000_000, t0),
            "a full bucket lets a huge request through"
        );
        b.take(1_000_000);
        assert!(!b.has(1, t0));
    }

    #[test]
    fn the_limiter_takes_both_or_nothing_and_counts_waits() {
        let mut l = RateLimiter::new(RateLimit {
            bytes_per_sec: 1 << 20,
            bytes_burst: 4096,
            ops_per_sec: 10,
            ops_burst: 2,
        })
        .unwrap();
        let t0 = Instant::now();
        assert!(l.consume_at(4096, t0));
        // Bytes are out; the operation is not taken either.
        assert!(!l.consume_at(4096, t0));
        assert_eq!(l.throttled, 1);
        let later = t0 + Duration::from_millis(10);
        assert!(l.consume_at(4096, later), "10 ms refill 10 KiB");
        // Two ops of burst are spent now.
        assert!(!l.consume_at(1, later));
        assert!(l.armed, "the timer waits for the refill");
        l.on_timer();
    }
}
