//! The guard against the broker behind it. The guard checks a device's packets and forwards
//! them to rumqttd as bytes, so a packet the two read differently is a way past the guard: a
//! SUBSCRIBE whose filters rumqttd reads differently escapes the identity check, a PUBLISH
//! whose topic differs escapes the telemetry route, a frame of another length smuggles a
//! packet. Wherever both accept a packet the guard would forward (or rebuild), rumqttd must
//! frame it at the same length and read the same fields. Where only one accepts, nothing is
//! at risk: the guard closes the connection, or the broker does.
//!
//! The first byte picks the protocol version (odd: MQTT 5), as the guard's listener does.
#![no_main]

use bytes::BytesMut;
use gateway::ingest::guard::packet::{self, Connect, Frame};
use libfuzzer_sys::fuzz_target;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{LastWill, Login, Packet, Protocol};

const LIMIT: usize = 64 * 1024;

/// rumqttd's reading of the packet at the front of `bytes`, and how many bytes it took.
fn broker_reads(bytes: &[u8], v5: bool) -> Option<(Packet, usize)> {
    let mut stream = BytesMut::from(bytes);
    let packet = if v5 {
        V5.read_mut(&mut stream, LIMIT)
    } else {
        V4.read_mut(&mut stream, LIMIT)
    }
    .ok()?;
    Some((packet, bytes.len() - stream.len()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut rest)) = data.split_first() else {
        return;
    };
    let v5 = first & 1 == 1;
    while let Ok(Some(frame)) = packet::frame(rest, LIMIT) {
        let bytes = &rest[..frame.len];
        if frame.kind == packet::CONNECT {
            connect(bytes, frame);
        } else {
            if !guard_forwards(bytes, frame, v5) {
                break;
            }
            // The whole rest, not the frame alone: rumqttd reads the stream the guard forwards.
            let Some((theirs, taken)) = broker_reads(rest, v5) else {
                break;
            };
            assert_eq!(
                taken, frame.len,
                "rumqttd framed {taken} bytes, the guard {}",
                frame.len
            );
            compare(bytes, frame, v5, &theirs);
        }
        rest = &rest[frame.len..];
    }
});

/// Whether the guard passes the packet on (or acts on it) rather than closing the connection:
/// the checks of the guard's session, short of its policy (identity, telemetry routes).
fn guard_forwards(bytes: &[u8], frame: Frame, v5: bool) -> bool {
    if packet::sent_by_device(frame).is_err() {
        return false;
    }
    match frame.kind {
        packet::PUBLISH => packet::publish(bytes, frame, v5).is_ok(),
        packet::SUBSCRIBE => packet::subscribe_filters(bytes, frame, v5).is_ok(),
        packet::PUBREL => packet::packet_id(bytes, frame).is_ok(),
        packet::PUBACK | packet::PUBREC | packet::PUBCOMP => packet::ack_of(bytes, frame).is_ok(),
        packet::DISCONNECT if v5 => packet::disconnect_expiry(bytes, frame).is_ok(),
        _ => true,
    }
}

