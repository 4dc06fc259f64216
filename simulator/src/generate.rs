//! What one device says, message by message: good readings with unique timestamps, bad input
//! at the chosen ratio, and the device's clock offset. Shared by the devices and the bench so
//! that the ceiling measures the real work.

use anyhow::Result;
use rand::rngs::StdRng;
use rand::Rng;

use crate::bad::{self, BadKind};
use crate::config::{Format, Settings};
use crate::payload::{self, Encoding, Reading};
use crate::profile::{self, Stream};

/// What the gateway should make of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Lands in the sink: one timestamp per reading, unique for the device.
    Lands(Vec<i64>),
    /// Refused: `readings` readings counted under `reason`.
    Refused {
        reason: &'static str,
        readings: u32,
        /// The bad-input kind, when it was one (not a skewed clock).
        bad: Option<BadKind>,
    },
}

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub encoding: Encoding,
    pub fate: Fate,
}

pub struct Generator {
    run_id: String,
    topic: String,
    bad_topic: String,
    format: Format,
    per_message: u32,
    bad_ratio: f64,
    bad_kinds: Vec<BadKind>,
    future_skew_ms: i64,
    skew_ms: i64,
    /// Set when the device's clock is off by more than the gateway allows.
    skew_refusal: Option<&'static str>,
    values: StdRng,
    faults: StdRng,
    value: f64,
    seq: u64,
    last_ts: i64,
    messages: u64,
}

impl Generator {
    pub fn new(s: &Settings, run_id: &str, n: u32, skew_ms: i64) -> Generator {
        let f = &s.fleet;
        let device = payload::device_name(n);
        let topic = payload::topic(&f.topic_prefix, &device, &f.measurement);
        let mut values = profile::rng(f.seed, n, Stream::Values);
        let value = values.gen_range(15.0..25.0);
        Generator {
            run_id: run_id.to_owned(),
            bad_topic: format!("{topic}/extra"),
            topic,
            format: f.format,
            per_message: f.readings_per_message,
            bad_ratio: s.faults.bad_ratio,
            bad_kinds: s.faults.bad_kinds.clone(),
            future_skew_ms: s.gateway.max_future_skew.as_millis() as i64,
            skew_ms,
            skew_refusal: profile::refusal_for_skew(s, skew_ms),
            values,
            faults: profile::rng(f.seed, n, Stream::Faults),
            value,
            seq: 0,
            last_ts: i64::MIN,
            messages: 0,
        }
    }

    /// The next message, measured at `now_ms` (true time, ms since the epoch).
    pub fn next(&mut self, now_ms: i64) -> Result<Message> {
        let encoding = match self.format {
            Format::Cbor => Encoding::Cbor,
            Format::Json => Encoding::Json,
            Format::Mixed if self.messages.is_multiple_of(2) => Encoding::Cbor,
            Format::Mixed => Encoding::Json,
        };
        self.messages += 1;
        if self.bad_ratio > 0.0 && self.faults.gen_bool(self.bad_ratio) {
            let kind = self.bad_kinds[self.faults.gen_range(0..self.bad_kinds.len())];
            let m = bad::build(
                kind,
                &self.run_id,
                now_ms,
                self.future_skew_ms,
                encoding,
                &mut self.faults,
            )?;
            let topic = match m.topic_suffix {
                Some(_) => self.bad_topic.clone(),
                None => self.topic.clone(),
            };
            return Ok(Message {
                topic,
                payload: m.payload,
                encoding: m.encoding,
                fate: Fate::Refused {
                    reason: kind.reason(),
                    readings: 1,
                    bad: Some(kind),
                },
            });
        }

        let mut readings = Vec::with_capacity(self.per_message as usize);
        for _ in 0..self.per_message {
            // The sink keys points by series and timestamp: a timestamp shared with another
            // reading of the device would overwrite it, so each is at least 1 ms after the last.
            let ts = (now_ms + self.skew_ms).max(self.last_ts.saturating_add(1));
            self.last_ts = ts;
            // A random walk looks like a sensor on a dashboard; rounding keeps payloads short.
            self.value += self.values.gen_range(-0.5..0.5);
            let shown = (self.value * 1000.0).round() / 1000.0;
            readings.push(Reading::at(&self.run_id, ts, self.seq, shown));
            self.seq += 1;
        }
        let payload = payload::encode(&readings, encoding)?;
        let fate = match self.skew_refusal {
            Some(reason) => Fate::Refused {
                reason,
                readings: self.per_message,
                bad: None,
            },
            None => Fate::Lands(readings.iter().map(|r| r.ts).collect()),
        };
        Ok(Message {
            topic: self.topic.clone(),
            payload,
            encoding,
            fate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(v: serde_json::Value) -> Settings {
        Settings::load(None, v).expect("settings")
    }

    #[test]
    fn timestamps_are_unique_and_follow_the_clock() {
        let s = settings(json!({"fleet": {"readings_per_message": 3}}));
        let mut g = Generator::new(&s, "r", 1, 0);
        let a = g.next(1000).expect("message");
        assert_eq!(a.fate, Fate::Lands(vec![1000, 1001, 1002]));
        assert_eq!(a.topic, "telemetry/dev-00001/env");
        // The clock has not moved past the last reading: later readings still get their own ms.
        let b = g.next(1001).expect("message");
        assert_eq!(b.fate, Fate::Lands(vec![1003, 1004, 1005]));
        let c = g.next(5000).expect("message");
        assert_eq!(c.fate, Fate::Lands(vec![5000, 5001, 5002]));
    }

    #[test]
    fn same_seed_same_messages() {
        let s = settings(json!({"fleet": {"format": "mixed"}, "faults": {"bad_ratio": 0.3}}));
        let run = |n| {
            let mut g = Generator::new(&s, "r", n, 0);
            (0..50)
                .map(|i| g.next(1000 + i).expect("message").payload)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn bad_ratio_is_respected_and_every_kind_appears() {
        let s = settings(json!({"faults": {"bad_ratio": 0.5}}));
        let mut g = Generator::new(&s, "r", 1, 0);
        let mut kinds = std::collections::BTreeSet::new();
        let mut bad = 0;
        for i in 0..2000 {
            if let Fate::Refused {
                bad: Some(k),
                readings,
                ..
            } = g.next(i).expect("message").fate
            {
                assert_eq!(readings, 1);
                kinds.insert(k);
                bad += 1;
            }
        }
        assert!((850..1150).contains(&bad), "{bad}");
        assert_eq!(kinds.len(), BadKind::ALL.len());
    }

    #[test]
    fn a_clock_beyond_the_limit_is_refused_whole_messages() {
        let s = settings(json!({"fleet": {"readings_per_message": 4}}));
        let mut g = Generator::new(&s, "r", 1, 700_000);
        let m = g.next(1000).expect("message");
        assert_eq!(
            m.fate,
            Fate::Refused {
                reason: "timestamp_in_future",
                readings: 4,
                bad: None
            }
        );
        let v: ciborium::Value = ciborium::from_reader(m.payload.as_slice()).expect("cbor");
        let first = &v.as_array().expect("array")[0];
        let ts: i128 = first.as_map().expect("map")[0]
            .1
            .as_integer()
            .expect("ts")
            .into();
        assert_eq!(ts, 701_000);
        // Within the limit it lands, skewed.
        let mut g = Generator::new(&s, "r", 1, -300_000);
        assert_eq!(
            g.next(1_000_000).expect("message").fate,
            Fate::Lands(vec![700_000, 700_001, 700_002, 700_003])
        );
    }
}
