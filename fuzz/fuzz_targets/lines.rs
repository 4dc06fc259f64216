//! Readings built from arbitrary names and values, sent as JSON: what the decoder accepts is
//! written so that an independent line-protocol parser reads back the same tags and fields.
#![no_main]

use arbitrary::Arbitrary;
use gateway::decode::{Decoder, Limits, TopicPattern};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Value {
    Number(f64),
    Bool(bool),
    Text(String),
}

#[derive(Debug, Arbitrary)]
struct Reading {
    tags: Vec<(String, String)>,
    fields: Vec<(String, Value)>,
}

fuzz_target!(|reading: Reading| {
    let mut tags = serde_json::Map::new();
    for (k, v) in &reading.tags {
        tags.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    let mut fields = serde_json::Map::new();
    for (k, v) in &reading.fields {
        let v = match v {
            Value::Number(n) => match serde_json::Number::from_f64(*n) {
                Some(n) => serde_json::Value::Number(n),
                None => return,
            },
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Text(s) => serde_json::Value::String(s.clone()),
        };
        fields.insert(k.clone(), v);
    }
    let payload = serde_json::json!({"ts": 1_764_000_000_000i64, "tags": tags, "fields": fields});
    let payload = serde_json::to_vec(&payload).expect("json");
    let pattern = TopicPattern::parse("telemetry/{device}/{measurement}").expect("pattern");
    let mut decoder = Decoder::new(Limits::default(), pattern);
    let mut out = Vec::new();
    let now = 1_764_000_000_000_000_000;
    let Ok(outcome) = decoder.decode(
        "telemetry/dev-1/env",
        &payload,
        Some("application/json"),
        now,
        &mut out,
    ) else {
        return;
    };
    if outcome.accepted == 0 {
        return;
    }
    // Accepted whole (no field or tag refused): every one must come back as it went in.
    let whole = outcome.rejected.is_empty();
    let text = std::str::from_utf8(&out).expect("UTF-8");
    let parsed = influxdb_line_protocol::parse_lines(text)
        .next()
        .expect("one line")
        .unwrap_or_else(|e| panic!("{e} in {text:?}"));
    let got_tags: std::collections::BTreeMap<String, String> = parsed
        .series
        .tag_set
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got_tags.get("device").map(String::as_str), Some("dev-1"));
    if !whole {
        return;
    }
    for (k, v) in &tags {
        if k != "device" {
            assert_eq!(
                got_tags.get(k),
                v.as_str().map(str::to_owned).as_ref(),
                "tag {k:?} in {text:?}"
            );
        }
    }
    // A field as text: strings unescaped (FieldValue's Display writes line protocol).
    let got: std::collections::BTreeMap<String, String> = parsed
        .field_set
        .iter()
        .map(|(k, v)| {
            let v = match v {
                influxdb_line_protocol::FieldValue::String(s) => s.to_string(),
                other => other.to_string(),
            };
            (k.to_string(), v)
        })
        .collect();
    assert_eq!(got.len(), fields.len(), "{text:?}");
    for (k, v) in &fields {
        let want = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => b.to_string(),
            serde_json::Value::Number(n) => n.as_f64().expect("finite").to_string(),
            _ => unreachable!("only strings, booleans and numbers are built"),
        };
        let have = got
            .get(k)
            .unwrap_or_else(|| panic!("field {k:?} missing in {text:?}"));
        if let serde_json::Value::Number(n) = v {
            let have: f64 = have.parse().expect("a float");
            assert_eq!(
                have.to_bits(),
                n.as_f64().expect("finite").to_bits(),
                "field {k:?} in {text:?}"
            );
        } else {
            assert_eq!(have, &want, "field {k:?} in {text:?}");
        }
    }
});
