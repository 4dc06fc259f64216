//! The figures of a run: what `--report` writes as JSON and what the summary shows.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use crate::config::{Format, ProfileName, Protocol, Settings};
use crate::device::DeviceReport;
use crate::verify::Verification;

#[derive(Debug, Serialize)]
pub struct Summary {
    pub run_id: String,
    /// When the run started, ms since the epoch: offsets in the settings count from here.
    pub start_ms: i64,
    pub profile: ProfileName,
    pub protocol: Protocol,
    pub format: Format,
    pub qos: u8,
    pub seed: u64,
    pub devices: u32,
    pub devices_failed: u32,
    /// Messages written to the connections, good and bad.
    pub messages_sent: u64,
    /// Readings in them: those meant to land plus those meant to be refused.
    pub readings_sent: u64,
    /// Readings the sink should hold.
    pub readings_expected: u64,
    /// Acknowledged publishes; null at QoS 0.
    pub acked: Option<u64>,
    /// Publishes the broker answered with an MQTT 5 failure reason.
    pub rejected: u64,
    pub elapsed_secs: f64,
    pub messages_per_sec: f64,
    pub readings_per_sec: f64,
    /// CPU time the simulator used while publishing (user + system, all threads).
    pub cpu_secs: Option<f64>,
    pub messages_per_cpu_sec: Option<f64>,
    /// Time from opening each connection to its CONNACK.
    pub connect: Option<Spread>,
    /// QoS 1: time from each PUBLISH leaving the device to its PUBACK.
    pub ack_latency: Option<Spread>,
    /// Bad-input messages sent, by kind (the gateway's reason label).
    pub bad_input_sent: BTreeMap<&'static str, u64>,
    /// Readings the gateway should refuse, by reason: bad input plus skewed clocks.
    /// `gateway_readings_rejected_total{reason}` should grow by exactly these.
    pub expected_rejections: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skew: Option<SkewFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backlog: Option<BacklogFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub herd: Option<HerdFigures>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<DeviceError>,
    pub verification: Option<Verification>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verification_error: Option<String>,
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Spread {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    fn of(mut v: Vec<Duration>) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |p: f64| {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            ms(v[rank.clamp(1, v.len()) - 1])
        };
        Some(Spread {
            count: v.len() as u64,
            p50_ms: at(50.0),
            p99_ms: at(99.0),
            max_ms: ms(v[v.len() - 1]),
        })
    }
}

/// The name a value has in the settings and the report.
fn label(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "?".to_owned(),
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 10_000.0).round() / 10.0
}

#[derive(Debug, Serialize)]
pub struct SkewFigures {
    /// Devices whose clock is off, and those off by more than the gateway allows.
    pub devices_skewed: u64,
    pub devices_beyond_limits: u64,
    pub largest_offset_ms: i64,
}

