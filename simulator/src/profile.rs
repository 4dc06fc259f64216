//! When each device connects, publishes, drops off and comes back: pure functions of the
//! settings, the seed and the device's number, so that a run can be repeated and tested
//! without a broker. Times are offsets from the start of the run.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::{ProfileName, Settings};

/// Readings this close to the gateway's timestamp limits could land or be refused depending
/// on the time in transit, so clock offsets are never drawn there.
pub const SKEW_GUARD: Duration = Duration::from_secs(5);

/// Independent random streams per device: changing how one is used (say, more bad messages)
/// leaves the others, and so the rest of the run, as they were.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Values = 1,
    Schedule = 2,
    Faults = 3,
    Clock = 4,
}

pub fn rng(seed: u64, device: u32, stream: Stream) -> StdRng {
    // splitmix64's finaliser spreads neighbouring device numbers over the whole seed space.
    let mut x = seed
        ^ u64::from(device).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (stream as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(x ^ (x >> 31))
}

/// Whether device `n` (1-based) of `total` is among the `ratio` picked: exactly
/// `floor(total * ratio)` devices are, spread evenly over the fleet.
pub fn picked(n: u32, ratio: f64) -> bool {
    let count = |k: u32| (f64::from(k) * ratio + 1e-9).floor();
    n > 0 && count(n) > count(n - 1)
}

/// Everything one device does, apart from what it says.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    /// When it first connects.
    pub start: Duration,
    pub schedule: Schedule,
    /// Offline from the first to the second offset; readings due meanwhile are buffered.
    pub offline: Option<(Duration, Duration)>,
    /// When it drops its connection and reconnects with everybody else.
    pub herd_at: Option<Duration>,
    /// Its clock's offset from true time, in milliseconds.
    pub skew_ms: i64,
}

impl DevicePlan {
    pub fn new(s: &Settings, n: u32) -> DevicePlan {
        let p = &s.profile;
        let herd = p.name == ProfileName::ThunderingHerd;
        let start = if herd || s.broker.connect_rate == 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(f64::from(n - 1) / s.broker.connect_rate)
        };
        let offline = (p.name == ProfileName::OfflineBacklog && picked(n, p.offline_ratio))
            .then(|| (p.offline_at, p.offline_at + p.offline_for));
        DevicePlan {
            start,
            schedule: Schedule::new(s, n, start),
            offline,
            herd_at: herd.then_some(p.herd_at),
            skew_ms: skew_ms(s, n),
        }
    }

    pub fn is_offline_at(&self, t: Duration) -> bool {
        self.offline.is_some_and(|(from, to)| from <= t && t < to)
    }
}

/// A device's clock offset: 0 unless the device is among `faults.skew_ratio`, else uniform in
/// ±`faults.skew_max`, outside [`SKEW_GUARD`] around the gateway's limits.
fn skew_ms(s: &Settings, n: u32) -> i64 {
    let max = s.faults.skew_max.as_millis() as i64;
    if max == 0 || !picked(n, s.faults.skew_ratio) {
        return 0;
    }
    let guard = SKEW_GUARD.as_millis() as i64;
    let limits = [
        s.gateway.max_future_skew.as_millis() as i64,
        -(s.gateway.max_age.as_millis() as i64),
    ];
    let near = |o: i64| limits.iter().any(|l| *l != 0 && (o - l).abs() < guard);
    let mut rng = rng(s.fleet.seed, n, Stream::Clock);
    // A few draws always find a spot unless the guard bands cover the whole range; then the
    // last draw stands and the report shows the device as "near a limit" would have been.
    let mut offset = 0;
    for _ in 0..64 {
        offset = rng.gen_range(-max..=max);
        if !near(offset) {
            break;
        }
    }
    offset
}

