//! Every reading that went out, keyed by device and timestamp (unique per device), with when
//! it was published and when the sink first showed it; and the comparison of what was sent
//! with what the sink holds. Pure: the HTTP side is in [`crate::verify`].

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use tokio::time::Instant;

use crate::payload;
use crate::shared::Sent;

/// Timestamps per `device` tag, as the sink returned them.
pub type Samples = BTreeMap<String, Vec<i64>>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Microseconds from the tracker's origin.
    published: u64,
    seen: Option<u64>,
}

pub struct Tracker {
    origin: Instant,
    entries: HashMap<(u32, i64), Entry>,
    /// Not yet seen, ordered by timestamp so that the sink can be asked for narrow ranges.
    pending: BTreeSet<(i64, u32)>,
}

/// Percentiles of the time from publish to visible in the sink, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Readings measured (those found).
    pub readings: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceFigures {
    pub device: String,
    pub expected: u64,
    pub found: u64,
    pub lost: u64,
    /// Points beyond the expected ones: a repeated timestamp, or one that was never sent.
    pub duplicated: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_max_ms: Option<f64>,
}

/// What was sent against what the sink holds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    pub expected_readings: u64,
    /// Expected readings present in the sink, each counted once.
    pub readings_found: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub latency: Option<Latency>,
    /// Every device, in order.
    pub devices: Vec<DeviceFigures>,
}

impl Tracker {
    pub fn new(origin: Instant) -> Tracker {
        Tracker {
            origin,
            entries: HashMap::new(),
            pending: BTreeSet::new(),
        }
    }

    pub fn add(&mut self, sent: Sent) {
        let published = self.micros(sent.at);
        for ts in sent.ts {
            // Timestamps are unique per device by construction; should one repeat, the first
            // publish is the one measured.
            if let std::collections::hash_map::Entry::Vacant(v) =
                self.entries.entry((sent.device, ts))
            {
                v.insert(Entry {
                    published,
                    seen: None,
                });
                self.pending.insert((ts, sent.device));
            }
        }
    }

    pub fn expected(&self) -> u64 {
        self.entries.len() as u64
    }

    pub fn pending(&self) -> u64 {
        self.pending.len() as u64
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// Timestamp ranges (ms, inclusive) that cover the readings not seen yet: split where two
    /// pending timestamps are more than `gap_ms` apart, so that one late reading does not make
    /// every poll fetch everything published since; at most `max` ranges.
    pub fn pending_ranges(&self, gap_ms: i64, max: usize) -> Vec<(i64, i64)> {
        ranges(self.pending.iter().map(|(ts, _)| *ts), gap_ms, max)
    }

    /// Ranges that cover every reading sent.
    pub fn all_ranges(&self, gap_ms: i64, max: usize) -> Vec<(i64, i64)> {
        let mut ts: Vec<i64> = self.entries.keys().map(|(_, ts)| *ts).collect();
        ts.sort_unstable();
        ts.dedup();
        ranges(ts.into_iter(), gap_ms, max)
    }

    /// Marks the readings in `samples` seen at `at`, if not seen before; returns how many were
    /// new.
    pub fn observe(&mut self, samples: &Samples, at: Instant) -> u64 {
        let now = self.micros(at);
        let mut new = 0;
        for (name, stamps) in samples {
            let Some(device) = payload::device_index(name) else {
                continue;
            };
            for ts in stamps {
                if let Some(e) = self.entries.get_mut(&(device, *ts)) {
                    if e.seen.is_none() {
                        e.seen = Some(now);
                        self.pending.remove(&(*ts, device));
                        new += 1;
                    }
                }
            }
        }
        new
    }

    /// Compares what was sent with `samples`, the sink's full answer for [`Self::all_ranges`].
    /// `devices` lists every device of the run, so that one that sent nothing still shows.
    pub fn compare(&self, samples: &Samples, devices: u32) -> Comparison {
        #[derive(Default)]
        struct Acc {
            expected: u64,
            found: BTreeSet<i64>,
            points: u64,
            latencies: Vec<u64>,
        }
        let mut acc: BTreeMap<u32, Acc> = (1..=devices).map(|n| (n, Acc::default())).collect();
        let mut strangers: BTreeMap<&str, u64> = BTreeMap::new();
        for ((device, _), e) in &self.entries {
            let a = acc.entry(*device).or_default();
            a.expected += 1;
            if let Some(seen) = e.seen {
                a.latencies.push(seen.saturating_sub(e.published));
            }
        }
        for (name, stamps) in samples {
            match payload::device_index(name) {
                Some(device) => {
                    let a = acc.entry(device).or_default();
                    a.points += stamps.len() as u64;
                    for ts in stamps {
                        if self.entries.contains_key(&(device, *ts)) {
                            a.found.insert(*ts);
                        }
                    }
                }
                // Points of this run under a device name it never used.
                None => *strangers.entry(name).or_default() += stamps.len() as u64,
            }
        }

        let mut all_latencies = Vec::new();
        let mut c = Comparison {
            expected_readings: 0,
            readings_found: 0,
            lost: 0,
            duplicated: 0,
            latency: None,
            devices: Vec::with_capacity(acc.len()),
        };
        for (device, mut a) in acc {
            let found = a.found.len() as u64;
            let d = DeviceFigures {
                device: payload::device_name(device),
                expected: a.expected,
                found,
                lost: a.expected - found,
                duplicated: a.points - found,
                latency_p50_ms: percentile(&mut a.latencies, 50.0).map(ms),
                latency_max_ms: a.latencies.last().copied().map(ms),
            };
            c.expected_readings += d.expected;
            c.readings_found += d.found;
            c.lost += d.lost;
            c.duplicated += d.duplicated;
            all_latencies.extend(a.latencies);
            c.devices.push(d);
        }
        for (name, points) in strangers {
            c.duplicated += points;
            c.devices.push(DeviceFigures {
                device: name.to_owned(),
                expected: 0,
                found: 0,
                lost: 0,
                duplicated: points,
                latency_p50_ms: None,
                latency_max_ms: None,
            });
        }
        c.latency = latency(&mut all_latencies);
        c
    }
}

fn ranges(sorted: impl Iterator<Item = i64>, gap_ms: i64, max: usize) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for ts in sorted {
        match out.last_mut() {
            Some((_, end)) if ts - *end <= gap_ms => *end = ts,
            _ => out.push((ts, ts)),
        }
    }
    // Too many ranges: join the closest neighbours until few enough are left.
    while out.len() > max.max(1) {
        let i = (1..out.len())
            .min_by_key(|i| out[*i].0 - out[*i - 1].1)
            .unwrap_or(1);
        out[i - 1].1 = out[i].1;
        out.remove(i);
    }
    out
}