#[derive(Debug, Serialize)]
pub struct BacklogFigures {
    /// Devices that went offline, the readings they buffered and then sent, and the age of
    /// the oldest when it went out.
    pub devices: u64,
    pub readings: u64,
    pub max_age_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct HerdFigures {
    /// Devices that reconnected after the herd moment, and how long it took them, from that
    /// moment to their CONNACK (after their in-flight publishes were acknowledged).
    pub reconnected: u64,
    pub reconnect: Option<Spread>,
}

#[derive(Debug, Serialize)]
pub struct DeviceError {
    pub device: String,
    pub error: String,
}

impl Summary {
    pub fn new(
        s: &Settings,
        run_id: String,
        start_ms: i64,
        reports: &[DeviceReport],
        elapsed: Duration,
        cpu: Option<Duration>,
        verification: Option<Result<Verification>>,
    ) -> Summary {
        let messages_sent: u64 = reports.iter().map(|r| r.published).sum();
        let readings_expected: u64 = reports.iter().map(|r| r.readings_landing).sum();
        let mut expected_rejections: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut bad_input_sent: BTreeMap<&'static str, u64> = BTreeMap::new();
        for r in reports {
            for (reason, n) in &r.refused {
                *expected_rejections.entry(reason).or_default() += n;
            }
            for (kind, n) in &r.bad {
                *bad_input_sent.entry(kind).or_default() += n;
            }
        }
        let refused: u64 = expected_rejections.values().sum();
        let readings_sent = readings_expected + refused;
        let secs = elapsed.as_secs_f64();
        let per_sec = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let errors: Vec<DeviceError> = reports
            .iter()
            .filter_map(|r| {
                r.error.as_ref().map(|e| DeviceError {
                    device: r.device.clone(),
                    error: e.clone(),
                })
            })
            .collect();

        let skewed: Vec<&DeviceReport> = reports.iter().filter(|r| r.skew_ms != 0).collect();
        let skew = (!skewed.is_empty()).then(|| SkewFigures {
            devices_skewed: skewed.len() as u64,
            devices_beyond_limits: skewed
                .iter()
                .filter(|r| crate::profile::refusal_for_skew(s, r.skew_ms).is_some())
                .count() as u64,
            largest_offset_ms: skewed
                .iter()
                .map(|r| r.skew_ms)
                .max_by_key(|o| o.abs())
                .unwrap_or(0),
        });
        let offline: Vec<&DeviceReport> =
            reports.iter().filter(|r| r.backlog_readings > 0).collect();
        let backlog = (s.profile.name == ProfileName::OfflineBacklog).then(|| BacklogFigures {
            devices: offline.len() as u64,
            readings: offline.iter().map(|r| r.backlog_readings).sum(),
            max_age_ms: offline
                .iter()
                .map(|r| ms(r.backlog_max_age))
                .fold(0.0, f64::max),
        });
        let herd = (s.profile.name == ProfileName::ThunderingHerd).then(|| {
            let times: Vec<Duration> = reports.iter().filter_map(|r| r.herd_reconnect).collect();
            HerdFigures {
                reconnected: times.len() as u64,
                reconnect: Spread::of(times),
            }
        });
        let first_connects: Vec<Duration> = reports
            .iter()
            .filter_map(|r| r.connect_times.first().copied())
            .collect();

        let (verification, verification_error) = match verification {
            Some(Ok(v)) => (Some(v), None),
            Some(Err(e)) => (None, Some(format!("{e:#}"))),
            None => (None, None),
        };
        let cpu_secs = cpu.map(|c| c.as_secs_f64());
        Summary {
            run_id,
            start_ms,
            profile: s.profile.name,
            protocol: s.broker.protocol,
            format: s.fleet.format,
            qos: s.broker.qos,
            seed: s.fleet.seed,
            devices: s.fleet.devices,
            devices_failed: errors.len() as u32,
            messages_sent,
            readings_sent,
            readings_expected,
            acked: (s.broker.qos == 1).then(|| reports.iter().map(|r| r.acked).sum()),
            rejected: reports.iter().map(|r| r.rejected).sum(),
            elapsed_secs: secs,
            messages_per_sec: per_sec(messages_sent),
            readings_per_sec: per_sec(readings_sent),
            cpu_secs,
            messages_per_cpu_sec: cpu_secs
                .filter(|c| *c > 0.0)
                .map(|c| messages_sent as f64 / c),
            connect: Spread::of(first_connects),
            ack_latency: Spread::of(
                reports
                    .iter()
                    .flat_map(|r| r.ack_times.iter().copied())
                    .collect(),
            ),
            bad_input_sent,
            expected_rejections,
            skew,
            backlog,
            herd,
            errors,
            verification,
            verification_error,
        }
    }

    /// 0: nothing lost (or nothing checked); 1: readings lost or not found in time;
    /// 2: devices failed or the sink could not be read.
    pub fn exit_code(&self) -> ExitCode {
        if self.devices_failed > 0 || self.verification_error.is_some() {
            ExitCode::from(2)
        } else if self
            .verification
            .as_ref()
            .is_some_and(|v| !v.verified || v.timed_out)
        {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        }
    }

