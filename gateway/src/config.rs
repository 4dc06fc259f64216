//! Configuration: the documented defaults (`config/gateway.toml`, built in), then an optional
//! file, then `GATEWAY_<SECTION>__<KEY>` environment variables; validated into errors that name
//! the key and the fix, never a panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};

use crate::decode::{self, TimestampUnit, TopicPattern};

/// The longest duration any setting takes: ten years.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The documented default configuration, printed by `gateway generate-config`.
pub const DEFAULT_TOML: &str = include_str!("../../config/gateway.toml");

/// Prefix of environment overrides; sections and keys are separated by a double underscore.
pub const ENV_PREFIX: &str = "GATEWAY_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override could not be read or has the wrong type: fix the named key.
    #[error("{0}")]
    Load(Box<figment::Error>),
    /// A secret file could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Values that parse but make no sense; one line per problem.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub auth: AuthConfig,
    pub ingest: IngestConfig,
    pub decode: DecodeConfig,
    pub wal: WalSection,
    pub queue: QueueConfig,
    pub limits: LimitsConfig,
    pub batch: BatchConfig,
    pub sink: SinkConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub dlq: DlqConfig,
    pub self_metrics: SelfMetricsSection,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfMetricsSection {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(deserialize_with = "lossy_string")]
    pub measurement: String,
    #[serde(deserialize_with = "lossy_string")]
    pub instance: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    Embedded,
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub mode: MqttMode,
    pub listen: SocketAddr,
    pub listen_v5: SocketAddr,
    pub topic: String,
    pub max_connections: usize,
    pub broker_segment_size: ByteSize,
    pub broker_segment_count: usize,
    #[serde(deserialize_with = "lossy_string")]
    pub client_id: String,
    pub url: String,
    #[serde(deserialize_with = "lossy_string")]
    pub group: String,
    #[serde(deserialize_with = "lossy_string")]
    pub username: String,
    pub password: Secret,
    pub password_file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    pub receive_maximum: u16,
    pub ca_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    #[serde(deserialize_with = "optional_addr")]
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    pub tls_client_ca_file: PathBuf,
    pub direct: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub anonymous: bool,
    pub credentials_file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    pub bind_identity: bool,
}

/// An address, or nothing for an empty string (a listener that is off).
fn optional_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = lossy_string(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not host:port, e.g. 0.0.0.0:8883")))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    pub max_payload_bytes: ByteSize,
    pub max_readings_per_payload: usize,
    pub max_fields_per_reading: usize,
    pub max_key_bytes: usize,
    pub max_text_bytes: ByteSize,
    pub timestamp_unit: TimestampUnit,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub max_future_skew: Duration,
    pub keep_integers: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    pub ack: AckSetting,
}

/// What a QoS 1 acknowledgement means (`ingest.ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckSetting {
    /// `durable` in embedded mode, `written` in external mode.
    Auto,
    Durable,
    Written,
    Received,
}

/// `ingest.ack` resolved for the mode: when a message is safe enough to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// In the write-ahead log and fdatasynced: survives a crash and a power cut.
    Durable,
    /// Written to the sink or parked in the dead-letter queue; no extra disk writes.
    Written,
    /// As soon as it is decoded and queued: what is in memory is lost in a crash.
    Received,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSection {
    pub dir: PathBuf,
    pub max_bytes: ByteSize,
    pub segment_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    pub commit_bytes: ByteSize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub max_readings: usize,
    pub max_bytes: ByteSize,
    pub when_full: WhenFull,
}

