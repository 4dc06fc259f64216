//! Settings of a run: the documented defaults (`config/simulator.toml`, built in), an optional
//! file on top, then the command line. The defaults file is the reference for every key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use figment::providers::{Format as _, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub const DEFAULT_TOML: &str = include_str!("../../config/simulator.toml");

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub broker: Broker,
    pub fleet: Fleet,
    pub profile: Profile,
    pub faults: Faults,
    pub gateway: GatewayRules,
    pub verify: Verify,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub qos: u8,
    pub username: String,
    pub password: String,
    pub password_file: PathBuf,
    pub tls: bool,
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub connect_rate: f64,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub will: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    pub devices: u32,
    pub rate: f64,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub messages: u64,
    pub readings_per_message: u32,
    pub format: Format,
    pub topic_prefix: String,
    pub measurement: String,
    pub seed: u64,
    pub run_id: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: ProfileName,
    #[serde(with = "humantime_serde")]
    pub on: Duration,
    #[serde(with = "humantime_serde")]
    pub off: Duration,
    #[serde(with = "humantime_serde")]
    pub herd_at: Duration,
    pub offline_ratio: f64,
    #[serde(with = "humantime_serde")]
    pub offline_at: Duration,
    #[serde(with = "humantime_serde")]
    pub offline_for: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    pub bad_ratio: f64,
    pub bad_kinds: Vec<crate::bad::BadKind>,
    pub skew_ratio: f64,
    #[serde(with = "humantime_serde")]
    pub skew_max: Duration,
}

/// The gateway's timestamp rules, as far as the simulator must predict its refusals.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRules {
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    pub sink: SinkKind,
    pub url: String,
    pub database: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    V4,
    V5,
}

/// Payload format of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Cbor,
    Json,
    /// Alternates per message, starting with CBOR.
    Mixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileName {
    Steady,
    OnOff,
    Poisson,
    ThunderingHerd,
    OfflineBacklog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SinkKind {
    None,
    VictoriaMetrics,
    Influx,
}

impl Settings {
    /// Defaults, then `file`, then `overrides` (anything serialisable in the same shape whose
    /// unset keys are left out).
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Settings> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            // figment skips a missing file silently; a typo in --config must not.
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        let settings: Settings = figment
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("reading the settings")?;
        settings.check()?;
        Ok(settings)
    }

    /// Rules that serde cannot express; each error names the key.
    pub fn check(&self) -> Result<()> {
        let f = &self.fleet;
        if !(1..=99_999).contains(&f.devices) {
            bail!("fleet.devices (--devices) must be 1 to 99999");
        }
        if !(f.rate.is_finite() && f.rate >= 0.0) {
            bail!("fleet.rate (--rate) must be 0 or more messages a second");
        }
        if f.messages == 0 && f.duration.is_zero() {
            bail!("set fleet.messages (--messages) or fleet.duration (--duration): the run needs an end");
        }
        if f.rate == 0.0 && f.messages == 0 {
            bail!("fleet.rate 0 (as fast as possible) needs fleet.messages (--messages)");
        }
        if f.readings_per_message == 0 {
            bail!("fleet.readings_per_message (--readings-per-message) must be 1 or more");
        }
        if self.broker.qos > 1 {
            bail!("broker.qos (--qos) must be 0 or 1");
        }
        check_name("fleet.measurement (--measurement)", &f.measurement, false)?;
        if !f.run_id.is_empty() {
            check_name("fleet.run_id (--run-id)", &f.run_id, true)?;
        }
        let prefix = &f.topic_prefix;
        if prefix.is_empty()
            || prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains(['+', '#', '\0'])
        {
            bail!("fleet.topic_prefix (--topic-prefix) must be a topic without wildcards (+, #) or a leading or trailing '/'");
        }
        let p = &self.profile;
        if matches!(p.name, ProfileName::OnOff | ProfileName::Poisson) && f.rate == 0.0 {
            bail!("profile {:?} needs fleet.rate (--rate) above 0", p.name);
        }
        if p.name == ProfileName::OnOff && (p.on.is_zero() || p.off.is_zero()) {
            bail!("profile.on and profile.off (--on, --off) must be above 0");
        }
        if p.name == ProfileName::OfflineBacklog && f.rate == 0.0 {
            bail!("profile offline-backlog needs fleet.rate (--rate) above 0: readings are buffered at that rate while offline");
        }
        for (key, v) in [
            ("profile.offline_ratio (--offline-ratio)", p.offline_ratio),
            ("faults.bad_ratio (--bad-ratio)", self.faults.bad_ratio),
            ("faults.skew_ratio (--skew-ratio)", self.faults.skew_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} must be between 0 and 1");
            }
        }
        if self.faults.bad_ratio > 0.0 && self.faults.bad_kinds.is_empty() {
            bail!("faults.bad_kinds (--bad-kinds) is empty but faults.bad_ratio is above 0");
        }
        if !(self.broker.connect_rate.is_finite() && self.broker.connect_rate >= 0.0) {
            bail!("broker.connect_rate (--connect-rate) must be 0 or more connections a second");
        }
        let v = &self.verify;
        if v.sink != SinkKind::None && v.url.is_empty() {
            bail!(
                "verify.url (--verify-url) is needed to verify against {:?}",
                v.sink
            );
        }
        if v.poll_interval < Duration::from_millis(50) {
            bail!("verify.poll_interval (--poll-interval) must be at least 50ms");
        }
        Ok(())
    }
}

