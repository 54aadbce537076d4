//! The retry budget: retries may add at most a fraction of the requests seen over
//! a sliding window (Envoy's and Linkerd's budgets), plus a small floor so that a
//! lone failure at low traffic is still retried. A revision that fails everything
//! therefore cannot multiply the load on the others.

use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds the window spans.
const WINDOW: u64 = 10;
/// Retries always allowed per window.
const FLOOR: u64 = 10;
/// Retries allowed per 100 requests in the window.
const PERCENT: u64 = 20;

/// Counts per second over the last [`WINDOW`] seconds, lock-free: slot
/// `second % WINDOW` holds that second's count and which second it is.
#[derive(Debug, Default)]
struct Window {
    slots: [(AtomicU64, AtomicU64); WINDOW as usize],
}

impl Window {
    fn add(&self, second: u64) {
        let (epoch, count) = &self.slots[usize::try_from(second % WINDOW).unwrap_or(0)];
        let seen = epoch.load(Ordering::Relaxed);
        if seen != second
            && epoch
                .compare_exchange(seen, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // A count racing this reset may be lost: the budget is an estimate.
            count.store(1, Ordering::Relaxed);
        } else {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn sum(&self, second: u64) -> u64 {
        self.slots
            .iter()
            .filter(|(epoch, _)| {
                let e = epoch.load(Ordering::Relaxed);
                e <= second && second - e < WINDOW
            })
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }
}

/// Requests and retries of one ingress.
#[derive(Debug, Default)]
pub(crate) struct RetryBudget {
    requests: Window,
    retries: Window,
}

impl RetryBudget {
    /// Counts a request arriving in `second` (since the proxy started; second 0
    /// is never a valid epoch so that fresh slots read as empty).
    pub(crate) fn request(&self, second: u64) {
        self.requests.add(second + 1);
    }

    /// Takes a retry from the budget; `false` when it is spent.
    pub(crate) fn try_retry(&self, second: u64) -> bool {
        let s = second + 1;
        let allowed = FLOOR + self.requests.sum(s) * PERCENT / 100;
        if self.retries.sum(s) >= allowed {
            return false;
        }
        self.retries.add(s);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_a_fifth_of_the_window_plus_a_floor() {
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.request(3);
        }
        let granted = (0..1000).filter(|_| b.try_retry(3)).count();
        assert_eq!(granted, 210, "10 + 20% of 1000");
        // Eleven seconds on, the window has moved past all of it: only the floor.
        let granted = (0..1000).filter(|_| b.try_retry(14)).count();
        assert_eq!(granted, 10);
    }

    #[test]
    fn the_window_slides_second_by_second() {
        let b = RetryBudget::default();
        for s in 0..20u64 {
            for _ in 0..100 {
                b.request(s);
            }
        }
        // Seconds 10..=19 are in the window: 1000 requests.
        assert_eq!(b.requests.sum(20), 1000);
        assert_eq!(b.requests.sum(25), 500);
    }
}
