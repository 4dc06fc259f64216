//! Internal events that carry a reason: each is one type whose `emit` counts it under its
//! reason and logs it (within the log budget), so a counter and its log line cannot drift
//! apart. Every reason is an enum variant whose label is the metric's label value, listed
//! once here; a test checks each against the documentation and the dashboards and alert
//! rules that filter on it. (Vector's `internal_events` is the model.)

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::metrics::{Metrics, Reason};

/// Rejections logged per second at most; the counters keep the full count.
const LOG_BUDGET_PER_SEC: u32 = 20;

/// At most LOG_BUDGET_PER_SEC events are logged a second; the counters keep the full count.
#[derive(Default)]
pub struct LogBudget {
    second: AtomicU64,
    used: AtomicU32,
}

impl LogBudget {
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let previous = self.second.swap(now, Ordering::Relaxed);
        if previous != now {
            let suppressed = self.used.swap(0, Ordering::Relaxed);
            if previous != 0 && suppressed > LOG_BUDGET_PER_SEC {
                warn!(
                    suppressed = suppressed - LOG_BUDGET_PER_SEC,
                    "more events than logged; the counters have them all"
                );
            }
        }
        self.used.fetch_add(1, Ordering::Relaxed) < LOG_BUDGET_PER_SEC
    }
}

/// An enum of reasons, each with its label.
macro_rules! reasons {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $label:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant,)*
        }

        impl $name {
            /// Every reason, in the order listed.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The label value of the metric.
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

reasons! {
    /// Why readings, or a whole message, were refused: the `reason` of
    /// `gateway_readings_rejected_total` and `gateway_messages_rejected_total`.
    Rejection {
        PayloadTooLarge = "payload_too_large",
        EmptyPayload = "empty_payload",
        UnsupportedContentType = "unsupported_content_type",
        BadTopic = "bad_topic",
        Truncated = "truncated",
        MalformedCbor = "malformed_cbor",
        MalformedJson = "malformed_json",
        TrailingBytes = "trailing_bytes",
        TooDeep = "too_deep",
        TooManyReadings = "too_many_readings",
        NotAMap = "not_a_map",
        MissingFields = "missing_fields",
        EmptyFields = "empty_fields",
        BadFields = "bad_fields",
        BadTags = "bad_tags",
        TooManyFields = "too_many_fields",
        UnknownKey = "unknown_key",
        BadKey = "bad_key",
        EmptyKey = "empty_key",
        KeyTooLong = "key_too_long",
        DuplicateKey = "duplicate_key",
        TextTooLong = "text_too_long",
        ControlCharacter = "control_character",
        UnencodableBackslash = "unencodable_backslash",
        EmptyTagValue = "empty_tag_value",
        NestedValue = "nested_value",
        BadValue = "bad_value",
        NonFinite = "non_finite",
        IntegerOutOfRange = "integer_out_of_range",
        BadTimestamp = "bad_timestamp",
        TimestampTooOld = "timestamp_too_old",
        TimestampInFuture = "timestamp_in_future",
        /// The device is over `limits.device_rate`.
        RateLimited = "rate_limited",
        /// No room, and `queue.when_full = "drop_newest"`.
        QueueFull = "queue_full",
        /// A topic that starts with `$` is the server's (MQTT §4.7.2).
        DollarTopic = "dollar_topic",
        /// MQTT 5: the payload says it is UTF-8 and is not.
        PayloadFormatInvalid = "payload_format_invalid",
        /// The device published under another device's id.
        IdentityMismatch = "identity_mismatch",
    }
}

reasons! {
    /// Why a device's connection was refused before it was accepted: the `reason` of
    /// `gateway_connections_refused_total`.
    Refusal {
        ConnectionRate = "connection_rate",
        TooManyConnections = "too_many_connections",
        TlsHandshake = "tls_handshake",
        BadCertificate = "bad_certificate",
        PacketTooLarge = "packet_too_large",
        ProtocolError = "protocol_error",
        ClosedBeforeConnect = "closed_before_connect",
        ConnectTimeout = "connect_timeout",
        CertificateMismatch = "certificate_mismatch",
        UnknownDevice = "unknown_device",
        BadPassword = "bad_password",
        Anonymous = "anonymous",
        WillIdentityMismatch = "will_identity_mismatch",
        EmptyClientId = "empty_client_id",
        BrokerRefused = "broker_refused",
    }
}

reasons! {
    /// Why the gateway closed a device's accepted connection: the `reason` of
    /// `gateway_connections_closed_total`.
    Closing {
        IdentityMismatch = "identity_mismatch",
        SubscribeDenied = "subscribe_denied",
        PacketTooLarge = "packet_too_large",
        ProtocolError = "protocol_error",
        TopicAliasInvalid = "topic_alias_invalid",
        KeepAliveTimeout = "keep_alive_timeout",
        BrokerRefused = "broker_refused",
    }
}

/// Readings refused, all of a message (`whole`) or some of its readings.
pub struct ReadingsRejected<'a> {
    pub reason: Rejection,
    pub readings: u32,
    pub whole: bool,
    pub topic: &'a str,
    pub why: &'a str,
}

