//! The command line. Every flag of `run` overrides one key of the settings
//! (`config/simulator.toml`); a flag left out leaves the key to the file or the defaults.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::bad::BadKind;
use crate::config::{Format, ProfileName, Protocol, SinkKind};

#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Publish readings from simulated devices and optionally verify they reached the sink.
    Run(Box<RunArgs>),
    /// Measure how many messages a second one core can generate and MQTT-encode, without a
    /// broker: the simulator's own ceiling.
    Bench(BenchArgs),
}

#[derive(clap::Args, Debug, Default, Serialize)]
pub struct RunArgs {
    /// Settings file read on top of the built-in defaults (config/simulator.toml).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub report: Option<PathBuf>,
    /// Print the effective settings (as JSON, in the file's sections) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_settings: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub profile: ProfileArgs,
    #[command(flatten)]
    pub faults: FaultArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub verify: VerifyArgs,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Broker")]
pub struct BrokerArgs {
    /// [broker.host]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// [broker.port] The gateway serves MQTT 5 on its own port (1884 by default).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// [broker.protocol] v4 is MQTT 3.1.1.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// [broker.qos] 0 or 1.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// [broker.username]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// [broker.password] Prefer --password-file: a flag shows in the process list.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// [broker.password_file]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// [broker.tls] Connect with TLS.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub tls: bool,
    /// [broker.ca_file] PEM roots to trust [default: the system bundle].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// [broker.client_cert] PEM certificate chain for mutual TLS.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// [broker.client_key] PEM private key for mutual TLS.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// [broker.connect_rate] New connections a second; 0: all at once.
    #[arg(long, value_name = "PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_rate: Option<f64>,
    /// [broker.connect_timeout]
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// [broker.will] Each device sets a last will (`status/<client id>`, "offline")
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub will: Option<bool>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Fleet")]
pub struct FleetArgs {
    /// [fleet.devices] Simulated devices, one MQTT connection each.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<u32>,
    /// [fleet.rate] Messages a second per device; 0: as fast as possible.
    #[arg(long, value_name = "PER_SEC")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// [fleet.duration] How long each device publishes (alone, it lifts the message count).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
    /// [fleet.messages] Messages per device (alone, it lifts the duration).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<u64>,
    /// [fleet.readings_per_message]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readings_per_message: Option<u32>,
    /// [fleet.format]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// [fleet.topic_prefix]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// [fleet.measurement]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement: Option<String>,
    /// [fleet.seed]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// [fleet.run_id] [default: <seed>-<unix ms>]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Profile")]
pub struct ProfileArgs {
    /// [profile.name]
    #[arg(long = "profile", value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<ProfileName>,
    /// [profile.on] on-off: how long a burst lasts.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub on: Option<Duration>,
    /// [profile.off] on-off: the silence between bursts.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub off: Option<Duration>,
    /// [profile.herd_at] thundering-herd: when every device reconnects.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub herd_at: Option<Duration>,
    /// [profile.offline_ratio] offline-backlog: the fraction of devices that go offline.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_ratio: Option<f64>,
    /// [profile.offline_at] offline-backlog: when they go offline.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub offline_at: Option<Duration>,
    /// [profile.offline_for] offline-backlog: how long they stay offline.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub offline_for: Option<Duration>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Faults")]
pub struct FaultArgs {
    /// [faults.bad_ratio] Fraction of messages replaced by bad input.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_ratio: Option<f64>,
    /// [faults.bad_kinds] Comma-separated.
    #[arg(long, value_enum, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_kinds: Option<Vec<BadKind>>,
    /// [faults.skew_ratio] Fraction of devices whose clock is off.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skew_ratio: Option<f64>,
    /// [faults.skew_max] Largest clock offset, either way.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub skew_max: Option<Duration>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "The gateway's timestamp rules")]
pub struct GatewayArgs {
    /// [gateway.max_future_skew] The gateway's decode.max_future_skew.
    #[arg(long = "gateway-max-future-skew", value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_future_skew: Option<Duration>,
    /// [gateway.max_age] The gateway's decode.max_age.
    #[arg(long = "gateway-max-age", value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
}

#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Verification")]
pub struct VerifyArgs {
    /// [verify.sink]
    #[arg(long = "verify", value_enum, value_name = "SINK")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkKind>,
    /// [verify.url] Base URL of the sink.
    #[arg(long = "verify-url", value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Short for --verify victoria-metrics --verify-url URL.
    #[arg(long, value_name = "URL", conflicts_with_all = ["verify_influx", "sink", "url"])]
    #[serde(skip)]
    pub verify_vm: Option<String>,
    /// Short for --verify influx --verify-url URL.
    #[arg(long, value_name = "URL", conflicts_with_all = ["sink", "url"])]
    #[serde(skip)]
    pub verify_influx: Option<String>,
    /// [verify.database] InfluxDB 1.x database.
    #[arg(long = "influx-db", value_name = "NAME")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// [verify.timeout] How long to keep looking after the last publish.
    #[arg(long = "verify-timeout", value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// [verify.poll_interval] The latency's resolution.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<Duration>,
}

impl RunArgs {
    /// The flags as a settings layer: only what was given, in the settings' shape.
    pub fn overrides(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        // A count and a duration both bound a run; naming only one on the command line means
        // "this one", so the other key's default must not cut the run short.
        match (self.fleet.messages, self.fleet.duration) {
            (None, Some(_)) => v["fleet"]["messages"] = 0.into(),
            (Some(_), None) => v["fleet"]["duration"] = "0s".into(),
            _ => {}
        }
        let shorthand = match (&self.verify.verify_vm, &self.verify.verify_influx) {
            (Some(url), _) => Some(("victoria-metrics", url)),
            (None, Some(url)) => Some(("influx", url)),
            (None, None) => None,
        };
        if let Some((sink, url)) = shorthand {
            v["verify"]["sink"] = sink.into();
            v["verify"]["url"] = url.as_str().into();
        }
        v
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// How long to measure.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub duration: Duration,
    #[arg(long, default_value_t = 1)]
    pub readings_per_message: u32,
    #[arg(long, value_enum, default_value_t = Format::Cbor)]
    pub format: Format,
    #[arg(long, value_enum, default_value_t = Protocol::V4)]
    pub protocol: Protocol,
    /// Also write the figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn parse(args: &[&str]) -> RunArgs {
        let mut all = vec!["simulator", "run"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all).expect("parses").command {
            Command::Run(a) => *a,
            Command::Bench(_) => panic!("not run"),
        }
    }