/// Which rule, if any, a reading stamped `skew_ms` off true time breaks at the gateway.
pub fn refusal_for_skew(s: &Settings, skew_ms: i64) -> Option<&'static str> {
    let future = s.gateway.max_future_skew.as_millis() as i64;
    let age = s.gateway.max_age.as_millis() as i64;
    if future > 0 && skew_ms > future {
        Some("timestamp_in_future")
    } else if age > 0 && skew_ms < -age {
        Some("timestamp_too_old")
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Shape {
    /// Every `1/rate`, from a phase of its own; rate 0: all at once.
    Steady { rate: f64, phase: f64 },
    /// Steady ticks, kept only inside the fleet-wide `on` windows.
    OnOff {
        rate: f64,
        phase: f64,
        on: f64,
        period: f64,
    },
    /// Exponential gaps of mean `1/rate`.
    Poisson { rate: f64 },
}

/// The times, as offsets from the start of the run, at which a device publishes.
#[derive(Debug, Clone)]
pub struct Schedule {
    shape: Shape,
    start: f64,
    /// Offset past which nothing is sent (`f64::INFINITY`: no time limit).
    end: f64,
    /// Messages left (`u64::MAX`: no count limit).
    left: u64,
    tick: u64,
    last: f64,
    rng: StdRng,
}

impl Schedule {
    pub fn new(s: &Settings, n: u32, start: Duration) -> Schedule {
        let f = &s.fleet;
        let mut rng = rng(f.seed, n, Stream::Schedule);
        let rate = f.rate;
        // A phase per device spreads a steady fleet evenly over each second instead of having
        // every device publish at the same instant.
        let phase = if rate > 0.0 {
            rng.gen_range(0.0..1.0) / rate
        } else {
            0.0
        };
        let shape = match s.profile.name {
            ProfileName::OnOff => Shape::OnOff {
                rate,
                phase,
                on: s.profile.on.as_secs_f64(),
                period: (s.profile.on + s.profile.off).as_secs_f64(),
            },
            ProfileName::Poisson => Shape::Poisson { rate },
            _ => Shape::Steady { rate, phase },
        };
        let start = start.as_secs_f64();
        Schedule {
            shape,
            start,
            end: if f.duration.is_zero() {
                f64::INFINITY
            } else {
                start + f.duration.as_secs_f64()
            },
            left: if f.messages == 0 {
                u64::MAX
            } else {
                f.messages
            },
            tick: 0,
            last: start,
            rng,
        }
    }

    /// The most messages this schedule can send, if bounded (for the progress bar).
    pub fn bound(&self) -> Option<u64> {
        let by_count = (self.left != u64::MAX).then_some(self.left);
        let by_time = match self.shape {
            Shape::Steady { rate, .. } | Shape::OnOff { rate, .. } if self.end.is_finite() => {
                Some(((self.end - self.start) * rate).ceil() as u64)
            }
            _ => None,
        };
        match (by_count, by_time) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Iterator for Schedule {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.left == 0 {
            return None;
        }
        let t = match self.shape {
            Shape::Steady { rate, phase } => {
                let t = if rate > 0.0 {
                    self.start + phase + self.tick as f64 / rate
                } else {
                    self.start
                };
                self.tick += 1;
                t
            }
            Shape::OnOff {
                rate,
                phase,
                on,
                period,
            } => loop {
                let t = self.start + phase + self.tick as f64 / rate;
                self.tick += 1;
                if t >= self.end || t.rem_euclid(period) < on {
                    break t;
                }
            },
            Shape::Poisson { rate } => {
                // 1 - U is in (0, 1], so the logarithm is finite.
                let u: f64 = self.rng.gen_range(0.0..1.0);
                self.last += -(1.0 - u).ln() / rate;
                self.last
            }
        };
        if t >= self.end {
            self.left = 0;
            return None;
        }
        self.left -= 1;
        Some(Duration::from_secs_f64(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(v: serde_json::Value) -> Settings {
        Settings::load(None, v).expect("settings")
    }

    fn secs(ts: &[Duration]) -> Vec<f64> {
        ts.iter()
            .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
            .collect()
    }

    #[test]
    fn picked_takes_exactly_the_ratio_spread_out() {
        let chosen: Vec<u32> = (1..=10).filter(|n| picked(*n, 0.3)).collect();
        assert_eq!(chosen.len(), 3);
        assert_eq!(chosen, vec![4, 7, 10]);
        assert_eq!((1..=10).filter(|n| picked(*n, 1.0)).count(), 10);
        assert_eq!((1..=10).filter(|n| picked(*n, 0.0)).count(), 0);
        assert_eq!((1..=1000).filter(|n| picked(*n, 0.1)).count(), 100);
    }

    #[test]
    fn steady_is_periodic_from_a_phase_and_stops_at_either_limit() {
        let s = settings(json!({"fleet": {"rate": 2.0, "messages": 4, "duration": "0s"}}));
        let plan = DevicePlan::new(&s, 1);
        let t: Vec<Duration> = plan.schedule.clone().collect();
        assert_eq!(t.len(), 4);
        let gaps: Vec<f64> = t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
        assert!(gaps.iter().all(|g| (g - 0.5).abs() < 1e-6), "{gaps:?}");
        assert!(t[0] < Duration::from_millis(500));

        let s = settings(json!({"fleet": {"rate": 10.0, "messages": 0, "duration": "1s"}}));
        assert_eq!(DevicePlan::new(&s, 3).schedule.count(), 10);
        assert_eq!(DevicePlan::new(&s, 3).schedule.bound(), Some(10));
    }

    #[test]
    fn connect_rate_staggers_starts_except_for_the_herd() {
        let s = settings(json!({"broker": {"connect_rate": 100.0}, "fleet": {"rate": 1.0}}));
        assert_eq!(DevicePlan::new(&s, 1).start, Duration::ZERO);
        assert_eq!(DevicePlan::new(&s, 101).start, Duration::from_secs(1));
        let s = settings(json!({"broker": {"connect_rate": 100.0},
            "profile": {"name": "thundering-herd", "herd_at": "3s"}}));
        let p = DevicePlan::new(&s, 101);
        assert_eq!(
            (p.start, p.herd_at),
            (Duration::ZERO, Some(Duration::from_secs(3)))
        );
    }

    #[test]
    fn on_off_sends_only_inside_the_bursts() {
        let s = settings(
            json!({"fleet": {"rate": 10.0, "messages": 0, "duration": "10s"},
            "broker": {"connect_rate": 0.0},
            "profile": {"name": "on-off", "on": "1s", "off": "4s"}}),
        );
        let t: Vec<Duration> = DevicePlan::new(&s, 2).schedule.collect();
        assert_eq!(t.len(), 20, "{:?}", secs(&t));
        assert!(t.iter().all(|d| d.as_secs_f64().rem_euclid(5.0) < 1.0));
    }

    #[test]
    fn poisson_averages_the_rate_and_repeats_with_the_seed() {
        let s = settings(
            json!({"fleet": {"rate": 5.0, "messages": 0, "duration": "200s"},
            "broker": {"connect_rate": 0.0}, "profile": {"name": "poisson"}}),
        );
        let a: Vec<Duration> = DevicePlan::new(&s, 1).schedule.collect();
        let b: Vec<Duration> = DevicePlan::new(&s, 1).schedule.collect();
        assert_eq!(a, b);
        assert!((900..1100).contains(&a.len()), "{}", a.len());
        let c: Vec<Duration> = DevicePlan::new(&s, 2).schedule.collect();
        assert_ne!(a, c);
    }

    #[test]
    fn offline_devices_and_windows() {
        let s = settings(json!({"fleet": {"rate": 1.0},
            "profile": {"name": "offline-backlog", "offline_ratio": 0.5,
                        "offline_at": "2s", "offline_for": "3s"}}));
        let offline: Vec<u32> = (1..=4)
            .filter(|n| DevicePlan::new(&s, *n).offline.is_some())
            .collect();
        assert_eq!(offline, vec![2, 4]);
        let p = DevicePlan::new(&s, 2);
        assert!(!p.is_offline_at(Duration::from_millis(1999)));
        assert!(p.is_offline_at(Duration::from_secs(2)));
        assert!(!p.is_offline_at(Duration::from_secs(5)));
    }

    #[test]
    fn skew_stays_out_of_the_guard_bands_and_is_classified() {
        let s = settings(json!({"faults": {"skew_ratio": 1.0, "skew_max": "20m"}}));
        let mut future = 0;
        for n in 1..=400 {
            let o = DevicePlan::new(&s, n).skew_ms;
            assert!(o.abs() <= 1_200_000);
            assert!((o - 600_000).abs() >= 5_000, "{o}");
            if refusal_for_skew(&s, o) == Some("timestamp_in_future") {
                assert!(o > 600_000);
                future += 1;
            } else {
                assert!(o < 600_000);
            }
        }
        // A quarter of ±20 minutes is beyond +10 minutes.
        assert!((60..140).contains(&future), "{future}");
        assert_eq!(
            refusal_for_skew(&s, -31 * 86_400_000),
            Some("timestamp_too_old")
        );
        let none = settings(json!({}));
        assert_eq!(DevicePlan::new(&none, 1).skew_ms, 0);
    }
}
