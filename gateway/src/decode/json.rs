//! JSON (RFC 8259) payloads, parsed with serde_json and walked into the same builder as CBOR.
//!
//! Parsed into our own [`Value`], not serde_json's: its maps keep the last of two equal keys
//! and drop the other without a word, where ours keep both, so that the builder refuses a
//! duplicate key as it does in CBOR.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{finish_reading, DecodeError, Decoded, Number, RawTs, ReadingBuilder, Target, Val};

pub(crate) fn decode(
    payload: &[u8],
    target: &Target<'_>,
    builder: &mut ReadingBuilder,
    out: &mut Vec<u8>,
    outcome: &mut Decoded,
) -> Result<(), DecodeError> {
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        if e.is_eof() {
            DecodeError::Truncated(e.to_string())
        } else {
            DecodeError::MalformedJson(e.to_string())
        }
    })?;
    match value {
        Value::Array(items) => {
            let max = target.limits.max_readings_per_payload;
            if items.len() > max {
                return Err(DecodeError::TooManyReadings {
                    count: items.len(),
                    max,
                });
            }
            for item in &items {
                reading(item, target, builder, out, outcome);
            }
        }
        other => reading(&other, target, builder, out, outcome),
    }
    Ok(())
}

fn reading(
    value: &Value,
    target: &Target<'_>,
    b: &mut ReadingBuilder,
    out: &mut Vec<u8>,
    outcome: &mut Decoded,
) {
    let Value::Object(map) = value else {
        outcome.rejected.push(DecodeError::NotAMap(kind(value)));
        return;
    };
    b.reset();
    let limits = target.limits;
    for (key, value) in map.iter() {
        match key.as_str() {
            "fields" => {
                b.saw_fields();
                let Value::Object(fields) = value else {
                    b.fail(DecodeError::BadFields(kind(value)));
                    continue;
                };
                for (k, v) in fields {
                    let key = b.push_text(k);
                    if !b.check_key(key, limits) {
                        continue;
                    }
                    match v {
                        Value::Number(n) => b.add_field_number(key, *n, limits),
                        Value::Bool(v) => b.add_field(key, Val::Bool(*v)),
                        Value::String(s) => {
                            if b.check_text_len(s.len(), limits) {
                                let span = b.push_text(s);
                                b.add_text_field(key, span);
                            }
                        }
                        Value::Array(_) | Value::Object(_) => b.nested(key),
                        Value::Null => b.bad_value(key, "null"),
                    }
                }
            }
            "tags" => {
                let Value::Object(tags) = value else {
                    b.fail(DecodeError::BadTags(kind(value)));
                    continue;
                };
                for (k, v) in tags {
                    let key = b.push_text(k);
                    if !b.check_key(key, limits) {
                        continue;
                    }
                    match v {
                        Value::String(s) => {
                            if b.check_text_len(s.len(), limits) {
                                let span = b.push_text(s);
                                b.add_tag(key, span);
                            }
                        }
                        Value::Number(n) => b.add_tag_number(key, *n),
                        Value::Bool(v) => b.add_tag_bool(key, *v),
                        Value::Array(_) | Value::Object(_) => b.nested(key),
                        Value::Null => b.bad_value(key, "null"),
                    }
                }
            }
            "ts" => match value {
                Value::Number(n) => b.set_ts(match *n {
                    Number::Int(i) => RawTs::Int(i),
                    Number::Float(f) => RawTs::Seconds(f),
                }),
                Value::String(s) if s.len() <= 64 => {
                    let span = b.push_text(s);
                    b.set_ts(RawTs::Text(span));
                }
                Value::String(_) => b.fail(DecodeError::BadTimestamp(
                    "text longer than 64 bytes".into(),
                )),
                other => b.fail(DecodeError::BadTimestamp(format!(
                    "expected a number or text, found {}",
                    kind(other)
                ))),
            },
            other => b.fail(DecodeError::UnknownKey(other.chars().take(64).collect())),
        }
    }
    finish_reading(b, target, out, outcome);
}

/// A JSON value whose maps keep every entry, in order.
#[derive(Debug)]
enum Value {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(Number::Int(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(Number::Int(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json refuses NaN and infinities at parse time, so this is a finite float.
        Ok(Value::Number(Number::Float(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Value::Object(entries))
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "an array",
        Value::Object(_) => "a map",
    }
}