impl ReadingsRejected<'_> {
    pub fn emit(&self, metrics: &Metrics, budget: &LogBudget) {
        let reason = self.reason.label();
        metrics
            .readings_rejected
            .get_or_create(&Reason { reason })
            .inc_by(u64::from(self.readings));
        if self.whole {
            metrics
                .messages_rejected
                .get_or_create(&Reason { reason })
                .inc();
        }
        if budget.allow() {
            let topic: String = self.topic.chars().take(128).collect();
            warn!(reason, %topic, readings = self.readings, "refused: {}", self.why);
        }
    }
}

/// A device's connection refused before it was accepted.
pub struct ConnectionRefused<'a> {
    pub reason: Refusal,
    pub peer: &'a SocketAddr,
    pub detail: Option<&'a str>,
}

impl ConnectionRefused<'_> {
    pub fn emit(&self, metrics: &Metrics, budget: &LogBudget) {
        let reason = self.reason.label();
        metrics
            .connections_refused
            .get_or_create(&Reason { reason })
            .inc();
        if budget.allow() {
            info!(reason, peer = %self.peer, detail = self.detail.unwrap_or(""), "device connection refused");
        }
    }
}

/// A device's connection closed by the gateway.
pub struct ConnectionClosed<'a> {
    pub reason: Closing,
    pub device: &'a str,
    pub peer: &'a SocketAddr,
    pub detail: &'a str,
}

impl ConnectionClosed<'_> {
    pub fn emit(&self, metrics: &Metrics, budget: &LogBudget) {
        let reason = self.reason.label();
        metrics
            .connections_closed
            .get_or_create(&Reason { reason })
            .inc();
        if budget.allow() {
            warn!(reason, device = self.device, peer = %self.peer, detail = %self.detail, "device connection closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<&'static str> {
        let mut all: Vec<&'static str> = Rejection::ALL.iter().map(|r| r.label()).collect();
        all.extend(Refusal::ALL.iter().map(|r| r.label()));
        all.extend(Closing::ALL.iter().map(|r| r.label()));
        all
    }

    fn read(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Operators look a reason up in the docs: each is there, spelled as the label.
    #[test]
    fn every_reason_is_documented() {
        let docs = ["docs/contract.md", "docs/operations.md", "docs/security.md"]
            .map(read)
            .join("\n");
        let missing: Vec<&str> = labels()
            .into_iter()
            .filter(|l| !docs.contains(&format!("`{l}`")))
            .collect();
        assert!(missing.is_empty(), "reasons not in docs/: {missing:?}");
    }

    /// A dashboard panel or alert rule that filters on a reason names one the gateway has.
    #[test]
    fn every_reason_a_dashboard_or_alert_filters_on_exists() {
        let known = labels();
        let pattern = regex::Regex::new(
            r#"(?:\\?"reason\\?"\s*(?:=~|=|!=)\s*(?:'([^']*)'|/([^/]*)/))|(?:reason\s*(?:=~|=|!=)\s*\\?"([^"\\]*))"#,
        )
        .expect("regex");
        for file in [
            "dashboards/gateway-health.json",
            "dashboards/telemetry.json",
            "dashboards/alerts.yaml",
        ] {
            let text = read(file);
            for m in pattern.captures_iter(&text) {
                let value = (1..=3).find_map(|i| m.get(i)).map_or("", |v| v.as_str());
                let value = value.trim_start_matches('^').trim_end_matches('$');
                if value == ".+" || value == ".*" {
                    continue;
                }
                for alternative in value.split('|') {
                    assert!(
                        known.contains(&alternative),
                        "{file}: filters on reason {alternative:?}, which the gateway never counts"
                    );
                }
            }
        }
    }

    #[test]
    fn labels_are_unique_within_each_metric() {
        for all in [
            Rejection::ALL.iter().map(|r| r.label()).collect::<Vec<_>>(),
            Refusal::ALL.iter().map(|r| r.label()).collect(),
            Closing::ALL.iter().map(|r| r.label()).collect(),
        ] {
            let mut sorted = all.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), all.len());
        }
    }
}
