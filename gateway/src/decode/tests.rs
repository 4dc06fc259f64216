//! Table tests for docs/contract.md §1: every payload form, every timestamp form, every limit.

use super::*;
use ciborium::value::Value as C;

const NOW: i64 = 1_764_126_000_000_000_000; // 2025-11-26T03:00:00Z in ns

fn decoder(limits: Limits) -> Decoder {
    Decoder::new(
        limits,
        TopicPattern::parse("telemetry/{device}/{measurement}").expect("valid"),
    )
}

fn run(payload: &[u8], limits: Limits) -> (Result<Decoded, DecodeError>, String) {
    let mut out = Vec::new();
    let r = decoder(limits).decode("telemetry/dev-1/env", payload, None, NOW, &mut out);
    (r, String::from_utf8(out).expect("utf-8"))
}

fn json(payload: &str) -> (Result<Decoded, DecodeError>, String) {
    run(payload.as_bytes(), Limits::default())
}

fn cbor(value: C) -> (Result<Decoded, DecodeError>, String) {
    run(&to_cbor(&value), Limits::default())
}

fn to_cbor(value: &C) -> Vec<u8> {
    let mut buf = Vec::new();
    ciborium::into_writer(value, &mut buf).expect("encodes");
    buf
}

fn map(entries: Vec<(&str, C)>) -> C {
    C::Map(
        entries
            .into_iter()
            .map(|(k, v)| (C::Text(k.into()), v))
            .collect(),
    )
}

fn reasons(r: &Result<Decoded, DecodeError>) -> Vec<&'static str> {
    match r {
        Ok(o) => o.rejected.iter().map(|e| e.reason().label()).collect(),
        Err(e) => vec![e.reason().label()],
    }
}

#[test]
fn contract_example_in_json_and_cbor_gives_the_same_line() {
    // Fields in the payload's order, in both encodings.
    let want = "env,device=dev-1,site=north temp=21.5,hum=40,door=false 1764126000123000000\n";
    let (r, out) = json(
        r#"{"ts": 1764126000123, "fields": {"temp": 21.5, "hum": 40, "door": false}, "tags": {"site": "north"}}"#,
    );
    assert_eq!(r.expect("ok").accepted, 1);
    assert_eq!(out, want);
    let (r, out) = cbor(map(vec![
        ("ts", C::Integer(1_764_126_000_123i64.into())),
        (
            "fields",
            map(vec![
                ("temp", C::Float(21.5)),
                ("hum", C::Integer(40.into())),
                ("door", C::Bool(false)),
            ]),
        ),
        ("tags", map(vec![("site", C::Text("north".into()))])),
    ]));
    assert_eq!(r.expect("ok").accepted, 1);
    assert_eq!(out, want);
}

#[test]
fn arrays_of_readings_and_per_reading_rejection() {
    let (r, out) = json(
        r#"[{"fields": {"a": 1}}, {"fields": {}}, {"fields": {"b": "x"}, "ts": 1764126000000}, 7, {"tags": {}}]"#,
    );
    let o = r.expect("payload readable");
    assert_eq!(o.accepted, 2);
    assert_eq!(
        reasons(&Ok(o)),
        vec!["empty_fields", "not_a_map", "missing_fields"]
    );
    assert_eq!(
        out,
        format!("env,device=dev-1 a=1 {NOW}\nenv,device=dev-1 b=\"x\" 1764126000000000000\n")
    );
}