/// Both read the packet: the fields the guard acts on must be the ones rumqttd acts on.
fn compare(bytes: &[u8], frame: Frame, v5: bool, theirs: &Packet) {
    match (frame.kind, theirs) {
        (packet::PUBLISH, Packet::Publish(p, props)) => {
            let Ok(ours) = packet::publish(bytes, frame, v5) else {
                return;
            };
            assert_eq!(ours.name.as_bytes(), &p.topic[..], "topic");
            assert_eq!(ours.payload, &p.payload[..], "payload");
            assert_eq!(ours.retain, p.retain, "retain");
            // dup, QoS and packet id are private in rumqttd; its own serialisation shows them.
            let s = p.serialize();
            assert_eq!((s[0] >> 1) & 0x03, ours.qos, "QoS");
            assert_eq!(s[0] & 0x08 != 0, ours.dup, "dup");
            assert_eq!(
                ours.packet_id.unwrap_or(0),
                u16::from_be_bytes([s[1], s[2]]),
                "id"
            );
            let alias = props.as_ref().and_then(|p| p.topic_alias);
            assert_eq!(ours.alias, alias, "topic alias");
            if let (Some(_), Ok(named)) = (ours.alias, packet::with_topic(bytes, frame, "t/n")) {
                // What the broker gets for a PUBLISH by alias: the topic spelled out, the
                // alias gone, the rest unchanged.
                let f = packet::frame(&named, LIMIT).ok().flatten().expect("frames");
                let (Packet::Publish(n, nprops), _) = broker_reads(&named, true).expect("reads")
                else {
                    panic!("the rebuilt PUBLISH is not a PUBLISH to rumqttd");
                };
                assert_eq!(f.len, named.len());
                assert_eq!(&n.topic[..], b"t/n");
                assert_eq!(n.payload, p.payload);
                assert_eq!(nprops.and_then(|p| p.topic_alias), None);
            }
        }
        (packet::SUBSCRIBE, Packet::Subscribe(s, _)) => {
            let Ok(ours) = packet::subscribe_filters(bytes, frame, v5) else {
                return;
            };
            let theirs: Vec<&str> = s.filters.iter().map(|f| f.path.as_str()).collect();
            assert_eq!(ours, theirs, "topic filters");
        }
        (packet::PUBREL, Packet::PubRel(r, _)) => {
            if let Ok(id) = packet::packet_id(bytes, frame) {
                assert_eq!(id, r.pkid, "PUBREL id");
            }
        }
        (packet::PUBACK, Packet::PubAck(a, _)) => {
            if let Ok((id, _)) = packet::ack_of(bytes, frame) {
                assert_eq!(id, a.pkid, "PUBACK id");
            }
        }
        (packet::PUBREC, Packet::PubRec(a, _)) => {
            if let Ok((id, _)) = packet::ack_of(bytes, frame) {
                assert_eq!(id, a.pkid, "PUBREC id");
            }
        }
        (packet::PUBCOMP, Packet::PubComp(a, _)) => {
            if let Ok((id, _)) = packet::ack_of(bytes, frame) {
                assert_eq!(id, a.pkid, "PUBCOMP id");
            }
        }
        _ => {}
    }
}

/// A device's CONNECT: where both accept it they read the same fields, and rumqttd accepts
/// what the guard sends it instead.
fn connect(bytes: &[u8], frame: Frame) {
    let Ok(ours) = Connect::parse(bytes, frame) else {
        return;
    };
    if let Some((Packet::Connect(c, props, will, _, login), _)) =
        broker_reads(bytes, ours.level == 5)
    {
        assert_eq!(ours.client_id, c.client_id, "client id");
        assert_eq!(ours.keep_alive(), c.keep_alive, "keep alive");
        assert_eq!(ours.clean_start(), c.clean_session, "clean start");
        assert_eq!(
            ours.will_topic.map(str::as_bytes),
            will.as_ref().map(|w: &LastWill| &w.topic[..]),
            "will topic"
        );
        if let Some(Login { username, password }) = login {
            // rumqttd reads a password alone (MQTT 5 allows it) as an empty user name; the
            // guard rebuilds the CONNECT with its own login, so only the reading differs.
            let alone = ours.password.is_some().then_some("");
            assert_eq!(ours.username.or(alone), Some(username.as_str()), "username");
            // rumqttd reads a username without a password as an empty password.
            assert_eq!(
                ours.password.unwrap_or(b""),
                password.as_bytes(),
                "password"
            );
        }
        if let Some(props) = props {
            assert_eq!(
                ours.session_expiry,
                props.session_expiry_interval.unwrap_or(0)
            );
        }
    }
    rebuilt_connect(bytes, &ours);
}

/// What the guard sends the broker for a CONNECT it accepted: rumqttd must read it, with the
/// guard's client id and login, the session rule the guard chose, and the device's will.
fn rebuilt_connect(bytes: &[u8], ours: &Connect<'_>) {
    let rebuilt = ours.rebuild("tenant/device", "guard", b"secret", 30);
    let Some((theirs, taken)) = broker_reads(&rebuilt, ours.level == 5) else {
        // rumqttd is stricter than the guard about some CONNECTs (it refuses them and the
        // device is disconnected); the device's original must then be refused too.
        assert!(
            broker_reads(bytes, ours.level == 5).is_none(),
            "rumqttd reads the device's CONNECT but not the guard's rebuild of it"
        );
        return;
    };
    assert_eq!(taken, rebuilt.len());
    let Packet::Connect(c, _, will, _, login) = theirs else {
        panic!("the rebuilt CONNECT is not a CONNECT to rumqttd");
    };
    assert_eq!(c.client_id, "tenant/device");
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.clean_session, !ours.keeps_session());
    let login = login.expect("a login");
    assert_eq!(
        (login.username.as_str(), login.password.as_str()),
        ("guard", "secret")
    );
    assert_eq!(
        ours.will_topic.map(str::as_bytes),
        will.as_ref().map(|w| &w.topic[..])
    );
}