    pub fn print(&self) {
        println!(
            "run {}: {}, {} devices, MQTT {}, QoS {}, {}",
            self.run_id,
            label(&self.profile),
            self.devices,
            label(&self.protocol),
            self.qos,
            label(&self.format)
        );
        println!(
            "sent      {} messages, {} readings in {:.2} s ({:.0} msg/s, {:.0} readings/s)",
            self.messages_sent,
            self.readings_sent,
            self.elapsed_secs,
            self.messages_per_sec,
            self.readings_per_sec
        );
        if let (Some(cpu), Some(per)) = (self.cpu_secs, self.messages_per_cpu_sec) {
            println!("cpu       {cpu:.1} s ({per:.0} msg per cpu-second)");
        }
        if let Some(acked) = self.acked {
            println!("acked     {acked} of {}", self.messages_sent);
        }
        if let Some(a) = &self.ack_latency {
            println!(
                "puback    publish to PUBACK: p50 {} ms, p99 {} ms, max {} ms",
                a.p50_ms, a.p99_ms, a.max_ms
            );
        }
        if let Some(c) = &self.connect {
            println!(
                "connect   {} connections, p50 {} ms, p99 {} ms, max {} ms",
                c.count, c.p50_ms, c.p99_ms, c.max_ms
            );
        }
        if self.rejected > 0 {
            println!("rejected  {} (MQTT 5 reason codes)", self.rejected);
        }
        if !self.expected_rejections.is_empty() {
            let list: Vec<String> = self
                .expected_rejections
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            println!("refusals  expected from the gateway: {}", list.join(", "));
        }
        if let Some(s) = &self.skew {
            println!(
                "skew      {} devices off, {} beyond the gateway's limits (largest {} ms)",
                s.devices_skewed, s.devices_beyond_limits, s.largest_offset_ms
            );
        }
        if let Some(b) = &self.backlog {
            println!(
                "backlog   {} devices flushed {} buffered readings, oldest {} ms old",
                b.devices, b.readings, b.max_age_ms
            );
        }
        if let Some(h) = &self.herd {
            match &h.reconnect {
                Some(r) => println!(
                    "herd      {} reconnected at once: p50 {} ms, p99 {} ms, max {} ms",
                    h.reconnected, r.p50_ms, r.p99_ms, r.max_ms
                ),
                None => println!("herd      nobody reconnected"),
            }
        }
        if self.devices_failed > 0 {
            println!("failed    {} devices", self.devices_failed);
            const SHOWN: usize = 5;
            for e in self.errors.iter().take(SHOWN) {
                println!("          {}: {}", e.device, e.error);
            }
            if self.errors.len() > SHOWN {
                println!("          ... and {} more", self.errors.len() - SHOWN);
            }
        }
        if let Some(v) = &self.verification {
            self.print_verification(v);
        }
        if let Some(e) = &self.verification_error {
            println!("verified  ERROR: {e}");
        }
    }

    fn print_verification(&self, v: &Verification) {
        let c = &v.comparison;
        let verdict = match (v.verified, v.timed_out) {
            (true, _) => "OK",
            (false, true) => "FAILED (timed out)",
            (false, false) => "FAILED",
        };
        println!(
            "verified  {}: found {} of {}, lost {}, duplicated {}: {verdict}",
            v.sink, c.readings_found, c.expected_readings, c.lost, c.duplicated
        );
        if let Some(l) = &c.latency {
            println!(
                "latency   publish to visible: p50 {} ms, p90 {} ms, p99 {} ms, max {} ms \
                 (polled every {} ms, slowest poll {} ms)",
                l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, v.latency_resolution_ms, v.slowest_poll_ms
            );
        }
        // The full list is in the report; a screenful of the devices that differ is enough
        // to see the pattern.
        const SHOWN: usize = 10;
        let odd: Vec<_> = c
            .devices
            .iter()
            .filter(|d| d.lost > 0 || d.duplicated > 0)
            .collect();
        for d in odd.iter().take(SHOWN) {
            println!(
                "          {}: expected {}, found {}, lost {}, duplicated {}",
                d.device, d.expected, d.found, d.lost, d.duplicated
            );
        }
        if odd.len() > SHOWN {
            println!("          ... and {} more devices", odd.len() - SHOWN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_percentiles() {
        let v: Vec<Duration> = (1..=10).map(|i| Duration::from_millis(i * 10)).collect();
        let s = Spread::of(v).expect("spread");
        assert_eq!(
            (s.count, s.p50_ms, s.p99_ms, s.max_ms),
            (10, 50.0, 100.0, 100.0)
        );
        assert!(Spread::of(Vec::new()).is_none());
    }
}
