//! Any payload, as JSON, CBOR or sniffed: never a panic, and every line the decoder writes is
//! line protocol that an independent parser reads, one per accepted reading, with the topic's
//! measurement and device.
#![no_main]

use gateway::decode::{Decoder, Limits, TopicPattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let content_type = match selector % 3 {
        0 => None,
        1 => Some("application/cbor"),
        _ => Some("application/json"),
    };
    let pattern = TopicPattern::parse("telemetry/{device}/{measurement}").expect("pattern");
    let mut decoder = Decoder::new(Limits::default(), pattern);
    let mut out = Vec::new();
    let now = 1_764_000_000_000_000_000;
    let Ok(outcome) = decoder.decode("telemetry/dev-1/env", payload, content_type, now, &mut out)
    else {
        assert!(out.is_empty(), "a refused payload leaves no lines");
        return;
    };
    let text = std::str::from_utf8(&out).expect("line protocol is UTF-8");
    let mut lines = 0u32;
    for parsed in influxdb_line_protocol::parse_lines(text) {
        let parsed = parsed.unwrap_or_else(|e| panic!("{e} in {text:?}"));
        assert_eq!(parsed.series.measurement.to_string(), "env");
        let device = parsed
            .series
            .tag_set
            .unwrap_or_default()
            .iter()
            .find(|(k, _)| k.to_string() == "device")
            .map(|(_, v)| v.to_string());
        assert_eq!(device.as_deref(), Some("dev-1"));
        lines += 1;
    }
    assert_eq!(lines, outcome.accepted, "{text:?}");
});
