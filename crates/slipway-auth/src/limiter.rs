//! Failed-login rate limits, per source address and per user name.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts failures in a sliding window; a key with `max` failures inside the
/// window is refused until the oldest falls out.
#[derive(Debug)]
pub struct Limiter {
    max: usize,
    window: Duration,
    failures: Mutex<HashMap<String, Vec<Instant>>>,
}

/// Keys kept at most, so a flood of addresses cannot grow memory without bound.
const MAX_KEYS: usize = 100_000;

impl Limiter {
    /// `max` failures per `window`.
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max: max.max(1),
            window,
            failures: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Instant>>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err(retry_after)` if any of `keys` is over the limit at `now`.
    pub fn check(&self, keys: &[String], now: Instant) -> Result<(), Duration> {
        let mut map = self.lock();
        let mut wait = None::<Duration>;
        for k in keys {
            if let Some(v) = map.get_mut(k) {
                v.retain(|t| now.duration_since(*t) < self.window);
                if v.len() >= self.max {
                    let free_at = v[v.len() - self.max] + self.window;
                    let w = free_at
                        .saturating_duration_since(now)
                        .max(Duration::from_secs(1));
                    wait = Some(wait.map_or(w, |x| x.max(w)));
                }
            }
        }
        wait.map_or(Ok(()), Err)
    }

    /// Records one failure against each of `keys`.
    pub fn fail(&self, keys: &[String], now: Instant) {
        let mut map = self.lock();
        if map.len() >= MAX_KEYS {
            let window = self.window;
            map.retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < window));
        }
        for k in keys {
            let v = map.entry(k.clone()).or_default();
            v.push(now);
            if v.len() > self.max * 2 {
                v.drain(..v.len() - self.max);
            }
        }
    }

    /// Forgets the failures of `key` (a user who logged in).
    pub fn clear(&self, key: &str) {
        self.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_over_the_limit_is_refused_until_its_window_passes() {
        let l = Limiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let keys = ["ip:10.0.0.1".to_owned(), "user:alice".to_owned()];
        for i in 0..3 {
            assert!(l.check(&keys, t0).is_ok(), "failure {i} is allowed");
            l.fail(&keys, t0);
        }
        let wait = l.check(&keys, t0).expect_err("limited");
        assert!(wait <= Duration::from_secs(60));
        // Another address for the same user is limited too; another user is not.
        assert!(
            l.check(&["ip:10.0.0.2".into(), "user:alice".into()], t0)
                .is_err()
        );
        assert!(
            l.check(&["ip:10.0.0.2".into(), "user:bob".into()], t0)
                .is_ok()
        );
        assert!(l.check(&keys, t0 + Duration::from_secs(61)).is_ok());
        l.clear("user:alice");
        l.clear("ip:10.0.0.1");
        assert!(l.check(&keys, t0).is_ok());
    }
}
