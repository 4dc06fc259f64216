//! The CBOR reader against ciborium: bytes the gateway takes readings from are CBOR that
//! ciborium reads too (the gateway never makes readings out of what is not CBOR).
#![no_main]

use gateway::decode::{Decoder, Limits, TopicPattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let pattern = TopicPattern::parse("telemetry/{device}/{measurement}").expect("pattern");
    let mut decoder = Decoder::new(Limits::default(), pattern);
    let mut out = Vec::new();
    let now = 1_764_000_000_000_000_000;
    let ours = decoder.decode(
        "telemetry/dev-1/env",
        payload,
        Some("application/cbor"),
        now,
        &mut out,
    );
    let theirs = ciborium::de::from_reader::<ciborium::Value, _>(payload);
    if let Ok(outcome) = &ours {
        if outcome.accepted > 0 {
            assert!(
                theirs.is_ok(),
                "readings taken from bytes ciborium refuses: {:?}",
                theirs.err()
            );
        }
    }
});