#[test]
fn timestamp_forms() {
    let ms = 1_764_126_000_123i64;
    let ns = ms * 1_000_000;
    let f = |ts: C| {
        map(vec![
            ("ts", ts),
            ("fields", map(vec![("v", C::Float(1.0))])),
        ])
    };
    let line = |ns: i64| format!("env,device=dev-1 v=1 {ns}\n");
    assert_eq!(
        cbor(f(C::Integer(ms.into()))).1,
        line(ns),
        "integer: ms by default"
    );
    assert_eq!(
        cbor(f(C::Float(1_764_126_000.123))).1,
        line(ns),
        "float seconds"
    );
    assert_eq!(
        cbor(f(C::Tag(1, Box::new(C::Integer(1_764_126_000.into()))))).1,
        line(1_764_126_000_000_000_000),
        "tag 1 int"
    );
    assert_eq!(
        cbor(f(C::Tag(1, Box::new(C::Float(1_764_126_000.5))))).1,
        line(1_764_126_000_500_000_000),
        "tag 1 float"
    );
    assert_eq!(
        cbor(f(C::Tag(
            0,
            Box::new(C::Text("2025-11-26T03:00:00.123456789Z".into()))
        )))
        .1,
        line(1_764_126_000_123_456_789),
        "tag 0"
    );
    assert_eq!(
        cbor(f(C::Text("2025-11-26T04:00:00+01:00".into()))).1,
        line(NOW),
        "RFC 3339 text with offset"
    );
    assert_eq!(
        json(r#"{"ts": "2025-11-26T03:00:00Z", "fields": {"v": 1.0}}"#).1,
        line(NOW)
    );
    assert_eq!(
        json(r#"{"fields": {"v": 1}}"#).1,
        line(NOW),
        "missing: receive time"
    );
    for (unit, ts) in [
        (TimestampUnit::S, 1_764_126_000i64),
        (TimestampUnit::Us, 1_764_126_000_000_000),
        (TimestampUnit::Ns, NOW),
    ] {
        let limits = Limits {
            timestamp_unit: unit,
            ..Limits::default()
        };
        assert_eq!(
            run(&to_cbor(&f(C::Integer(ts.into()))), limits).1,
            line(NOW),
            "{unit:?}"
        );
    }
}

#[test]
fn bad_timestamps() {
    let f = |ts: &str| json(&format!(r#"{{"ts": {ts}, "fields": {{"v": 1}}}}"#));
    assert_eq!(reasons(&f(r#""yesterday""#).0), vec!["bad_timestamp"]);
    assert_eq!(reasons(&f("true").0), vec!["bad_timestamp"]);
    assert_eq!(
        reasons(&f("18446744073709551615").0),
        vec!["bad_timestamp"],
        "overflows ns"
    );
    assert_eq!(reasons(&f("1").0), vec!["timestamp_too_old"]);
    assert_eq!(
        reasons(&f("4102444800000").0),
        vec!["timestamp_in_future"],
        "2100"
    );
    let lenient = Limits {
        max_age_ns: 0,
        max_future_skew_ns: 0,
        ..Limits::default()
    };
    assert_eq!(
        run(br#"{"ts": 1, "fields": {"v": 1}}"#, lenient).1,
        "env,device=dev-1 v=1 1000000\n"
    );
    assert_eq!(
        reasons(
            &cbor(map(vec![
                ("ts", C::Tag(7, Box::new(C::Integer(1.into())))),
                ("fields", map(vec![("v", C::Bool(true))]))
            ]))
            .0
        ),
        vec!["bad_timestamp"]
    );
}

#[test]
fn numbers_are_floats_unless_integers_are_kept() {
    assert_eq!(
        json(r#"{"fields": {"n": 40, "x": -3}}"#).1,
        format!("env,device=dev-1 n=40,x=-3 {NOW}\n")
    );
    let keep = Limits {
        keep_integers: true,
        ..Limits::default()
    };
    assert_eq!(
        run(br#"{"fields": {"n": 40, "f": 40.5}}"#, keep.clone()).1,
        format!("env,device=dev-1 n=40i,f=40.5 {NOW}\n")
    );
    let (r, _) = run(br#"{"fields": {"n": 18446744073709551615}}"#, keep);
    assert_eq!(reasons(&r), vec!["integer_out_of_range"]);
}

#[test]
fn tags_turn_scalars_into_text_and_the_topic_names_the_device() {
    let (r, out) =
        json(r#"{"fields": {"v": 1}, "tags": {"device": "spoofed", "n": 3, "b": true, "f": 1.5}}"#);
    assert_eq!(r.expect("ok").accepted, 1);
    assert_eq!(
        out,
        format!("env,b=true,device=dev-1,f=1.5,n=3 v=1 {NOW}\n")
    );
}

#[test]
fn escaping_reaches_the_line() {
    let (_, out) =
        json(r#"{"fields": {"a b": "say \"hi\"\\", "c=d": 1}, "tags": {"k,1": "v 1=2"}}"#);
    assert_eq!(
        out,
        format!("env,device=dev-1,k\\,1=v\\ 1\\=2 a\\ b=\"say \\\"hi\\\"\\\\\",c\\=d=1 {NOW}\n")
    );
}

#[test]
fn every_reading_rule_has_its_reason() {
    let cases: &[(&str, &str)] = &[
        (r#"{"fields": {"v": null}}"#, "bad_value"),
        (r#"{"fields": {"v": {"x": 1}}}"#, "nested_value"),
        (r#"{"fields": {"v": [1]}}"#, "nested_value"),
        (r#"{"fields": [1]}"#, "bad_fields"),
        (r#"{"fields": {"v": 1}, "tags": [1]}"#, "bad_tags"),
        (
            r#"{"fields": {"v": 1}, "tags": {"t": ""}}"#,
            "empty_tag_value",
        ),
        (
            r#"{"fields": {"v": 1}, "tags": {"t": "a\nb"}}"#,
            "control_character",
        ),
        (r#"{"fields": {"v": 1}, "tags": {"t": null}}"#, "bad_value"),
        (r#"{"fields": {"": 1}}"#, "empty_key"),
        (r#"{"fields": {"s": "two\nlines"}}"#, "control_character"),
        (
            r#"{"fields": {"v": 1}, "tags": {"t": "end\\"}}"#,
            "unencodable_backslash",
        ),
        (r#"{"fields": {"a\\ b": 1}}"#, "unencodable_backslash"),
        (r#"{"fields": {"v": 1}, "extra": 1}"#, "unknown_key"),
        (
            r#"{"fields": {"v": 1}, "tags": {"t": {"n": 1}}}"#,
            "nested_value",
        ),
    ];
    for (payload, reason) in cases {
        assert_eq!(reasons(&json(payload).0), vec![*reason], "{payload}");
    }
    let long_key = format!(r#"{{"fields": {{"{}": 1}}}}"#, "k".repeat(129));
    assert_eq!(reasons(&json(&long_key).0), vec!["key_too_long"]);
    let long_text = format!(r#"{{"fields": {{"s": "{}"}}}}"#, "x".repeat(64 * 1024 + 1));
    assert_eq!(reasons(&json(&long_text).0), vec!["text_too_long"]);
    let many: Vec<String> = (0..257).map(|i| format!(r#""f{i}": 1"#)).collect();
    assert_eq!(
        reasons(&json(&format!(r#"{{"fields": {{{}}}}}"#, many.join(","))).0),
        vec!["too_many_fields"]
    );
}

#[test]
fn cbor_specific_rules() {
    let fields = |v: C| map(vec![("fields", map(vec![("v", v)]))]);
    assert_eq!(
        reasons(&cbor(fields(C::Float(f64::NAN))).0),
        vec!["non_finite"]
    );
    assert_eq!(
        reasons(&cbor(fields(C::Float(f64::INFINITY))).0),
        vec!["non_finite"]
    );
    assert_eq!(
        reasons(&cbor(fields(C::Float(f64::NEG_INFINITY))).0),
        vec!["non_finite"]
    );
    assert_eq!(
        reasons(&cbor(fields(C::Bytes(vec![1, 2]))).0),
        vec!["bad_value"]
    );
    assert_eq!(reasons(&cbor(fields(C::Null)).0), vec!["bad_value"]);
    assert_eq!(
        reasons(&cbor(fields(C::Map(vec![]))).0),
        vec!["nested_value"]
    );
    assert_eq!(
        reasons(&cbor(C::Map(vec![(C::Integer(1.into()), C::Integer(1.into()))])).0),
        vec!["bad_key"]
    );
    let dup = C::Map(vec![(
        C::Text("fields".into()),
        C::Map(vec![
            (C::Text("v".into()), C::Float(1.0)),
            (C::Text("v".into()), C::Float(2.0)),
        ]),
    )]);
    assert_eq!(reasons(&cbor(dup).0), vec!["duplicate_key"]);
    // JSON too: serde_json's own maps kept the last of two equal keys and lost the other
    // without a word (found in review of the docs against the code).
    for payload in [
        r#"{"fields": {"v": 1, "v": 2}}"#,
        r#"{"fields": {"v": 1}, "tags": {"site": "a", "site": "b"}}"#,
    ] {
        assert_eq!(
            reasons(&json(payload).0),
            vec!["duplicate_key"],
            "{payload}"
        );
    }
    // A bad reading in the middle of an array does not disturb its neighbours.
    let arr = C::Array(vec![
        fields(C::Float(1.0)),
        fields(C::Map(vec![(
            C::Text("deep".into()),
            C::Array(vec![C::Null]),
        )])),
        fields(C::Float(3.0)),
    ]);
    let (r, out) = cbor(arr);
    let o = r.expect("readable");
    assert_eq!((o.accepted, reasons(&Ok(o))), (2, vec!["nested_value"]));
    assert_eq!(out.lines().count(), 2);
}

#[test]
fn whole_payload_refusals() {
    assert_eq!(
        reasons(&run(b"", Limits::default()).0),
        vec!["empty_payload"]
    );
    assert_eq!(
        reasons(&run(b"  \n", Limits::default()).0),
        vec!["empty_payload"]
    );
    assert_eq!(reasons(&json(r#"{"fields": {"v": 1"#).0), vec!["truncated"]);
    assert_eq!(
        reasons(&json(r#"{"fields": {"v": NaN}}"#).0),
        vec!["malformed_json"]
    );
    assert_eq!(
        reasons(&json(r#"[{"fields": {"v": 1}}] x"#).0),
        vec!["malformed_json"]
    );
    let good = to_cbor(&map(vec![("fields", map(vec![("v", C::Float(1.0))]))]));
    assert_eq!(
        reasons(&run(&good[..good.len() - 3], Limits::default()).0),
        vec!["truncated"]
    );
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"\xff\x00");
    assert_eq!(
        reasons(&run(&trailing, Limits::default()).0),
        vec!["trailing_bytes"]
    );
    assert_eq!(
        reasons(&run(b"\xff\xfe\xfd garbage", Limits::default()).0),
        vec!["malformed_cbor"]
    );
    let small = Limits {
        max_payload_bytes: 16,
        ..Limits::default()
    };
    assert_eq!(
        reasons(&run(&[b' '; 17], small).0),
        vec!["payload_too_large"]
    );
    let few = Limits {
        max_readings_per_payload: 2,
        ..Limits::default()
    };
    assert_eq!(
        reasons(
            &run(
                br#"[{"fields":{"v":1}},{"fields":{"v":1}},{"fields":{"v":1}}]"#,
                few.clone()
            )
            .0
        ),
        vec!["too_many_readings"]
    );
    let arr = to_cbor(&C::Array(vec![
        map(vec![(
            "fields",
            map(vec![("v", C::Float(1.0))])
        )]);
        3
    ]));
    let (r, out) = run(&arr, few);
    assert_eq!(
        (reasons(&r), out.as_str()),
        (vec!["too_many_readings"], ""),
        "nothing of a refused payload is kept"
    );
    // Deep nesting is refused without deep recursion.
    let mut deep = vec![0xa1, 0x66];
    deep.extend_from_slice(b"fields");
    deep.extend(std::iter::repeat_n(0x81, 10_000));
    deep.push(0x01);
    assert_eq!(reasons(&run(&deep, Limits::default()).0), vec!["too_deep"]);
}

#[test]
fn topics_and_content_types() {
    let mut out = Vec::new();
    let mut d = decoder(Limits::default());
    let r = d.decode(
        "other/dev/env",
        br#"{"fields":{"v":1}}"#,
        None,
        NOW,
        &mut out,
    );
    assert_eq!(reasons(&r), vec!["bad_topic"]);
    let cbor_bytes = to_cbor(&map(vec![("fields", map(vec![("v", C::Float(1.0))]))]));
    let r = d.decode(
        "telemetry/d/m",
        &cbor_bytes,
        Some("application/cbor"),
        NOW,
        &mut out,
    );
    assert_eq!(r.expect("ok").accepted, 1);
    let r = d.decode(
        "telemetry/d/m",
        br#"{"fields":{"v":1}}"#,
        Some("application/json; charset=utf-8"),
        NOW,
        &mut out,
    );
    assert_eq!(r.expect("ok").accepted, 1);
    let r = d.decode(
        "telemetry/d/m",
        br#"{"fields":{"v":1}}"#,
        Some("application/cbor"),
        NOW,
        &mut out,
    );
    assert!(r.is_err(), "a content type overrides sniffing");
    let r = d.decode("telemetry/d/m", b"x", Some("text/plain"), NOW, &mut out);
    assert_eq!(reasons(&r), vec!["unsupported_content_type"]);
    assert_eq!(format_of(b"  \n [", None).expect("sniffed"), Format::Json);
    assert_eq!(format_of(&cbor_bytes, None).expect("sniffed"), Format::Cbor);
}

mod fuzzish {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the bytes, decoding returns; it never panics or hangs.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = run(&bytes, Limits::default());
        }

        /// Valid readings with arbitrary names survive decode and come out as one line each.
        #[test]
        fn valid_cbor_readings_are_accepted(names in proptest::collection::btree_set("[a-z][a-z0-9 ,=]{0,10}", 1..20), v in -1e12f64..1e12) {
            let fields = C::Map(names.iter().map(|n| (C::Text(n.clone()), C::Float(v))).collect());
            let (r, out) = cbor(map(vec![("fields", fields)]));
            prop_assert_eq!(r.expect("valid").accepted, 1);
            prop_assert_eq!(out.lines().count(), 1);
        }
    }
}

/// Found by the `lines` fuzz target: serde_json's default float parsing can be a few units in
/// the last place off, so a device's value reached the sink changed. Every float must come
/// back bit for bit.
#[test]
fn json_floats_reach_the_line_exactly() {
    for text in [
        "-9.604032515753727e-144",
        "2.2250738585072014e-308",
        "0.1",
        "1e300",
    ] {
        let want: f64 = text.parse().expect("a float");
        let (r, out) = json(&format!(
            r#"{{"ts": 1764126000123, "fields": {{"v": {text}}}}}"#
        ));
        assert_eq!(r.expect("ok").accepted, 1);
        let written = out
            .split_once(" v=")
            .and_then(|(_, rest)| rest.split_once(' '))
            .map(|(v, _)| v)
            .expect("the field");
        let got: f64 = written.parse().expect("a float in the line");
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{text} was written as {written}"
        );
    }
}

/// Found by the `cbor` fuzz target: a short key of broken UTF-8 made only its reading fail,
/// while ciborium (and RFC 8949) refuse the payload; it is malformed as a whole now.
#[test]
fn a_short_key_of_broken_utf8_makes_the_cbor_payload_malformed() {
    let mut payload = vec![0x82, 0xa1, 0x66];
    payload.extend_from_slice(b"f\xe9elds");
    payload.push(0xa0);
    payload.extend_from_slice(&to_cbor(&map(vec![(
        "fields",
        map(vec![("temp", C::Float(21.5))]),
    )])));
    let (r, out) = run(&payload, Limits::default());
    assert_eq!(reasons(&r), vec!["malformed_cbor"], "{r:?}");
    assert!(out.is_empty());
}

#[test]
fn a_message_decodes_as_its_readings_would_one_by_one() {
    // The series prefix is reused between readings of one message and between messages of
    // one device: tags that change, repeat, break a rule, name the device or come in another
    // order must give exactly the lines each reading gives alone, from a fresh decoder.
    let reading = |ts: i64, tags: Vec<(&str, &str)>| {
        map(vec![
            ("ts", C::Integer(ts.into())),
            ("fields", map(vec![("v", C::Float(1.5))])),
            (
                "tags",
                C::Map(
                    tags.into_iter()
                        .map(|(k, v)| (C::Text(k.into()), C::Text(v.into())))
                        .collect(),
                ),
            ),
        ])
    };
    let ms = 1_764_126_000_000i64;
    let readings = vec![
        reading(ms, vec![("a", "1")]),
        reading(ms + 1, vec![("a", "1")]),
        reading(ms + 2, vec![("a", "2")]),
        reading(ms + 3, vec![("a", "1"), ("a", "1")]),
        reading(ms + 4, vec![("a", "1")]),
        reading(ms + 5, vec![("device", "other"), ("a", "1")]),
        reading(ms + 6, vec![("a", "1"), ("device", "other")]),
        reading(ms + 7, vec![("b", "1"), ("a", "1")]),
        reading(ms + 8, vec![("a", "1"), ("b", "1")]),
        reading(ms + 9, vec![]),
        reading(ms + 10, vec![("a", "1,2")]),
        reading(ms + 11, vec![("a", "1")]),
    ];
    let alone: Vec<(Vec<&str>, String)> = readings
        .iter()
        .map(|r| {
            let (result, out) = cbor(r.clone());
            (reasons(&result), out)
        })
        .collect();
    let want_lines: String = alone.iter().map(|(_, out)| out.as_str()).collect();
    let want_reasons: Vec<&str> = alone.iter().flat_map(|(r, _)| r.clone()).collect();
    assert_eq!(want_reasons, vec!["duplicate_key"]);

    let mut d = decoder(Limits::default());
    let payload = to_cbor(&C::Array(readings.clone()));
    for topic in [
        "telemetry/dev-1/env",
        "telemetry/dev-2/env",
        "telemetry/dev-1/env",
    ] {
        let mut out = Vec::new();
        let r = d.decode(topic, &payload, None, NOW, &mut out);
        assert_eq!(reasons(&r), want_reasons);
        let got = String::from_utf8(out).expect("utf-8");
        assert_eq!(got, want_lines.replace("dev-1", &topic[10..15]), "{topic}");
    }
    // Another measurement from the same decoder.
    let mut out = Vec::new();
    d.decode("telemetry/dev-1/power", &payload, None, NOW, &mut out)
        .expect("decodes");
    let got = String::from_utf8(out).expect("utf-8");
    assert_eq!(got, want_lines.replace("env,", "power,"));
}
