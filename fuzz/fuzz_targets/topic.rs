//! Topic patterns and topics: never a panic, and a topic matched to a device and measurement
//! names them as the topic spells them.
#![no_main]

use gateway::decode::TopicPattern;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, String)| {
    let (pattern, topic) = input;
    let _ = TopicPattern::parse(&pattern).map(|p| (p.filter(), p.claims(&topic)));
    let p = TopicPattern::parse("telemetry/{device}/{measurement}").expect("pattern");
    let _ = p.claims(&topic);
    let _ = p.filter_within(&topic, "dev-1");
    if let Ok((device, measurement)) = p.match_topic(&topic) {
        assert_eq!(format!("telemetry/{device}/{measurement}"), topic);
        assert_eq!(p.device_of(&topic), Some(device));
    }
});