/// What ingest does when there is no room: for the write-ahead log (`ingest.ack =
/// "durable"`), when the log is full; otherwise when the queue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// `block`.
    Auto,
    /// Ingest waits: the guard stops reading from devices (in external mode, from the broker).
    Block,
    /// The spill buffer of earlier versions; the write-ahead log took its place.
    Spill,
    /// Refuse the message, counted as `queue_full`. Only when an operator chooses it.
    DropNewest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub device_rate: u32,
    pub device_burst: u32,
    pub connection_rate: u32,
    pub connection_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    pub max_readings: usize,
    pub max_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkApi {
    V1,
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub api: SinkApi,
    pub url: String,
    #[serde(deserialize_with = "lossy_string")]
    pub org: String,
    #[serde(deserialize_with = "lossy_string")]
    pub bucket: String,
    pub token: Secret,
    pub token_file: PathBuf,
    #[serde(deserialize_with = "lossy_string")]
    pub database: String,
    #[serde(deserialize_with = "lossy_string")]
    pub retention_policy: String,
    #[serde(deserialize_with = "lossy_string")]
    pub username: String,
    pub password: Secret,
    pub password_file: PathBuf,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub gzip: bool,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Secret,
    pub token_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqConfig {
    pub dir: PathBuf,
    pub max_bytes: ByteSize,
    pub segment_bytes: ByteSize,
    pub redrive: bool,
    #[serde(with = "humantime_serde")]
    pub redrive_interval: Duration,
    pub redrive_rate: u32,
    pub rejected_input_per_device: u32,
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// A secret value: its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<unset>"
        } else {
            "<redacted>"
        })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lossy_string(d).map(Secret)
    }
}

/// Strings that environment overrides may have turned into numbers or bools
/// (GATEWAY_SINK__TOKEN=12345 arrives as an integer).
fn lossy_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

