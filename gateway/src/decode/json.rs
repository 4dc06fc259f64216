//! JSON (RFC 8259) payloads, parsed with serde_json and walked into the same builder as CBOR.

use serde_json::Value;

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
    for (key, value) in map {
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
                        Value::Number(n) => b.add_field_number(key, number(n), limits),
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
                        Value::Number(n) => b.add_tag_number(key, number(n)),
                        Value::Bool(v) => b.add_tag_bool(key, *v),
                        Value::Array(_) | Value::Object(_) => b.nested(key),
                        Value::Null => b.bad_value(key, "null"),
                    }
                }
            }
            "ts" => match value {
                Value::Number(n) => b.set_ts(match number(n) {
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

fn number(n: &serde_json::Number) -> Number {
    if let Some(i) = n.as_i64() {
        Number::Int(i.into())
    } else if let Some(u) = n.as_u64() {
        Number::Int(u.into())
    } else {
        // serde_json refuses NaN and infinities at parse time, so this is a finite float.
        Number::Float(n.as_f64().unwrap_or(f64::NAN))
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
