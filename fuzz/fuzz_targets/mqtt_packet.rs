//! The guard's packet reader, which is the security boundary: any bytes from a device, framed
//! and parsed as whatever packet they claim to be (MQTT 3.1.1 and 5): never a panic, and a
//! frame never reaches past the bytes it was given or past the limit.
#![no_main]

use gateway::ingest::guard::packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limit = 64 * 1024;
    let mut rest = data;
    while let Ok(Some(frame)) = packet::frame(rest, limit) {
        assert!(frame.len <= rest.len() && frame.len <= limit && frame.header <= frame.len);
        let bytes = &rest[..frame.len];
        let _ = packet::sent_by_device(frame);
        let _ = packet::Connect::parse(bytes, frame);
        for v5 in [false, true] {
            let _ = packet::publish(bytes, frame, v5);
        }
        let _ = packet::publish_id(bytes, frame);
        let _ = packet::ack_of(bytes, frame);
        let _ = packet::disconnect_expiry(bytes, frame);
        let _ = packet::connack_of(bytes, frame);
        let _ = packet::packet_id(bytes, frame);
        let _ = packet::with_topic(bytes, frame, "telemetry/d/m");
        if frame.len == 0 {
            break;
        }
        rest = &rest[frame.len..];
    }
});