impl Config {
    /// Loads defaults, then `file` if given, then the process environment; then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// Like [`Config::load`] with the override layer given explicitly, so that tests need not
    /// touch the process environment.
    pub fn load_from(
        file: Option<&Path>,
        env: impl figment::Provider,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(vec![format!(
                    "--config {}: no such file (run `gateway generate-config > {}` to create one)",
                    file.display(),
                    file.display()
                )]));
            }
            figment = figment.merge(Toml::file(file));
        }
        let mut config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.sink.token = read_secret(
            "sink.token_file",
            &config.sink.token_file,
            config.sink.token,
        )?;
        config.sink.password = read_secret(
            "sink.password_file",
            &config.sink.password_file,
            config.sink.password,
        )?;
        config.mqtt.password = read_secret(
            "mqtt.password_file",
            &config.mqtt.password_file,
            config.mqtt.password,
        )?;
        config.admin.token = read_secret(
            "admin.token_file",
            &config.admin.token_file,
            config.admin.token,
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string over the defaults, with no environment: for tests and tools.
    pub fn from_toml(toml: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::from(Toml::string(DEFAULT_TOML))
            .merge(Toml::string(toml))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Every duration setting with its key.
    fn durations(&self) -> [(&'static str, Duration); 14] {
        [
            ("mqtt.keep_alive", self.mqtt.keep_alive),
            ("mqtt.session_expiry", self.mqtt.session_expiry),
            ("auth.reload_interval", self.auth.reload_interval),
            ("decode.max_age", self.decode.max_age),
            ("decode.max_future_skew", self.decode.max_future_skew),
            ("wal.commit_interval", self.wal.commit_interval),
            ("batch.linger", self.batch.linger),
            ("sink.timeout", self.sink.timeout),
            ("sink.retry_initial", self.sink.retry_initial),
            ("sink.retry_max", self.sink.retry_max),
            ("dlq.redrive_interval", self.dlq.redrive_interval),
            ("dlq.retention", self.dlq.retention),
            ("self_metrics.interval", self.self_metrics.interval),
            ("shutdown.timeout", self.shutdown.timeout),
        ]
    }

    /// Every problem at once, each naming its key and what to do.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut need = |ok: bool, msg: String| {
            if !ok {
                errors.push(msg);
            }
        };
        if let Err(e) = TopicPattern::parse(&self.mqtt.topic) {
            need(
                false,
                format!(
                    "mqtt.topic {:?} {e}; for example \"telemetry/{{device}}/{{measurement}}\"",
                    self.mqtt.topic
                ),
            );
        }
        need(
            self.mqtt.max_connections >= 1,
            "mqtt.max_connections must be at least 1".into(),
        );
        need(
            self.mqtt.broker_segment_size.as_u64() >= 1024 * 1024,
            "mqtt.broker_segment_size must be at least \"1MiB\"".into(),
        );
        need(
            self.mqtt.broker_segment_count >= 2,
            "mqtt.broker_segment_count must be at least 2".into(),
        );
        need(
            self.mqtt.mode == MqttMode::Embedded
                || self.mqtt.url.starts_with("mqtt://")
                || self.mqtt.url.starts_with("mqtts://"),
            format!(
                "mqtt.url {:?} must start with mqtt:// or mqtts://",
                self.mqtt.url
            ),
        );
        need(
            self.mqtt.listen != self.mqtt.listen_v5,
            "mqtt.listen and mqtt.listen_v5 must differ: the gateway listens on both".into(),
        );
        let d = &self.decode;
        need(
            d.max_payload_bytes.as_u64() >= 16,
            "decode.max_payload_bytes must be at least 16".into(),
        );
        need(
            d.max_payload_bytes.as_u64() <= 128 * 1024 * 1024,
            "decode.max_payload_bytes must be at most \"128MiB\"".into(),
        );
        need(
            d.max_readings_per_payload >= 1,
            "decode.max_readings_per_payload must be at least 1".into(),
        );
        need(
            d.max_fields_per_reading >= 1,
            "decode.max_fields_per_reading must be at least 1".into(),
        );
        need(
            d.max_key_bytes >= 1,
            "decode.max_key_bytes must be at least 1".into(),
        );
        need(
            d.max_text_bytes.as_u64() >= 1,
            "decode.max_text_bytes must be at least 1".into(),
        );
        need(
            self.queue.max_readings >= 1,
            "queue.max_readings must be at least 1".into(),
        );
        need(
            self.queue.max_bytes >= d.max_payload_bytes,
            "queue.max_bytes must be at least decode.max_payload_bytes, or one large payload could never fit".into(),
        );
        need(
            self.batch.max_readings >= 1,
            "batch.max_readings must be at least 1".into(),
        );
        need(
            self.batch.max_bytes.as_u64() >= 1024,
            "batch.max_bytes must be at least \"1KiB\"".into(),
        );
        need(
            !self.batch.linger.is_zero(),
            "batch.linger must be more than 0 (for example \"200ms\")".into(),
        );
        let s = &self.sink;
        need(
            s.url.starts_with("http://") || s.url.starts_with("https://"),
            format!("sink.url {:?} must start with http:// or https://", s.url),
        );
        if s.api == SinkApi::V2 {
            need(
                !s.bucket.is_empty(),
                "sink.bucket must be set when sink.api = \"v2\"".into(),
            );
        } else {
            need(
                !s.database.is_empty(),
                "sink.database must be set when sink.api = \"v1\"".into(),
            );
        }
        need(
            !s.timeout.is_zero(),
            "sink.timeout must be more than 0 (for example \"10s\")".into(),
        );
        need(
            s.max_in_flight >= 1,
            "sink.max_in_flight must be at least 1".into(),
        );
        need(
            s.max_attempts >= 1,
            "sink.max_attempts must be at least 1 (1 means no retry)".into(),
        );
        need(
            s.retry_initial <= s.retry_max,
            "sink.retry_initial must not exceed sink.retry_max".into(),
        );
        need(
            self.mqtt.keep_alive >= Duration::from_secs(5),
            "mqtt.keep_alive must be at least \"5s\"".into(),
        );
        need(
            self.mqtt.client_cert_file.as_os_str().is_empty()
                == self.mqtt.client_key_file.as_os_str().is_empty(),
            "mqtt.client_cert_file and mqtt.client_key_file go together: set both or neither"
                .into(),
        );
        need(
            self.mqtt.receive_maximum >= 1,
            "mqtt.receive_maximum must be at least 1".into(),
        );
        need(
            self.mqtt.mode == MqttMode::Embedded || !self.mqtt.group.is_empty(),
            "mqtt.group must be set in external mode (replicas share the load through it)".into(),
        );
        let q = &self.dlq;
        need(
            q.segment_bytes.as_u64() >= 64 * 1024,
            "dlq.segment_bytes must be at least \"64KiB\"".into(),
        );
        need(
            q.max_bytes >= q.segment_bytes,
            "dlq.max_bytes must be at least dlq.segment_bytes".into(),
        );
        need(
            q.redrive_rate >= 1,
            "dlq.redrive_rate must be at least 1 (records a second)".into(),
        );
        need(
            !q.redrive_interval.is_zero(),
            "dlq.redrive_interval must be more than 0 (for example \"1s\")".into(),
        );
        need(
            self.queue.when_full != WhenFull::Spill,
            "queue.when_full = \"spill\" is gone: the write-ahead log (ingest.ack = \"durable\", \
             the default in embedded mode) keeps on disk what the queue cannot hold; use \"block\""
                .into(),
        );
        let w = &self.wal;
        need(
            w.segment_bytes.as_u64() >= 64 * 1024,
            "wal.segment_bytes must be at least \"64KiB\"".into(),
        );
        need(
            w.max_bytes >= w.segment_bytes,
            "wal.max_bytes must be at least wal.segment_bytes".into(),
        );
        need(
            w.commit_interval <= Duration::from_secs(1),
            "wal.commit_interval must be at most \"1s\" (every device waits for it; a few milliseconds is right)"
                .into(),
        );
        need(
            w.commit_bytes.as_u64() >= 4096,
            "wal.commit_bytes must be at least \"4KiB\"".into(),
        );
        need(
            self.limits.device_rate == 0 || self.limits.device_burst >= 1,
            "limits.device_burst must be at least 1 when limits.device_rate is set".into(),
        );
        need(
            self.limits.connection_rate == 0 || self.limits.connection_burst >= 1,
            "limits.connection_burst must be at least 1 when limits.connection_rate is set".into(),
        );
        let m = &self.mqtt;
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if self.mqtt.mode == MqttMode::Embedded {
            need(
                self.auth.anonymous
                    || set(&self.auth.credentials_file)
                    || set(&m.tls_client_ca_file),
                "devices cannot authenticate: set auth.credentials_file (add devices with \
                 `gateway passwd FILE DEVICE`), or mqtt.tls_client_ca_file for client \
                 certificates, or auth.anonymous = true to let any device connect"
                    .into(),
            );
        }
        need(
            !m.direct,
            "mqtt.direct = true is gone: the guard now takes telemetry in itself, which is both \
             faster and safe (a PUBACK means the reading is on disk); remove the setting"
                .into(),
        );
        need(
            m.tls_listen.is_none() || (set(&m.tls_cert_file) && set(&m.tls_key_file)),
            "mqtt.tls_listen needs mqtt.tls_cert_file and mqtt.tls_key_file".into(),
        );
        need(
            !set(&m.tls_client_ca_file) || m.tls_listen.is_some(),
            "mqtt.tls_client_ca_file needs mqtt.tls_listen (client certificates come over TLS)"
                .into(),
        );
        need(
            !self.auth.reload_interval.is_zero(),
            "auth.reload_interval must be more than 0 (for example \"5s\")".into(),
        );
        // Durations are added to instants and multiplied; one that absurd would overflow.
        for (key, value) in self.durations() {
            need(
                value <= MAX_DURATION,
                format!(
                    "{key} = {:?} is longer than the gateway takes (at most 10 years)",
                    humantime::format_duration(value).to_string()
                ),
            );
        }
        let m = &self.self_metrics;
        need(
            m.interval >= Duration::from_secs(1),
            "self_metrics.interval must be at least \"1s\"".into(),
        );
        need(
            !m.measurement.is_empty(),
            "self_metrics.measurement must not be empty (for example \"gateway\")".into(),
        );
        need(
            self.log
                .level
                .parse::<tracing_subscriber::filter::EnvFilter>()
                .is_ok(),
            format!(
                "log.level {:?} is not a level or filter (try \"info\" or \"gateway=debug\")",
                self.log.level
            ),
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// `ingest.ack` with `auto` resolved for the configured mode. External mode's broker
    /// keeps what is not acknowledged, so acknowledging once written costs no safety there.
    pub fn ack(&self) -> AckMode {
        match (self.ingest.ack, self.mqtt.mode) {
            (AckSetting::Auto, MqttMode::Embedded) | (AckSetting::Durable, _) => AckMode::Durable,
            (AckSetting::Auto, MqttMode::External) | (AckSetting::Written, _) => AckMode::Written,
            (AckSetting::Received, _) => AckMode::Received,
        }
    }

    /// The decoder's limits, from `[decode]`.
    pub fn limits(&self) -> decode::Limits {
        let d = &self.decode;
        decode::Limits {
            max_payload_bytes: d.max_payload_bytes.as_u64() as usize,
            max_readings_per_payload: d.max_readings_per_payload,
            max_fields_per_reading: d.max_fields_per_reading,
            max_key_bytes: d.max_key_bytes,
            max_text_bytes: d.max_text_bytes.as_u64() as usize,
            timestamp_unit: d.timestamp_unit,
            max_age_ns: duration_ns(d.max_age),
            max_future_skew_ns: duration_ns(d.max_future_skew),
            keep_integers: d.keep_integers,
        }
    }
}

fn duration_ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn read_secret(key: &'static str, path: &Path, inline: Secret) -> Result<Secret, ConfigError> {
    if path.as_os_str().is_empty() {
        return Ok(inline);
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        key,
        path: path.to_owned(),
        source,
    })?;
    Ok(Secret::new(text.trim_end_matches(['\r', '\n'])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    /// The defaults refuse to start until devices can authenticate; most tests let them in.
    const ANONYMOUS: &str = "[auth]\nanonymous = true\n";

    #[test]
    fn defaults_are_valid_and_documented() {
        let err = Config::from_toml("")
            .expect_err("no way for devices to authenticate")
            .to_string();
        assert!(
            err.contains("auth.credentials_file") && err.contains("gateway passwd"),
            "{err}"
        );
        let c = Config::from_toml(ANONYMOUS).expect("the built-in defaults validate");
        assert!(c.auth.bind_identity);
        assert_eq!(c.mqtt.mode, MqttMode::Embedded);
        assert_eq!(c.mqtt.listen, "0.0.0.0:1883".parse().expect("addr"));
        assert_eq!(c.batch.max_readings, 5000);
        assert_eq!(c.batch.linger, Duration::from_millis(200));
        assert_eq!(c.decode.max_payload_bytes, ByteSize::kib(256));
        assert_eq!(c.admin.listen, "127.0.0.1:9184".parse().expect("addr"));
        assert_eq!(
            c.ack(),
            AckMode::Durable,
            "a PUBACK means on disk by default"
        );
        assert_eq!(c.wal.commit_interval, Duration::from_millis(2));
        let external = Config::from_toml("[mqtt]\nmode = \"external\"\n").expect("valid");
        assert_eq!(
            external.ack(),
            AckMode::Written,
            "the broker keeps what is not acknowledged"
        );
        let chosen = Config::from_toml(&format!("{ANONYMOUS}[ingest]\nack = \"received\"\n"))
            .expect("valid");
        assert_eq!(chosen.ack(), AckMode::Received);
    }

    #[test]
    fn env_overrides_every_section() {
        let layered = Serialized::defaults(serde_json::json!({
            "mqtt": {"listen": "127.0.0.1:11883"},
            "auth": {"anonymous": true},
            "sink": {"url": "http://127.0.0.1:9999", "token": 12345},
            "batch": {"linger": "50ms", "max_bytes": "1MiB"},
        }));
        let c = Config::load_from(None, layered).expect("valid");
        assert_eq!(c.mqtt.listen.port(), 11883);
        assert_eq!(c.sink.url, "http://127.0.0.1:9999");
        assert_eq!(c.sink.token.expose(), "12345", "numeric secrets stay text");
        assert_eq!(c.batch.linger, Duration::from_millis(50));
        assert_eq!(c.batch.max_bytes, ByteSize::mib(1));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature, not ours
    fn environment_variable_names_map_to_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("GATEWAY_MQTT__LISTEN", "127.0.0.1:1999");
            jail.set_env("GATEWAY_AUTH__ANONYMOUS", "true");
            jail.set_env("GATEWAY_SINK__API", "v1");
            jail.set_env("GATEWAY_DECODE__MAX_AGE", "1h");
            let c = Config::load(None).expect("valid");
            assert_eq!(c.mqtt.listen.port(), 1999);
            assert_eq!(c.sink.api, SinkApi::V1);
            assert_eq!(c.decode.max_age, Duration::from_secs(3600));
            jail.set_env("GATEWAY_SINK__TOKN", "x");
            let err = Config::load(None).expect_err("typo is refused").to_string();
            assert!(err.contains("tokn"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn every_section_is_validated() {
        let err = Config::from_toml(
            "[dlq]\nsegment_bytes = 1000\nredrive_rate = 0\n[queue]\nwhen_full = \"spill\"\n\
             [wal]\nsegment_bytes = 1000\ncommit_interval = \"5s\"\ncommit_bytes = 1\n\
             [limits]\ndevice_rate = 5\n[self_metrics]\ninterval = \"10ms\"\nmeasurement = \"\"",
        )
        .expect_err("invalid")
        .to_string();
        for key in [
            "dlq.segment_bytes",
            "dlq.redrive_rate",
            "queue.when_full = \"spill\" is gone",
            "wal.segment_bytes",
            "wal.commit_interval",
            "wal.commit_bytes",
            "limits.device_burst",
            "self_metrics.interval",
            "self_metrics.measurement",
        ] {
            assert!(err.contains(key), "{key} not named in: {err}");
        }
    }

    #[test]
    fn validation_names_key_and_fix() {
        let err = Config::from_toml(
            "[batch]\nmax_readings = 0\n[sink]\nurl = \"localhost:8086\"\n[mqtt]\ntopic = \"telemetry/{device}\"",
        )
        .expect_err("invalid")
        .to_string();
        assert!(
            err.contains("batch.max_readings must be at least 1"),
            "{err}"
        );
        assert!(
            err.contains("sink.url \"localhost:8086\" must start with http://"),
            "{err}"
        );
        assert!(err.contains("mqtt.topic"), "{err}");
        let err = Config::from_toml("[queue]\nmax_bytes = \"lots\"")
            .expect_err("bad size")
            .to_string();
        assert!(err.contains("max_bytes"), "{err}");
    }

    #[test]
    fn security_settings_are_validated_together() {
        let err = Config::from_toml(&format!("{ANONYMOUS}[mqtt]\ndirect = true\n"))
            .expect_err("direct is gone")
            .to_string();
        assert!(err.contains("mqtt.direct = true is gone"), "{err}");
        let err = Config::from_toml(&format!(
            "{ANONYMOUS}[mqtt]\ntls_listen = \"127.0.0.1:8883\"\ntls_client_ca_file = \"ca.pem\"\n"
        ))
        .expect_err("TLS without a certificate")
        .to_string();
        assert!(
            err.contains("mqtt.tls_listen needs mqtt.tls_cert_file"),
            "{err}"
        );
        let err = Config::from_toml(&format!("{ANONYMOUS}[mqtt]\ntls_listen = \"nowhere\"\n"))
            .expect_err("not an address")
            .to_string();
        assert!(
            err.contains("tls_listen") || err.contains("host:port"),
            "{err}"
        );
        Config::from_toml("[auth]\ncredentials_file = \"devices\"\n")
            .expect("a credentials file is a way to authenticate");
    }

    /// A duration far beyond sense is an error naming its key, never a panic in instant
    /// arithmetic later.
    #[test]
    fn absurd_durations_are_refused_with_their_key() {
        let keys = Config::from_toml(ANONYMOUS).expect("defaults").durations();
        for (key, _) in keys {
            let (section, name) = key.split_once('.').expect("section.key");
            let header = if section == "auth" {
                String::new()
            } else {
                format!("[{section}]\n")
            };
            let err = Config::from_toml(&format!("{ANONYMOUS}{header}{name} = \"100000000y\"\n"))
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains(&format!("{key} = ")) && err.contains("at most 10 years"),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = Config::from_toml(&format!(
            "{ANONYMOUS}[sink]\ntoken = \"s3cr3t-token\"\npassword = \"hunter2\""
        ))
        .expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t-token") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("gw-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("token");
        std::fs::write(&path, "from-file\n").expect("write");
        let layered = Serialized::defaults(
            serde_json::json!({"sink": {"token_file": path}, "auth": {"anonymous": true}}),
        );
        let c = Config::load_from(None, layered).expect("valid");
        assert_eq!(c.sink.token.expose(), "from-file");
        let missing =
            Serialized::defaults(serde_json::json!({"sink": {"password_file": dir.join("nope")}}));
        let err = Config::load_from(None, missing)
            .expect_err("missing file")
            .to_string();
        assert!(err.starts_with("sink.password_file: cannot read"), "{err}");
    }
}