    #[test]
    fn flags_override_only_what_they_name() {
        let a = parse(&[
            "--devices",
            "3",
            "--profile",
            "on-off",
            "--rate",
            "2",
            "--on",
            "1s",
        ]);
        let s = Settings::load(None, a.overrides()).expect("settings");
        assert_eq!(s.fleet.devices, 3);
        assert_eq!(s.profile.name, ProfileName::OnOff);
        assert_eq!(s.profile.on, Duration::from_secs(1));
        // Untouched keys keep their defaults.
        assert_eq!(s.profile.off, Duration::from_secs(3));
        assert_eq!(s.broker.port, 1883);
        assert!(!s.broker.tls);
    }

    #[test]
    fn duration_alone_lifts_the_count_and_the_count_alone_lifts_the_duration() {
        let a = parse(&["--duration", "60s", "--rate", "1"]);
        let s = Settings::load(None, a.overrides()).expect("settings");
        assert_eq!(
            (s.fleet.messages, s.fleet.duration),
            (0, Duration::from_secs(60))
        );
        let a = parse(&["--messages", "5"]);
        let s = Settings::load(None, a.overrides()).expect("settings");
        assert_eq!((s.fleet.messages, s.fleet.duration), (5, Duration::ZERO));
    }

    #[test]
    fn verify_shorthands_and_lists() {
        let a = parse(&[
            "--verify-vm",
            "http://127.0.0.1:8428",
            "--bad-ratio",
            "0.5",
            "--bad-kinds",
            "malformed_cbor,bad_topic",
            "--tls",
        ]);
        let s = Settings::load(None, a.overrides()).expect("settings");
        assert_eq!(s.verify.sink, SinkKind::VictoriaMetrics);
        assert_eq!(s.verify.url, "http://127.0.0.1:8428");
        assert_eq!(
            s.faults.bad_kinds,
            vec![BadKind::MalformedCbor, BadKind::BadTopic]
        );
        assert!(s.broker.tls);
    }
}
