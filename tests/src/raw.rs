//! MQTT packets built by hand, for what no client library lets a test say (a keep-alive of 0,
//! topic aliases, a receive maximum of 2), and the next message a rumqttc subscriber gets.

use std::time::Duration;

/// MQTT's variable byte integer (remaining lengths, property lengths).
pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// A packet: its first byte, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// A length-prefixed string or binary field.
pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// The next message delivered to a rumqttc (3.1.1) subscriber.
pub async fn next_publish(events: &mut rumqttc::EventLoop) -> rumqttc::Publish {
    use rumqttc::{Event, Packet};
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("delivered in time")
            .expect("connected");
        if let Event::Incoming(Packet::Publish(p)) = event {
            return p;
        }
    }
}