// The run id and measurement are written into InfluxQL and PromQL-style selectors unescaped,
// so they are held to characters that never need quoting there, in line protocol or in topics.
fn check_name(key: &str, s: &str, punctuation: bool) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || b == b'_' || (punctuation && matches!(b, b'-' | b'.'))
        });
    if !ok {
        let allowed = if punctuation {
            "A-Z, a-z, 0-9, '-', '_' or '.'"
        } else {
            "A-Z, a-z, 0-9 or '_'"
        };
        bail!("{key} must be 1 to 64 characters of {allowed}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_parse_and_pass_the_checks() {
        let s = Settings::load(None, json!({})).expect("defaults");
        assert_eq!(s.fleet.devices, 20);
        assert_eq!(s.broker.connect_rate, 2000.0);
        assert_eq!(s.profile.name, ProfileName::Steady);
        assert_eq!(s.faults.bad_kinds.len(), 7);
        assert_eq!(s.gateway.max_future_skew, Duration::from_secs(600));
        assert_eq!(s.verify.poll_interval, Duration::from_millis(500));
    }

    #[test]
    fn a_file_then_overrides_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sim.toml");
        std::fs::write(
            &path,
            "[fleet]\ndevices = 7\nrate = 2.5\n[profile]\nname = \"poisson\"\n",
        )
        .expect("write");
        let s = Settings::load(Some(&path), json!({"fleet": {"devices": 9}})).expect("load");
        assert_eq!(s.fleet.devices, 9);
        assert_eq!(s.fleet.rate, 2.5);
        assert_eq!(s.profile.name, ProfileName::Poisson);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |v: serde_json::Value| {
            format!(
                "{:#}",
                Settings::load(None, v).expect_err("must be refused")
            )
        };
        assert!(err(json!({"fleet": {"devices": 0}})).contains("fleet.devices"));
        assert!(err(json!({"fleet": {"messages": 0, "duration": "0s"}})).contains("needs an end"));
        assert!(err(json!({"profile": {"name": "poisson"}})).contains("fleet.rate"));
        assert!(err(json!({"faults": {"bad_ratio": 1.5}})).contains("faults.bad_ratio"));
        assert!(err(json!({"fleet": {"run_id": "a b"}})).contains("fleet.run_id"));
        assert!(err(json!({"verify": {"sink": "victoria-metrics"}})).contains("verify.url"));
        assert!(err(json!({"fleet": {"colour": "red"}})).contains("colour"));
        let missing = Settings::load(Some(Path::new("/nonexistent/sim.toml")), json!({}));
        assert!(format!("{:#}", missing.expect_err("missing")).contains("does not exist"));
    }
}
