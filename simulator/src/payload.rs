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
    match (readings, encoding) {
        (_, Encoding::Cbor) => Ok(cbor(readings)),
        ([one], Encoding::Json) => encode_value(one, encoding),
        (many, Encoding::Json) => encode_value(many, encoding),
    }
}

/// The CBOR of `readings`, byte for byte what ciborium writes for them (a test holds it to
/// that), written directly: through serde, encoding took 40% of the publishers' CPU in the
/// benchmark, CPU that the gateway and the sink share on one machine.
fn cbor(readings: &[Reading<'_>]) -> Vec<u8> {
    let per_reading = 48 + readings.first().map_or(0, |r| r.tags.run.len());
    let mut out = Vec::with_capacity(9 + readings.len() * per_reading);
    if readings.len() != 1 {
        cbor_head(&mut out, 4, readings.len() as u64);
    }
    for r in readings {
        // A map of 3: ts, fields (a map of 2: value, seq), tags (a map of 1: run).
        out.push(0xa3);
        cbor_text(&mut out, "ts");
        match u64::try_from(r.ts) {
            Ok(ts) => cbor_head(&mut out, 0, ts),
            Err(_) => cbor_head(&mut out, 1, !(r.ts as u64)),
        }
        cbor_text(&mut out, "fields");
        out.push(0xa2);
        cbor_text(&mut out, "value");
        cbor_float(&mut out, r.fields.value);
        cbor_text(&mut out, "seq");
        cbor_float(&mut out, r.fields.seq);
        cbor_text(&mut out, "tags");
        out.push(0xa1);
        cbor_text(&mut out, "run");
        cbor_text(&mut out, r.tags.run);
    }
    out
}

/// A header of major type `major` with the shortest argument (RFC 8949 §3.1).
fn cbor_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn cbor_text(out: &mut Vec<u8>, s: &str) {
    cbor_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The shortest float that holds `v` exactly, as ciborium chooses it.
fn cbor_float(out: &mut Vec<u8>, v: f64) {
    let half = half::f16::from_f64(v);
    if f64::from(half).to_bits() == v.to_bits() {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
    } else if f64::from(v as f32).to_bits() == v.to_bits() {
        out.push(0xfa);
        out.extend_from_slice(&(v as f32).to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend_from_slice(&v.to_be_bytes());
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
    fn cbor_is_what_ciborium_writes() {
        let runs = ["r", "embedded-100-8000-3", &"x".repeat(300)];
        let values = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            21.5,
            21.123,
            65504.0,
            65505.0,
            1e-8,
            1e300,
            -2.5e-320,
            f64::MAX,
            f64::MIN_POSITIVE,
            0.1,
            16_777_217.0,
        ];
        let timestamps = [
            0,
            23,
            24,
            255,
            256,
            65_535,
            65_536,
            4_294_967_295,
            4_294_967_296,
            1_764_126_000_123,
            i64::MAX,
            -1,
            -24,
            -25,
            -1_000_000,
            i64::MIN,
        ];
        let mut readings = Vec::new();
        for (i, ts) in timestamps.iter().enumerate() {
            for (j, v) in values.iter().enumerate() {
                let run = runs[(i + j) % runs.len()];
                readings.push(Reading::at(run, *ts, (i * 1000 + j * 37) as u64, *v));
            }
        }
        for seq in [0u64, 2048, 2049, 1 << 24, (1 << 24) + 1, 1 << 53] {
            readings.push(Reading::at("r", 1, seq, 20.0 + seq as f64 / 7.0));
        }
        let serde = |r: &[Reading<'_>]| -> Vec<u8> {
            let mut out = Vec::new();
            match r {
                [one] => ciborium::into_writer(one, &mut out),
                many => ciborium::into_writer(many, &mut out),
            }
            .expect("ciborium encodes");
            out
        };
        for r in &readings {
            assert_eq!(
                cbor(std::slice::from_ref(r)),
                serde(std::slice::from_ref(r)),
                "{r:?}"
            );
        }
        for n in [0, 2, 23, 24, 100, readings.len()] {
            assert_eq!(cbor(&readings[..n]), serde(&readings[..n]), "{n} readings");
        }
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
