//! A token bucket for the per-partner bandwidth limit. Time is an input, so it is tested
//! without clocks; the site wraps it with a real one.

use std::time::Duration;

/// Limits bytes per second, allowing bursts up to `burst_bytes`. Sending never fails: a send
/// larger than the tokens available borrows them, and the caller waits the returned time, so a
/// batch is never split and the average rate holds.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate_bytes_per_second: u64,
    burst_bytes: u64,
    /// Tokens now; negative while a send's debt is being paid off.
    tokens: i128,
    last: Duration,
    /// Bytes taken so far (for status and tests).
    taken_bytes_total: u64,
}

impl TokenBucket {
    /// A full bucket allowing `rate_bytes_per_second` on average, `burst_bytes` at once.
    pub fn new(rate_bytes_per_second: u64, burst_bytes: u64, now: Duration) -> TokenBucket {
        assert!(rate_bytes_per_second > 0, "a bandwidth limit must be above zero");
        TokenBucket {
            rate_bytes_per_second,
            burst_bytes,
            tokens: i128::from(burst_bytes),
            last: now,
            taken_bytes_total: 0,
        }
    }

    /// Take `bytes` at `now`; returns how long to wait before sending them.
    pub fn take(&mut self, now: Duration, bytes: u64) -> Duration {
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let refill = elapsed.as_nanos() * u128::from(self.rate_bytes_per_second) / 1_000_000_000;
        self.tokens =
            (self.tokens + i128::try_from(refill).unwrap_or(i128::MAX)).min(i128::from(self.burst_bytes));
        self.tokens -= i128::from(bytes);
        self.taken_bytes_total = self.taken_bytes_total.saturating_add(bytes);
        if self.tokens >= 0 {
            return Duration::ZERO;
        }
        let debt = u128::try_from(-self.tokens).unwrap_or(u128::MAX);
        let nanos = debt * 1_000_000_000 / u128::from(self.rate_bytes_per_second);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Bytes taken so far.
    pub fn taken_bytes_total(&self) -> u64 {
        self.taken_bytes_total
    }
}

#[cfg(test)]
mod tests {
    use super::TokenBucket;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_passes_then_sends_wait_for_their_share() {
        let mut b = TokenBucket::new(1000, 1000, Duration::ZERO);
        assert_eq!(b.take(Duration::ZERO, 600), Duration::ZERO);
        assert_eq!(b.take(Duration::ZERO, 400), Duration::ZERO);
        // Empty: 500 more bytes at 1000 B/s cost half a second.
        assert_eq!(b.take(Duration::ZERO, 500), 500 * MS);
        // After waiting it out, the bucket is at zero again.
        assert_eq!(b.take(500 * MS, 0), Duration::ZERO);
        // The refill never exceeds the burst.
        assert_eq!(b.take(Duration::from_secs(100), 1000), Duration::ZERO);
        assert_eq!(b.take(Duration::from_secs(100), 1), MS);
    }

    #[test]
    fn a_sender_that_obeys_the_waits_averages_the_rate() {
        let mut b = TokenBucket::new(1_000_000, 64 << 10, Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        for i in 0..1000u64 {
            let size = 1000 + (i * 7919) % 200_000;
            now += b.take(now, size);
            sent += size;
        }
        let rate = sent as f64 / now.as_secs_f64();
        assert!((rate - 1_000_000.0).abs() < 1_000_000.0 * 0.07, "average {rate} B/s");
        assert_eq!(b.taken_bytes_total(), sent);
    }
}
