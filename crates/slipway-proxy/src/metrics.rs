//! Per-revision request counters and latency histogram, read by the analysis.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency bucket upper bounds, in milliseconds.
pub const BUCKETS_MS: [u64; 14] = [
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10_000,
    u64::MAX,
];

/// Live counters of one revision.
#[derive(Debug, Default)]
pub struct RevisionStats {
    requests: AtomicU64,
    errors: AtomicU64,
    retries: AtomicU64,
    latency_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS_MS.len()],
}

/// A point-in-time copy of [`RevisionStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Requests answered (or failed).
    pub requests: u64,
    /// 5xx answers and failures, including attempts that failed and were retried
    /// elsewhere (the client never saw them, but the revision failed them).
    pub errors: u64,
    /// Requests sent again to another backend after one of this revision's
    /// backends failed them.
    pub retries: u64,
    /// Sum of latencies, µs.
    pub latency_sum_us: u64,
    /// Count per latency bucket.
    pub buckets: [u64; BUCKETS_MS.len()],
}

impl RevisionStats {
    /// Records one request.
    pub fn record(&self, error: bool, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_us.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let i = BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(BUCKETS_MS.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Records an attempt that failed and was sent again elsewhere: a request and
    /// an error of this revision, and a retry.
    pub fn record_retried(&self, latency: Duration) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.record(true, latency);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> Stats {
        let mut buckets = [0; BUCKETS_MS.len()];
        for (i, b) in self.buckets.iter().enumerate() {
            buckets[i] = b.load(Ordering::Relaxed);
        }
        Stats {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            latency_sum_us: self.latency_us.load(Ordering::Relaxed),
            buckets,
        }
    }
}

impl Stats {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut buckets = [0; BUCKETS_MS.len()];
        for (i, b) in buckets.iter_mut().enumerate() {
            *b = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        Stats {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            retries: self.retries.saturating_sub(earlier.retries),
            latency_sum_us: self.latency_sum_us.saturating_sub(earlier.latency_sum_us),
            buckets,
        }
    }

    /// Error fraction (0 with no requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        #[expect(clippy::cast_precision_loss, reason = "ratios of counters")]
        let r = self.errors as f64 / self.requests as f64;
        r
    }

    /// Upper bound of the bucket holding the 99th percentile, in ms.
    pub fn p99_ms(&self) -> u64 {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = total - total / 100;
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return BUCKETS_MS[i];
            }
        }
        u64::MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rate_and_p99_come_from_the_counters() {
        let s = RevisionStats::default();
        for i in 0..100u64 {
            s.record(
                i % 10 == 0,
                Duration::from_millis(if i == 99 { 400 } else { 3 }),
            );
        }
        let snap = s.snapshot();
        assert!((snap.error_rate() - 0.1).abs() < 1e-9);
        assert_eq!(snap.p99_ms(), 5);
        s.record(false, Duration::from_millis(900));
        s.record(false, Duration::from_millis(900));
        let d = s.snapshot().since(&snap);
        assert_eq!((d.requests, d.errors, d.p99_ms()), (2, 0, 1000));
        s.record_retried(Duration::from_millis(1));
        let d = s.snapshot().since(&snap);
        assert_eq!((d.requests, d.errors, d.retries), (3, 1, 1));
    }
}
