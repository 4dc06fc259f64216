//! InfluxDB line protocol encoding (docs/contract.md §2).
//!
//! Ours on purpose: the `influxdb2` crate's `DataPoint` neither escapes newlines nor backslashes
//! and happily writes `NaN`. Everything here appends to one caller-owned buffer, so encoding a
//! reading allocates nothing per field.
//!
//! Escaping, per the line protocol reference:
//!
//! | element               | escaped with a backslash       |
//! |-----------------------|--------------------------------|
//! | measurement           | comma, space                   |
//! | tag key, tag value    | comma, equals sign, space      |
//! | field key             | comma, equals sign, space      |
//! | string field value    | double quote, backslash        |
//!
//! A backslash inside a name is written as it is: InfluxDB 1.x keeps `\\` in a tag as two
//! backslashes while newer parsers read it as one, but a single backslash before an ordinary
//! character means itself to all of them. A name that *ends* in a backslash, or has one right
//! before a comma, equals sign, space or another backslash, has no spelling that every InfluxDB reads back
//! unchanged (1.x answers 400), so the decoder refuses it ([`unencodable_backslash`]). Line
//! protocol has no escape for a newline or other control character in a name either; the
//! decoder refuses those too, and line breaks inside string field values ("line protocol does
//! not support the newline character in tag values or field values"; VictoriaMetrics silently
//! drops such a line).

/// True when `name` holds a backslash that line protocol cannot carry unambiguously.
pub fn unencodable_backslash(name: &str) -> bool {
    name.ends_with('\\')
        || name
            .as_bytes()
            .windows(2)
            .any(|w| w[0] == b'\\' && matches!(w[1], b',' | b'=' | b' ' | b'\\'))
}

/// Why a tag key, tag value or field key cannot be written as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameFault {
    /// A control character (Unicode Cc): line protocol has no escape for it.
    Control,
    /// See [`unencodable_backslash`].
    Backslash,
}

/// Checks a name for both faults, control characters first.
pub fn name_fault(name: &str) -> Option<NameFault> {
    // Every name is checked, most hold none of the bytes either check looks at: one pass
    // without branches rules them out. 0xC2 starts U+0080..U+00BF, where the C1 controls are.
    let suspect = name.as_bytes().iter().fold(false, |acc, &b| {
        acc | (b < 0x20) | (b == 0x7f) | (b == 0xc2) | (b == b'\\')
    });
    if !suspect {
        None
    } else if name.chars().any(char::is_control) {
        Some(NameFault::Control)
    } else if unencodable_backslash(name) {
        Some(NameFault::Backslash)
    } else {
        None
    }
}

/// A field value as the sink stores it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FieldValue<'a> {
    Float(f64),
    Integer(i64),
    Bool(bool),
    Text(&'a str),
}

/// Appends `measurement` escaped for the measurement position.
pub fn push_measurement(out: &mut Vec<u8>, measurement: &str) {
    push_escaped(out, measurement, |b| matches!(b, b',' | b' '));
}

/// Appends a tag key, tag value or field key, escaped.
pub fn push_name(out: &mut Vec<u8>, name: &str) {
    push_escaped(out, name, |b| matches!(b, b',' | b'=' | b' '));
}

/// Appends `,key=value` for one tag.
pub fn push_tag(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b',');
    push_name(out, key);
    out.push(b'=');
    push_name(out, value);
}

/// Appends `key=value` for one field; `first` decides whether a comma goes before it.
///
/// Non-finite floats must have been refused by the caller: line protocol has no spelling for
/// them (the decoder rejects them with `non_finite`).
pub fn push_field(out: &mut Vec<u8>, first: bool, key: &str, value: FieldValue<'_>) {
    if !first {
        out.push(b',');
    }
    push_name(out, key);
    out.push(b'=');
    match value {
        FieldValue::Float(v) => push_float(out, v),
        FieldValue::Integer(v) => {
            let mut buf = itoa::Buffer::new();
            out.extend_from_slice(buf.format(v).as_bytes());
            out.push(b'i');
        }
        FieldValue::Bool(v) => out.extend_from_slice(if v { b"true" } else { b"false" }),
        FieldValue::Text(s) => {
            out.push(b'"');
            push_escaped(out, s, |b| matches!(b, b'"' | b'\\'));
            out.push(b'"');
        }
    }
}

/// Writes a finite float. Whole numbers (counts, integer readings kept as floats) are common
/// and take the integer formatter: line protocol reads `40` without a suffix as a float.
fn push_float(out: &mut Vec<u8>, v: f64) {
    debug_assert!(
        v.is_finite(),
        "non-finite floats are refused by the decoder"
    );
    // Exactly representable integers only, and not -0.0 (which must keep its sign). The
    // round trip through i64 tests for a whole number without a call to `trunc`.
    let whole = v as i64;
    if v.abs() < 9.0e15 && whole as f64 == v && (v != 0.0 || v.is_sign_positive()) {
        let mut buf = itoa::Buffer::new();
        out.extend_from_slice(buf.format(whole).as_bytes());
    } else {
        let mut buf = ryu::Buffer::new();
        out.extend_from_slice(buf.format_finite(v).as_bytes());
    }
}