/// Nearest-rank percentile of `v` (sorted in place), in microseconds.
fn percentile(v: &mut [u64], p: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

fn ms(micros: u64) -> f64 {
    (micros as f64 / 100.0).round() / 10.0
}

fn latency(v: &mut [u64]) -> Option<Latency> {
    Some(Latency {
        p50_ms: ms(percentile(v, 50.0)?),
        p90_ms: ms(percentile(v, 90.0)?),
        p99_ms: ms(percentile(v, 99.0)?),
        max_ms: ms(*v.last()?),
        readings: v.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sent(origin: Instant, device: u32, ts: &[i64], after_ms: u64) -> Sent {
        Sent {
            device,
            ts: ts.to_vec(),
            at: origin + Duration::from_millis(after_ms),
        }
    }

    fn samples(v: &[(&str, &[i64])]) -> Samples {
        v.iter()
            .map(|(d, ts)| (d.to_string(), ts.to_vec()))
            .collect()
    }

    #[test]
    fn ranges_split_on_gaps_and_merge_down_to_the_maximum() {
        assert_eq!(
            ranges([1, 2, 5, 100, 101].into_iter(), 10, 8),
            vec![(1, 5), (100, 101)]
        );
        assert_eq!(
            ranges([1, 50, 60, 200].into_iter(), 5, 2),
            vec![(1, 60), (200, 200)]
        );
        assert!(ranges(std::iter::empty(), 5, 2).is_empty());
    }

    #[test]
    fn latency_is_from_publish_to_first_seen() {
        let origin = Instant::now();
        let mut t = Tracker::new(origin);
        t.add(sent(origin, 1, &[1000, 1001], 100));
        t.add(sent(origin, 2, &[1000], 200));
        assert_eq!((t.expected(), t.pending()), (3, 3));
        assert_eq!(t.pending_ranges(10, 4), vec![(1000, 1001)]);

        let first = samples(&[("dev-00001", &[1000, 1001])]);
        assert_eq!(t.observe(&first, origin + Duration::from_millis(600)), 2);
        // Seen again later: the first sighting counts.
        assert_eq!(t.observe(&first, origin + Duration::from_millis(900)), 0);
        assert_eq!(t.pending(), 1);
        let all = samples(&[("dev-00001", &[1000, 1001]), ("dev-00002", &[1000])]);
        assert_eq!(t.observe(&all, origin + Duration::from_millis(1200)), 1);

        let c = t.compare(&all, 2);
        assert_eq!(
            (c.expected_readings, c.readings_found, c.lost, c.duplicated),
            (3, 3, 0, 0)
        );
        let l = c.latency.expect("latency");
        assert_eq!((l.p50_ms, l.max_ms, l.readings), (500.0, 1000.0, 3));
        assert_eq!(c.devices[1].latency_p50_ms, Some(1000.0));
    }

    #[test]
    fn compare_counts_lost_duplicated_and_strangers() {
        let origin = Instant::now();
        let mut t = Tracker::new(origin);
        t.add(sent(origin, 1, &[1000, 1001, 1002], 0));
        t.add(sent(origin, 2, &[1000, 1001], 0));
        let s = samples(&[
            ("dev-00001", &[1000, 1001, 1002]),
            // A repeat and a timestamp never sent.
            ("dev-00002", &[1001, 1001, 1005]),
            // A device of the fleet that sent nothing, and a name that is not a device.
            ("dev-00003", &[1000]),
            ("intruder", &[1000, 1001]),
        ]);
        t.observe(&s, origin);
        let c = t.compare(&s, 3);
        assert_eq!(c.expected_readings, 5);
        assert_eq!(c.readings_found, 4);
        assert_eq!(c.lost, 1);
        assert_eq!(c.duplicated, 2 + 1 + 2);
        let names: Vec<&str> = c.devices.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(names, ["dev-00001", "dev-00002", "dev-00003", "intruder"]);
        assert_eq!(
            (
                c.devices[1].found,
                c.devices[1].lost,
                c.devices[1].duplicated
            ),
            (1, 1, 2)
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let l = latency(&mut v).expect("latency");
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(latency(&mut []), None);
    }
}
