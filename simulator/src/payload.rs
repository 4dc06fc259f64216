//! What a simulated device says: names, topics and payloads. Pure functions, so that tests and
//! other tools can build exactly the payloads the simulator publishes.

use anyhow::{Context, Result};
use serde::Serialize;

/// Payload encoding of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Cbor,
    Json,
}

impl Encoding {
    /// The MQTT 5 content type the gateway maps back to this encoding.
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Cbor => "application/cbor",
            Encoding::Json => "application/json",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Encoding::Cbor => "cbor",
            Encoding::Json => "json",
        }
    }
}

/// Device names are zero-padded so that they sort the same way as numbers in the sink.
pub fn device_name(n: u32) -> String {
    format!("dev-{n:05}")
}

/// The device number back from a name made by [`device_name`].
pub fn device_index(name: &str) -> Option<u32> {
    name.strip_prefix("dev-")?.parse().ok()
}

/// The client id carries the run id so that two runs against one broker never take over each
/// other's sessions.
pub fn client_id(run_id: &str, n: u32) -> String {
    format!("sim-{run_id}-{n:05}")
}

pub fn topic(prefix: &str, device: &str, measurement: &str) -> String {
    format!("{prefix}/{device}/{measurement}")
}

/// Timestamp of a device's `seq`-th reading. One millisecond apart so that the sink, which
/// keys points by series and timestamp, keeps every reading instead of overwriting.
pub fn timestamp_ms(start_ms: i64, seq: u64) -> i64 {
    // A run never gets near 2^63 readings per device; saturate rather than wrap if it did.
    start_ms.saturating_add(i64::try_from(seq).unwrap_or(i64::MAX))
}

/// One reading in the gateway's input schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading<'a> {
    /// Milliseconds since the epoch (the gateway's default `timestamp_unit`).
    pub ts: i64,
    pub fields: Fields,
    pub tags: Tags<'a>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fields {
    pub value: f64,
    /// Floats rather than integers: the gateway writes numbers as floats by default, and a
    /// field must keep one type per series in the sink.
    pub seq: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tags<'a> {
    /// Lets verification find this run's points and nothing else.
    pub run: &'a str,
}

impl<'a> Reading<'a> {
    /// The `seq`-th reading of a run whose readings are 1 ms apart from `start_ms`.
    pub fn new(run_id: &'a str, start_ms: i64, seq: u64, value: f64) -> Self {
        Self::at(run_id, timestamp_ms(start_ms, seq), seq, value)
    }

    pub fn at(run_id: &'a str, ts: i64, seq: u64, value: f64) -> Self {
        Reading {
            ts,
            fields: Fields {
                value,
                seq: seq as f64,
            },
            tags: Tags { run: run_id },
        }
    }
}

/// Encodes one message: a single reading as a map, several as an array of maps (both shapes
/// the gateway accepts).
pub fn encode(readings: &[Reading<'_>], encoding: Encoding) -> Result<Vec<u8>> {
    match readings {
        [one] => encode_value(one, encoding),
        many => encode_value(many, encoding),
    }
}

/// One value as CBOR or JSON (ciborium's `Value` serialises through serde as the JSON a person
/// would write).
pub(crate) fn encode_value<T: Serialize + ?Sized>(
    value: &T,
    encoding: Encoding,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    match encoding {
        Encoding::Cbor => ciborium::into_writer(value, &mut out).context("encoding CBOR")?,
        Encoding::Json => serde_json::to_writer(&mut out, value).context("encoding JSON")?,
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ciborium::Value as C;
    use serde_json::json;

    fn cbor_reading(ts: i64, value: f64, seq: f64, run: &str) -> C {
        C::Map(vec![
            (C::Text("ts".into()), C::Integer(ts.into())),
            (
                C::Text("fields".into()),
                C::Map(vec![
                    (C::Text("value".into()), C::Float(value)),
                    (C::Text("seq".into()), C::Float(seq)),
                ]),
            ),
            (
                C::Text("tags".into()),
                C::Map(vec![(C::Text("run".into()), C::Text(run.into()))]),
            ),
        ])
    }

    #[test]
    fn names_and_topics() {
        assert_eq!(device_name(7), "dev-00007");
        assert_eq!(client_id("1-1764126000", 42), "sim-1-1764126000-00042");
        assert_eq!(
            topic("telemetry", "dev-00007", "env"),
            "telemetry/dev-00007/env"
        );
        assert_eq!(timestamp_ms(1_764_126_000_000, 3), 1_764_126_000_003);
        assert_eq!(device_index("dev-00042"), Some(42));
        assert_eq!(device_index("dev-12345"), Some(12345));
        assert_eq!(device_index("gateway"), None);
    }

    #[test]
    fn single_cbor_reading_is_a_map() {
        let r = Reading::new("r1", 1_764_126_000_000, 3, 21.5);
        let bytes = encode(&[r], Encoding::Cbor).expect("encode");
        let decoded: C = ciborium::from_reader(bytes.as_slice()).expect("decode");
        assert_eq!(decoded, cbor_reading(1_764_126_000_003, 21.5, 3.0, "r1"));
    }

    #[test]
    fn several_cbor_readings_are_an_array() {
        let rs = [
            Reading::new("r1", 1000, 0, 1.25),
            Reading::new("r1", 1000, 1, -2.5),
        ];
        let bytes = encode(&rs, Encoding::Cbor).expect("encode");
        let decoded: C = ciborium::from_reader(bytes.as_slice()).expect("decode");
        assert_eq!(
            decoded,
            C::Array(vec![
                cbor_reading(1000, 1.25, 0.0, "r1"),
                cbor_reading(1001, -2.5, 1.0, "r1"),
            ])
        );
    }

    #[test]
    fn json_readings() {
        let one = encode(&[Reading::new("r2", 5000, 9, 0.5)], Encoding::Json).expect("encode");
        let decoded: serde_json::Value = serde_json::from_slice(&one).expect("decode");
        assert_eq!(
            decoded,
            json!({"ts": 5009, "fields": {"value": 0.5, "seq": 9.0}, "tags": {"run": "r2"}})
        );

        let rs = [
            Reading::new("r2", 5000, 0, 1.0),
            Reading::new("r2", 5000, 1, 2.0),
        ];
        let many = encode(&rs, Encoding::Json).expect("encode");
        let decoded: serde_json::Value = serde_json::from_slice(&many).expect("decode");
        assert_eq!(
            decoded,
            json!([
                {"ts": 5000, "fields": {"value": 1.0, "seq": 0.0}, "tags": {"run": "r2"}},
                {"ts": 5001, "fields": {"value": 2.0, "seq": 1.0}, "tags": {"run": "r2"}},
            ])
        );
        // The gateway sniffs the format from the first byte when there is no content type.
        assert_eq!(one[0], b'{');
        assert_eq!(many[0], b'[');
    }
}
