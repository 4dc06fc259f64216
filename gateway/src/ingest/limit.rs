//! Admission control: a token bucket per device (readings a second, with a burst). A message
//! whose readings do not fit is refused whole with reason `rate_limited`.

use std::collections::HashMap;
use std::time::Instant;

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
    last_sweep: Instant,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Takes `readings` tokens from `device`'s bucket; false when there are not enough.
    pub fn admit(&mut self, device: &str, readings: u32) -> bool {
        self.admit_at(device, readings, Instant::now())
    }

    fn admit_at(&mut self, device: &str, readings: u32, now: Instant) -> bool {
        // Full buckets carry no information: forget them now and then so that the map holds
        // only devices that sent something lately.
        if now.duration_since(self.last_sweep).as_secs() >= 60 {
            let (rate, burst) = (self.rate, self.burst);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
            self.last_sweep = now;
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = match self.buckets.get_mut(device) {
            Some(b) => b,
            None => self
                .buckets
                .entry(device.to_owned())
                .or_insert((burst, now)),
        };
        let tokens = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * rate).min(burst);
        bucket.1 = now;
        let need = f64::from(readings);
        if tokens >= need {
            bucket.0 = tokens - need;
            true
        } else {
            bucket.0 = tokens;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refuses_then_refills() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let mut l = RateLimiter::new(1000, 20);
        assert!((0..20).all(|_| l.admit_at("a", 1, at(0))), "the burst");
        assert!(!l.admit_at("a", 1, at(0)), "then refused");
        assert!(
            l.admit_at("b", 20, at(0)),
            "other devices have their own bucket"
        );
        assert!(
            !l.admit_at("c", 21, at(0)),
            "more than the burst never fits"
        );
        assert!(!l.admit_at("a", 5, at(4)), "4 ms refill 4 tokens");
        assert!(l.admit_at("a", 5, at(5)), "refilled at the rate");
        assert!(l.admit_at("a", 20, at(1000)), "never beyond the burst");
        assert!(!l.admit_at("a", 1, at(1000)));
    }
}