/// Appends ` <timestamp>\n`, ending the line.
pub fn push_timestamp(out: &mut Vec<u8>, ts_ns: i64) {
    out.push(b' ');
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(buf.format(ts_ns).as_bytes());
    out.push(b'\n');
}

#[inline]
fn push_escaped(out: &mut Vec<u8>, s: &str, needs_escape: impl Fn(u8) -> bool) {
    let bytes = s.as_bytes();
    // Most names need no escaping at all: a pass without branches finds that out, and they
    // are copied in one go.
    if !bytes.iter().fold(false, |acc, &b| acc | needs_escape(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    // Otherwise copy the runs between special bytes.
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if needs_escape(b) {
            out.extend_from_slice(&bytes[start..i]);
            out.push(b'\\');
            out.push(b);
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(
        measurement: &str,
        tags: &[(&str, &str)],
        fields: &[(&str, FieldValue<'_>)],
        ts: i64,
    ) -> String {
        let mut out = Vec::new();
        push_measurement(&mut out, measurement);
        for (k, v) in tags {
            push_tag(&mut out, k, v);
        }
        out.push(b' ');
        for (i, (k, v)) in fields.iter().enumerate() {
            push_field(&mut out, i == 0, k, *v);
        }
        push_timestamp(&mut out, ts);
        String::from_utf8(out).expect("encoder writes UTF-8")
    }

    #[test]
    fn escaping_table() {
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a [(&'a str, FieldValue<'a>)],
            &'a str,
        );
        let cases: &[Case] = &[
            ("m", &[], &[("f", FieldValue::Float(1.5))], "m f=1.5 1\n"),
            (
                "a,b c",
                &[],
                &[("f", FieldValue::Float(1.0))],
                "a\\,b\\ c f=1 1\n",
            ),
            ("a=b", &[], &[("f", FieldValue::Float(1.0))], "a=b f=1 1\n"),
            (
                "m",
                &[("k,=  ", "v,= ")],
                &[("f", FieldValue::Bool(true))],
                "m,k\\,\\=\\ \\ =v\\,\\=\\  f=true 1\n",
            ),
            (
                "m",
                &[("k", "back\\slash")],
                &[("f", FieldValue::Bool(false))],
                "m,k=back\\slash f=false 1\n",
            ),
            (
                "m",
                &[],
                &[("f k=,", FieldValue::Integer(-3))],
                "m f\\ k\\=\\,=-3i 1\n",
            ),
            (
                "m",
                &[],
                &[("s", FieldValue::Text("say \"hi\" \\ bye"))],
                "m s=\"say \\\"hi\\\" \\\\ bye\" 1\n",
            ),
            (
                "m",
                &[],
                &[("s", FieldValue::Text("tab\there, a=b c"))],
                "m s=\"tab\there, a=b c\" 1\n",
            ),
            (
                "m",
                &[],
                &[("f", FieldValue::Float(1e300))],
                "m f=1e300 1\n",
            ),
            (
                "m",
                &[],
                &[("a", FieldValue::Float(0.1)), ("b", FieldValue::Integer(2))],
                "m a=0.1,b=2i 1\n",
            ),
            ("m", &[], &[("f", FieldValue::Float(-0.0))], "m f=-0.0 1\n"),
            (
                "m",
                &[("ü", "日本")],
                &[("f", FieldValue::Float(2.0))],
                "m,ü=日本 f=2 1\n",
            ),
        ];
        for (m, tags, fields, want) in cases {
            assert_eq!(
                line(m, tags, fields, 1),
                *want,
                "case {m:?} {tags:?} {fields:?}"
            );
        }
    }

    #[test]
    fn backslashes_that_cannot_be_carried() {
        for bad in ["end\\", "a\\,b", "a\\=b", "a\\ b", "\\", "a\\\\b"] {
            assert!(unencodable_backslash(bad), "{bad:?}");
        }
        for ok in ["a\\b", "\\n", "plain", "a,b=c d"] {
            assert!(!unencodable_backslash(ok), "{ok:?}");
        }
    }

    #[test]
    fn name_faults_agree_with_the_character_rules() {
        let cases = [
            ("plain", None),
            ("°C", None),
            ("naïve", None),
            ("a\\b", None),
            ("tab\there", Some(NameFault::Control)),
            ("del\u{7f}", Some(NameFault::Control)),
            ("c1\u{85}", Some(NameFault::Control)),
            ("c1\u{9f}", Some(NameFault::Control)),
            ("\u{a0}nbsp", None),
            ("end\\", Some(NameFault::Backslash)),
            ("both\\\n", Some(NameFault::Control)),
        ];
        for (name, want) in cases {
            assert_eq!(name_fault(name), want, "{name:?}");
        }
        // Every character up to U+00FF, alone and between letters.
        for c in (0u32..=0xff).filter_map(char::from_u32) {
            for name in [c.to_string(), format!("a{c}b")] {
                let want = if name.chars().any(char::is_control) {
                    Some(NameFault::Control)
                } else if unencodable_backslash(&name) {
                    Some(NameFault::Backslash)
                } else {
                    None
                };
                assert_eq!(name_fault(&name), want, "{name:?}");
            }
        }
    }

    #[test]
    fn negative_and_large_timestamps() {
        assert!(line("m", &[], &[("f", FieldValue::Float(1.0))], -5).ends_with(" -5\n"));
        assert!(line("m", &[], &[("f", FieldValue::Float(1.0))], i64::MAX)
            .ends_with(" 9223372036854775807\n"));
    }

    mod roundtrip {
        use super::*;
        use influxdb_line_protocol::{parse_lines, FieldValue as PF};
        use proptest::prelude::*;

        // Names: any printable text without control characters (the decoder refuses those).
        fn name() -> impl Strategy<Value = String> {
            // The decoder refuses the names line protocol cannot carry (see the module doc).
            "[^\\p{Cc}]{1,12}".prop_filter("encodable names", |s| {
                !s.starts_with('#') && !unencodable_backslash(s)
            })
        }

        fn value() -> impl Strategy<Value = OwnedValue> {
            prop_oneof![
                any::<f64>()
                    .prop_filter("finite", |v| v.is_finite())
                    .prop_map(OwnedValue::Float),
                any::<i64>().prop_map(OwnedValue::Integer),
                any::<bool>().prop_map(OwnedValue::Bool),
                "[^\r\n]{0,20}".prop_map(OwnedValue::Text),
            ]
        }

        #[derive(Debug, Clone)]
        enum OwnedValue {
            Float(f64),
            Integer(i64),
            Bool(bool),
            Text(String),
        }

        impl OwnedValue {
            fn borrow(&self) -> FieldValue<'_> {
                match self {
                    OwnedValue::Float(v) => FieldValue::Float(*v),
                    OwnedValue::Integer(v) => FieldValue::Integer(*v),
                    OwnedValue::Bool(v) => FieldValue::Bool(*v),
                    OwnedValue::Text(v) => FieldValue::Text(v),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// What we encode, an independent parser (InfluxDB IOx's) reads back unchanged.
            #[test]
            fn parses_back(
                measurement in name(),
                tags in proptest::collection::btree_map(name(), name(), 0..4),
                fields in proptest::collection::btree_map(name(), value(), 1..5),
                ts in any::<i64>(),
            ) {
                let tags: Vec<(&str, &str)> = tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let field_refs: Vec<(&str, FieldValue)> = fields.iter().map(|(k, v)| (k.as_str(), v.borrow())).collect();
                let text = line(&measurement, &tags, &field_refs, ts);
                let parsed: Vec<_> = parse_lines(&text).collect();
                prop_assert_eq!(parsed.len(), 1, "{:?}", text);
                let parsed = parsed.into_iter().next().expect("one line").map_err(|e| TestCaseError::fail(format!("{e} in {text:?}")))?;
                prop_assert_eq!(parsed.series.measurement.to_string(), measurement);
                let got_tags: Vec<(String, String)> = parsed.series.tag_set.unwrap_or_default().iter()
                    .map(|(k, v)| (k.to_string(), v.to_string())).collect();
                let want_tags: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                prop_assert_eq!(got_tags, want_tags);
                prop_assert_eq!(parsed.field_set.len(), fields.len());
                for ((k, v), (pk, pv)) in fields.iter().zip(parsed.field_set.iter()) {
                    prop_assert_eq!(k, &pk.to_string());
                    match (v, pv) {
                        (OwnedValue::Float(a), PF::F64(b)) => prop_assert_eq!(a.to_bits(), b.to_bits()),
                        (OwnedValue::Integer(a), PF::I64(b)) => prop_assert_eq!(a, b),
                        (OwnedValue::Bool(a), PF::Boolean(b)) => prop_assert_eq!(a, b),
                        (OwnedValue::Text(a), PF::String(b)) => prop_assert_eq!(a, &b.to_string()),
                        (a, b) => prop_assert!(false, "{a:?} came back as {b:?}"),
                    }
                }
                prop_assert_eq!(parsed.timestamp, Some(ts));
            }
        }
    }
}
