//! Backoff between write attempts: exponential with full jitter, and a server's `Retry-After`
//! taking precedence when it asks for longer.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait before retry number `retry` (1 for the first retry).
    ///
    /// Full jitter (a uniform draw below the exponential ceiling) keeps many gateways that failed
    /// together from retrying together.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self
            .initial
            .saturating_mul(
                1u32.checked_shl(retry.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        let jittered = ceiling.mul_f64(rand::thread_rng().gen_range(0.0..=1.0));
        match retry_after {
            Some(asked) => asked.max(jittered),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_under_the_cap() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..200 {
            assert!(b.delay(1, None) <= Duration::from_millis(100));
            assert!(b.delay(3, None) <= Duration::from_millis(400));
            assert!(b.delay(40, None) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn retry_after_is_honoured() {
        let b = Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
        };
        assert!(b.delay(1, Some(Duration::from_secs(2))) >= Duration::from_secs(2));
    }
}
