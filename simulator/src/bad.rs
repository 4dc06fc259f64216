//! Bad input: messages the gateway refuses, each kind built so that exactly one rule is broken
//! and the gateway's reason label can be predicted. Each refused message counts as one
//! rejected reading in `gateway_readings_rejected_total{reason}`, whether the gateway refuses
//! the whole payload (garbage, truncated, bad topic) or its single reading (the others).

use anyhow::Result;
use ciborium::Value as C;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::payload::{encode_value, Encoding};

/// Named after the gateway's reason label, which is what a test compares.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Deserialize,
    Serialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum BadKind {
    /// Random bytes behind a CBOR "break" (0xff), which cannot start a data item.
    MalformedCbor,
    /// A JSON reading cut in half: the parser runs out of input.
    Truncated,
    /// `"fields": {}`.
    EmptyFields,
    /// A NaN field value, which only CBOR can carry.
    NonFinite,
    /// A map as a field value.
    NestedValue,
    /// A timestamp a day (plus the gateway's allowed skew) ahead.
    TimestampInFuture,
    /// A well-formed reading on a topic with one level too many.
    BadTopic,
}

impl BadKind {
    pub const ALL: [BadKind; 7] = [
        BadKind::MalformedCbor,
        BadKind::Truncated,
        BadKind::EmptyFields,
        BadKind::NonFinite,
        BadKind::NestedValue,
        BadKind::TimestampInFuture,
        BadKind::BadTopic,
    ];

    /// The gateway's `reason` label for this kind.
    pub fn reason(self) -> &'static str {
        match self {
            BadKind::MalformedCbor => "malformed_cbor",
            BadKind::Truncated => "truncated",
            BadKind::EmptyFields => "empty_fields",
            BadKind::NonFinite => "non_finite",
            BadKind::NestedValue => "nested_value",
            BadKind::TimestampInFuture => "timestamp_in_future",
            BadKind::BadTopic => "bad_topic",
        }
    }
}

/// One bad message, ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct BadMessage {
    /// `None`: the device's usual topic.
    pub topic_suffix: Option<&'static str>,
    pub payload: Vec<u8>,
    pub encoding: Encoding,
}

/// Builds a bad message of `kind`. `ts` is the device's true time (not its skewed clock), so
/// that the timestamp never breaks a second rule; `usual` is the encoding the device would have
/// used, kept where the kind allows it.
pub fn build(
    kind: BadKind,
    run_id: &str,
    ts: i64,
    future_skew_ms: i64,
    usual: Encoding,
    rng: &mut impl Rng,
) -> Result<BadMessage> {
    let reading = |fields: Vec<(C, C)>, ts: i64| {
        C::Map(vec![
            (C::Text("ts".into()), C::Integer(ts.into())),
            (C::Text("fields".into()), C::Map(fields)),
            (
                C::Text("tags".into()),
                C::Map(vec![(C::Text("run".into()), C::Text(run_id.into()))]),
            ),
        ])
    };
    let value = |v: f64| vec![(C::Text("value".into()), C::Float(v))];
    let (value, encoding, topic_suffix) = match kind {
        BadKind::MalformedCbor => {
            let mut payload = vec![0xff_u8; 16];
            rng.fill(&mut payload[1..]);
            return Ok(BadMessage {
                topic_suffix: None,
                payload,
                encoding: Encoding::Cbor,
            });
        }
        BadKind::Truncated => {
            let whole = encode_value(&reading(value(1.5), ts), Encoding::Json)?;
            // Any proper prefix of a JSON object ends before the object does.
            let payload = whole[..whole.len() / 2].to_vec();
            return Ok(BadMessage {
                topic_suffix: None,
                payload,
                encoding: Encoding::Json,
            });
        }
        BadKind::EmptyFields => (reading(Vec::new(), ts), usual, None),
        BadKind::NonFinite => (reading(value(f64::NAN), ts), Encoding::Cbor, None),
        BadKind::NestedValue => {
            let nested = C::Map(vec![(C::Text("inner".into()), C::Float(1.0))]);
            let fields = vec![(C::Text("value".into()), nested)];
            (reading(fields, ts), usual, None)
        }
        BadKind::TimestampInFuture => {
            let ahead = ts.saturating_add(86_400_000).saturating_add(future_skew_ms);
            (reading(value(1.5), ahead), usual, None)
        }
        BadKind::BadTopic => (reading(value(1.5), ts), usual, Some("extra")),
    };
    Ok(BadMessage {
        topic_suffix,
        payload: encode_value(&value, encoding)?,
        encoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn build_one(kind: BadKind, usual: Encoding) -> BadMessage {
        let mut rng = StdRng::seed_from_u64(1);
        build(kind, "r", 1_000_000, 600_000, usual, &mut rng).expect("build")
    }

    #[test]
    fn garbage_starts_with_a_break_and_truncated_json_is_a_prefix() {
        let m = build_one(BadKind::MalformedCbor, Encoding::Json);
        assert_eq!((m.payload[0], m.payload.len()), (0xff, 16));
        assert_eq!(m.encoding, Encoding::Cbor);
        assert!(ciborium::from_reader::<C, _>(m.payload.as_slice()).is_err());

        let m = build_one(BadKind::Truncated, Encoding::Cbor);
        assert_eq!(m.encoding, Encoding::Json);
        assert_eq!(m.payload[0], b'{');
        let e = serde_json::from_slice::<serde_json::Value>(&m.payload).expect_err("cut");
        assert!(e.is_eof(), "{e}");
    }

    #[test]
    fn readings_break_exactly_one_rule() {
        let m = build_one(BadKind::EmptyFields, Encoding::Json);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"ts": 1_000_000, "fields": {}, "tags": {"run": "r"}})
        );

        let m = build_one(BadKind::NonFinite, Encoding::Json);
        assert_eq!(m.encoding, Encoding::Cbor);
        let v: C = ciborium::from_reader(m.payload.as_slice()).expect("cbor");
        let fields = v.as_map().expect("map")[1].1.as_map().expect("fields");
        assert!(fields[0].1.as_float().expect("float").is_nan());

        let m = build_one(BadKind::NestedValue, Encoding::Json);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json");
        assert_eq!(v["fields"]["value"], serde_json::json!({"inner": 1.0}));

        let m = build_one(BadKind::TimestampInFuture, Encoding::Cbor);
        let v: C = ciborium::from_reader(m.payload.as_slice()).expect("cbor");
        let ts: i128 = v.as_map().expect("map")[0]
            .1
            .as_integer()
            .expect("ts")
            .into();
        assert_eq!(ts, 1_000_000 + 86_400_000 + 600_000);

        let m = build_one(BadKind::BadTopic, Encoding::Cbor);
        assert_eq!(m.topic_suffix, Some("extra"));
        assert!(ciborium::from_reader::<C, _>(m.payload.as_slice()).is_ok());
    }

    #[test]
    fn kinds_are_the_gateways_reason_labels() {
        for k in BadKind::ALL {
            let json = serde_json::to_value(k).expect("serialise");
            assert_eq!(json, k.reason());
        }
    }
}
