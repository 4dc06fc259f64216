//! The embedded endpoint behaves as MQTT 3.1.1 and 5 say, point by point, and a device that
//! only publishes telemetry costs one file descriptor. Each test speaks to the gateway with a
//! real client: rumqttc where it can say what the test needs, raw packets where it cannot
//! (a keep-alive of 0, topic aliases, a receive maximum of 2).

use std::time::Duration;

use e2e::raw::{next_publish, packet, string, varint};
use e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn reading(ts: i64, v: f64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"ts": ts, "fields": {"v": v}})).expect("json")
}

/// An MQTT 5 property block from its encoded properties.
fn props(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    varint(p.len(), &mut out);
    out.extend_from_slice(p);
    out
}

/// A CONNECT: `level` 4 or 5, clean start, the keep-alive given, MQTT 5 `properties` (already a
/// block) and an optional will (topic, message) at QoS 0.
fn connect(
    level: u8,
    client_id: &str,
    keep_alive: u16,
    properties: &[u8],
    will: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let mut body = string(b"MQTT");
    let flags = 0x02 | if will.is_some() { 0x04 } else { 0 };
    body.extend_from_slice(&[level, flags]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.extend_from_slice(properties);
    }
    body.extend(string(client_id.as_bytes()));
    if let Some((topic, message)) = will {
        if level == 5 {
            body.push(0);
        }
        body.extend(string(topic.as_bytes()));
        body.extend(string(message));
    }
    packet(0x10, &body)
}

/// A PUBLISH at `qos` (packet id 1..) with MQTT 5 `properties` (a block; empty for 3.1.1).
fn publish(topic: &str, qos: u8, id: u16, properties: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(properties);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// A raw MQTT connection.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn open(port: u16, hello: &[u8]) -> Self {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(hello).await.expect("CONNECT");
        Self { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("send");
    }

    /// The next whole packet, or `None` once the gateway closes the connection.
    async fn next_within(&mut self, within: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(within, async {
            loop {
                if let Some(len) = whole(&self.buf) {
                    return Some(self.buf.drain(..len).collect());
                }
                let mut chunk = [0u8; 4096];
                match self.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no packet and no close within {within:?}"))
    }

    async fn next(&mut self) -> Vec<u8> {
        self.next_within(Duration::from_secs(10))
            .await
            .expect("a packet, not a closed connection")
    }
}

/// Bytes of the whole packet at the front of `buf`, if it is all there.
fn whole(buf: &[u8]) -> Option<usize> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let total = 2 + i + len;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// A v4 subscriber on `filter`, subscribed when this returns.
async fn subscriber(
    port: u16,
    id: &str,
    filter: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (client, mut events) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queued");
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("SUBACK in time")
            .expect("connected");
        if let Event::Incoming(Packet::SubAck(_)) = e {
            return (client, events);
        }
    }
}

fn open_fds(gw: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gw.proc.child.id()))
        .expect("the gateway's descriptors")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted_and_a_telemetry_device_costs_one_descriptor() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let ts = base_ms();
    let before = open_fds(&gw);
    let mut devices = Vec::new();
    let ports = [(gw.mqtt_port, 4u8), (gw.mqtt5_port, 5)];
    for (i, (port, level)) in ports.into_iter().cycle().take(50).enumerate() {
        let hello = connect(level, &format!("ka0-{i}"), 0, &props(&[]), None);
        let mut d = Raw::open(port, &hello).await;
        let connack = d.next().await;
        assert_eq!(
            (connack[0], connack[3]),
            (0x20, 0),
            "CONNACK success for a keep-alive of 0 (MQTT 3.1.2.10)"
        );
        devices.push((d, level));
    }
    let added = open_fds(&gw) - before;
    // One descriptor per telemetry-only device, no broker session behind it (three each
    // would be 150), give or take what else the gateway opened or closed meanwhile.
    assert!(
        (45..=55).contains(&added),
        "{added} descriptors for 50 devices"
    );
    for (i, (d, level)) in devices.iter_mut().enumerate() {
        let p = if *level == 5 { props(&[]) } else { Vec::new() };
        let topic = format!("telemetry/ka0-{i}/env");
        d.send(&publish(&topic, 1, 1, &p, &reading(ts + i as i64, 1.0)))
            .await;
        assert_eq!(d.next().await, [0x40, 2, 0, 1], "PUBACK");
    }
    // A device with a will needs the broker, which alone can publish it: three descriptors
    // (the device's socket, the guard's to rumqttd, rumqttd's end).
    let before = open_fds(&gw);
    let hello = connect(4, "with-will", 30, &[], Some(("status/with-will", b"gone")));
    let mut d = Raw::open(gw.mqtt_port, &hello).await;
    assert_eq!(d.next().await, [0x20, 2, 0, 0]);
    let added = open_fds(&gw) - before;
    assert!(
        (3..6).contains(&added),
        "{added} descriptors for a device with a will"
    );
    let n = eventually(
        Duration::from_secs(20),
        "50 readings in the sink",
        || async {
            let n = vm.count(r#"{__name__="env_v"}"#).await?;
            anyhow::ensure!(n >= 50, "{n} of 50");
            Ok(n)
        },
    )
    .await;
    assert_eq!(n, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_cut_after_one_and_a_half_keep_alives_and_its_will_published() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let (_sub, mut events) = subscriber(gw.mqtt_port, "watcher", "status/#").await;
    for level in [4u8, 5] {
        let port = if level == 5 {
            gw.mqtt5_port
        } else {
            gw.mqtt_port
        };
        let id = format!("silent-{level}");
        let topic = format!("status/{id}");
        let hello = connect(level, &id, 1, &props(&[]), Some((&topic, b"lost")));
        let mut d = Raw::open(port, &hello).await;
        assert_eq!(d.next().await[0], 0x20, "CONNACK");
        let started = std::time::Instant::now();
        // Silent from here: no PINGREQ, nothing.
        let will = next_publish(&mut events).await;
        assert_eq!(
            (will.topic.as_str(), &will.payload[..]),
            (topic.as_str(), &b"lost"[..])
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1400),
            "not before 1.5 x keep-alive: {waited:?}"
        );
        if level == 5 {
            assert_eq!(
                d.next().await,
                [0xE0, 1, 0x8D],
                "DISCONNECT: keep alive timeout"
            );
        }
        assert_eq!(d.next_within(Duration::from_secs(5)).await, None, "closed");
    }
    let m = gw.metrics().await.expect("metrics");
    assert_eq!(
        get(
            &m,
            r#"gateway_connections_closed_total{reason="keep_alive_timeout"}"#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_pings_stays_and_gets_its_pingresp_from_the_guard() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let mut d = Raw::open(gw.mqtt_port, &connect(4, "pinger", 1, &[], None)).await;
    assert_eq!(d.next().await, [0x20, 2, 0, 0]);
    // Pings every 0.8 s for 4 s, well past the 1.5 s a silent device gets: each answered by
    // the guard (no broker behind this device), none cut.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        d.send(&[0xC0, 0]).await;
        assert_eq!(d.next().await, [0xD0, 0], "PINGRESP");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_refused_and_never_reach_wildcard_subscribers() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let (_sub, mut events) = subscriber(gw.mqtt_port, "wild", "+/+").await;
    // MQTT 5: refused with Topic Name invalid, the connection stays.
    let mut d = Raw::open(
        gw.mqtt5_port,
        &connect(5, "dollar-5", 30, &props(&[]), None),
    )
    .await;
    assert_eq!(d.next().await[0], 0x20);
    d.send(&publish("$SYS/x", 1, 1, &props(&[]), b"no")).await;
    assert_eq!(d.next().await, [0x40, 3, 0, 1, 0x90]);
    // MQTT 3.1.1 has no way to say no: acknowledged, counted, dropped.
    let mut d4 = Raw::open(gw.mqtt_port, &connect(4, "dollar-4", 30, &[], None)).await;
    assert_eq!(d4.next().await, [0x20, 2, 0, 0]);
    d4.send(&publish("$x/y", 1, 1, &[], b"no")).await;
    assert_eq!(d4.next().await, [0x40, 2, 0, 1]);
    // What the subscriber gets first is what came after.
    d4.send(&publish("after/that", 1, 2, &[], b"yes")).await;
    assert_eq!(d4.next().await, [0x40, 2, 0, 2]);
    let got = next_publish(&mut events).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("after/that", &b"yes"[..])
    );
    let m = gw.metrics().await.expect("metrics");
    assert_eq!(
        get(
            &m,
            r#"gateway_messages_rejected_total{reason="dollar_topic"}"#
        ),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_work_for_every_topic_and_a_bad_one_ends_the_connection_with_its_reason() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let ts = base_ms();
    let (_sub, mut events) = subscriber(gw.mqtt_port, "aliases", "commands/#").await;
    let mut d = Raw::open(gw.mqtt5_port, &connect(5, "aliaser", 30, &props(&[]), None)).await;
    let connack = d.next().await;
    // CONNACK: flags, reason 0, then properties that include Topic Alias Maximum (0x22).
    assert_eq!((connack[0], connack[3]), (0x20, 0));
    assert!(
        connack.windows(3).any(|w| w == [0x22, 0, 32]),
        "topic alias maximum 32: {connack:?}"
    );
    let alias = |n: u8| props(&[0x23, 0, n]);
    // Alias 1 for telemetry, taken in by the guard; alias 2 for a command, brokered.
    d.send(&publish(
        "telemetry/aliaser/env",
        1,
        1,
        &alias(1),
        &reading(ts, 1.0),
    ))
    .await;
    d.send(&publish("", 1, 2, &alias(1), &reading(ts + 1, 2.0)))
        .await;
    d.send(&publish("commands/aliaser/go", 1, 3, &alias(2), b"first"))
        .await;
    d.send(&publish("", 1, 4, &alias(2), b"second")).await;
    let mut acked = Vec::new();
    while acked.len() < 4 {
        let p = d.next().await;
        assert_eq!(&p[..2], [0x40, 2], "PUBACK success: {p:?}");
        acked.push(p[3]);
    }
    acked.sort_unstable();
    assert_eq!(acked, [1, 2, 3, 4]);
    for payload in [&b"first"[..], b"second"] {
        let got = next_publish(&mut events).await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            ("commands/aliaser/go", payload)
        );
    }
    // Alias 0 is not an alias (MQTT 5 §3.3.2.3.4).
    d.send(&publish(
        "telemetry/aliaser/env",
        1,
        5,
        &alias(0),
        &reading(ts + 2, 3.0),
    ))
    .await;
    assert_eq!(
        d.next().await,
        [0xE0, 1, 0x94],
        "DISCONNECT: topic alias invalid"
    );
    assert_eq!(d.next_within(Duration::from_secs(5)).await, None, "closed");
    let n = eventually(Duration::from_secs(20), "both aliased readings", || async {
        let n = vm.count(r#"{__name__="env_v",device="aliaser"}"#).await?;
        anyhow::ensure!(n >= 2, "{n} of 2");
        Ok(n)
    })
    .await;
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gets_nothing_larger_than_its_maximum_packet_size_nor_more_than_its_receive_maximum(
) {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    // Maximum Packet Size 64 (0x27), Receive Maximum 2 (0x21).
    let hello = connect(
        5,
        "small",
        30,
        &props(&[0x27, 0, 0, 0, 64, 0x21, 0, 2]),
        None,
    );
    let mut d = Raw::open(gw.mqtt5_port, &hello).await;
    assert_eq!(d.next().await[0], 0x20);
    let mut sub = string(b"commands/small");
    sub.push(1);
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(props(&[]));
    body.extend(sub);
    d.send(&packet(0x82, &body)).await;
    assert_eq!(d.next().await[0], 0x90, "SUBACK");
    let big = vec![b'x'; 64];
    publish_v4(
        gw.mqtt_port,
        "sender",
        [&b"one"[..], &big, b"two", b"three"]
            .iter()
            .map(|p| Message {
                topic: "commands/small".into(),
                payload: p.to_vec(),
                content_type: None,
            })
            .collect(),
    )
    .await
    .expect("all acknowledged by the broker");
    // The 64-byte payload makes a packet over 64 bytes: dropped as if delivered (MQTT 5
    // §3.1.2.11.4). Of the rest, two arrive; the third waits for an acknowledgement.
    let first = d.next().await;
    let second = d.next().await;
    let payload = |p: &[u8]| p[p.len() - 3..].to_vec();
    assert_eq!((first[0] & 0xF0, payload(&first)), (0x30, b"one".to_vec()));
    assert_eq!(
        (second[0] & 0xF0, payload(&second)),
        (0x30, b"two".to_vec())
    );
    let early = tokio::time::timeout(Duration::from_millis(500), d.next()).await;
    assert!(
        early.is_err(),
        "a third message before an acknowledgement: {early:?}"
    );
    // Acknowledge the first (its packet id follows the topic).
    // Fixed header (2 bytes: the packet is under 128), topic (2 + its length), packet id.
    let id_at = 2 + 2 + "commands/small".len();
    let id = [first[id_at], first[id_at + 1]];
    d.send(&[0x40, 2, id[0], id[1]]).await;
    let third = d.next().await;
    assert_eq!(&third[third.len() - 5..], b"three");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_client_id_gets_one_where_mqtt_allows_it() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    // MQTT 5, clean start 0 or 1: accepted, told its id (Assigned Client Identifier, 0x12).
    let mut d = Raw::open(gw.mqtt5_port, &connect(5, "", 30, &props(&[]), None)).await;
    let connack = d.next().await;
    assert_eq!((connack[0], connack[3]), (0x20, 0));
    let at = connack
        .iter()
        .position(|&b| b == 0x12)
        .expect("an assigned client id");
    let len = u16::from_be_bytes([connack[at + 1], connack[at + 2]]) as usize;
    let id = std::str::from_utf8(&connack[at + 3..at + 3 + len]).expect("UTF-8");
    assert!(id.starts_with("gateway-"), "{id}");
    // MQTT 3.1.1 with a clean session: accepted.
    let mut d4 = Raw::open(gw.mqtt_port, &connect(4, "", 30, &[], None)).await;
    assert_eq!(d4.next().await, [0x20, 2, 0, 0]);
    // MQTT 3.1.1 with a session to keep: identifier rejected (§3.1.3.1).
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[4, 0x00, 0, 30]);
    body.extend(string(b""));
    let mut refused = Raw::open(gw.mqtt_port, &packet(0x10, &body)).await;
    assert_eq!(refused.next().await, [0x20, 2, 0, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_session_with_an_expiry_keeps_its_subscription_and_messages() {
    use rumqttc::v5::mqttbytes::v5::{ConnectProperties, Packet};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let options = |clean: bool| {
        let mut o = MqttOptions::new("keeper-5", "127.0.0.1", gw.mqtt5_port);
        o.set_clean_start(clean);
        let mut p = ConnectProperties::new();
        p.session_expiry_interval = Some(300);
        o.set_connect_properties(p);
        o
    };
    // Clean start with an expiry: a new session that outlives the connection.
    let (client, mut events) = AsyncClient::new(options(true), 16);
    client
        .subscribe("commands/keeper", QoS::AtLeastOnce)
        .await
        .expect("queued");
    loop {
        match events.poll().await.expect("connected") {
            Event::Incoming(Packet::ConnAck(c)) => assert!(!c.session_present),
            Event::Incoming(Packet::SubAck(_)) => break,
            _ => {}
        }
    }
    drop(client);
    drop(events);
    // While it is away, a message for it.
    publish_v4(
        gw.mqtt_port,
        "sender",
        vec![Message {
            topic: "commands/keeper".into(),
            payload: b"while away".to_vec(),
            content_type: None,
        }],
    )
    .await
    .expect("acknowledged");
    // Back with clean start 0: the session is there, and so is the message.
    let (_client, mut events) = AsyncClient::new(options(false), 16);
    let mut present = None;
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await.expect("connected") {
                Event::Incoming(Packet::ConnAck(c)) => present = Some(c.session_present),
                Event::Incoming(Packet::Publish(p)) => return p,
                _ => {}
            }
        }
    })
    .await
    .expect("the queued message");
    assert_eq!(present, Some(true));
    assert_eq!(&got.payload[..], b"while away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_says_it_is_utf8_and_is_not_is_refused_with_its_reason() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let ts = base_ms();
    let mut d = Raw::open(gw.mqtt5_port, &connect(5, "format", 30, &props(&[]), None)).await;
    assert_eq!(d.next().await[0], 0x20);
    let utf8 = props(&[0x01, 1]);
    d.send(&publish("telemetry/format/env", 1, 1, &utf8, &[0xff, 0xfe]))
        .await;
    assert_eq!(
        d.next().await,
        [0x40, 3, 0, 1, 0x99],
        "payload format invalid"
    );
    d.send(&publish(
        "telemetry/format/env",
        1,
        2,
        &utf8,
        &reading(ts, 1.0),
    ))
    .await;
    assert_eq!(d.next().await, [0x40, 2, 0, 2], "valid UTF-8 JSON is taken");
    let m = gw.metrics().await.expect("metrics");
    assert_eq!(
        get(
            &m,
            r#"gateway_messages_rejected_total{reason="payload_format_invalid"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_session_ends_when_its_expiry_says_though_rumqttd_keeps_sessions_for_ever() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    // CONNECT with clean start as given and a session expiry of 60 s.
    let hello = |clean: bool| {
        let mut body = string(b"MQTT");
        body.extend_from_slice(&[5, if clean { 0x02 } else { 0 }, 0, 30]);
        body.extend(props(&[0x11, 0, 0, 0, 60]));
        body.extend(string(b"expiring"));
        packet(0x10, &body)
    };
    let mut d = Raw::open(gw.mqtt5_port, &hello(true)).await;
    // CONNACK: type, length, session present, reason code, properties.
    fn flags(c: Vec<u8>) -> (u8, u8, u8) {
        (c[0], c[2], c[3])
    }
    assert_eq!(
        flags(d.next().await),
        (0x20, 0, 0),
        "no session at a clean start"
    );
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend(props(&[]));
    body.extend(string(b"commands/expiring"));
    body.push(1);
    d.send(&packet(0x82, &body)).await;
    assert_eq!(d.next().await[0], 0x90, "SUBACK");
    d.send(&[0xE0, 0]).await;
    assert_eq!(d.next_within(Duration::from_secs(10)).await, None, "closed");
    // Back within the expiry: the session is there. It leaves saying the session ends now
    // (DISCONNECT, reason 0, Session Expiry Interval 0).
    let mut d = Raw::open(gw.mqtt5_port, &hello(false)).await;
    assert_eq!(flags(d.next().await), (0x20, 1, 0), "session present");
    d.send(&[0xE0, 7, 0, 5, 0x11, 0, 0, 0, 0]).await;
    assert_eq!(d.next_within(Duration::from_secs(10)).await, None, "closed");
    // So the next connection finds none, though rumqttd kept it: the guard ended it first.
    let mut d = Raw::open(gw.mqtt5_port, &hello(false)).await;
    assert_eq!(flags(d.next().await), (0x20, 0, 0), "the session expired");
}

/// MQTT 5 request/response through the embedded broker: what the requester says about its
/// message (response topic, correlation data, user properties, payload format, content type,
/// message expiry) reaches the responder, and the answer finds its way back. Publishes and
/// subscriptions are both QoS 1: rumqttd 0.20 delivers every message at the subscription's
/// QoS, not the lower of the two (bytebeamio/rumqtt#707), which the guard cannot mend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_request_response_keeps_every_property_of_the_message() {
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    async fn subscribed(port: u16, id: &str, filter: &str) -> (AsyncClient, EventLoop) {
        let (client, mut events) = AsyncClient::new(MqttOptions::new(id, "127.0.0.1", port), 16);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queued");
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .expect("SUBACK in time")
                .expect("connected");
            if let Event::Incoming(Packet::SubAck(_)) = e {
                return (client, events);
            }
        }
    }
    async fn next_message(events: &mut EventLoop) -> Publish {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = events.poll().await.expect("up") {
                    return p;
                }
            }
        })
        .await
        .expect("a message in time")
    }
    let port = gw.mqtt5_port;
    let (responder, mut responder_events) = subscribed(port, "responder", "requests/#").await;
    let (requester, mut requester_events) =
        subscribed(port, "requester", "replies/requester").await;
    let asked = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        response_topic: Some("replies/requester".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"call-7")),
        user_properties: vec![("a".into(), "2".into()), ("c".into(), "3".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    requester
        .publish_with_properties(
            "requests/time",
            QoS::AtLeastOnce,
            false,
            "what time is it",
            asked.clone(),
        )
        .await
        .expect("queued");
    // A client's event loop sends what it publishes only while it is polled.
    let request = tokio::select! {
        request = next_message(&mut responder_events) => request,
        _ = async { loop { let _ = requester_events.poll().await; } } => unreachable!(),
    };
    assert_eq!(&request.payload[..], b"what time is it");
    assert_eq!(request.qos, QoS::AtLeastOnce);
    let got = request.properties.expect("the request's properties");
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
    assert_eq!(
        got.user_properties, asked.user_properties,
        "in order (§3.3.2.3.7)"
    );
    assert_eq!(got.response_topic.as_deref(), Some("replies/requester"));
    assert_eq!(got.correlation_data.as_deref(), Some(&b"call-7"[..]));
    // What is left of the expiry, never more than was asked (§3.3.2.3.3).
    assert!(
        got.message_expiry_interval
            .is_some_and(|s| (1..=600).contains(&s)),
        "message expiry {:?}",
        got.message_expiry_interval
    );
    let answer = PublishProperties {
        correlation_data: got.correlation_data.clone(),
        ..Default::default()
    };
    responder
        .publish_with_properties(
            got.response_topic.clone().expect("a response topic"),
            QoS::AtLeastOnce,
            false,
            "noon",
            answer,
        )
        .await
        .expect("queued");
    let reply = tokio::select! {
        reply = next_message(&mut requester_events) => reply,
        _ = async { loop { let _ = responder_events.poll().await; } } => unreachable!(),
    };
    assert_eq!(&reply.payload[..], b"noon");
    assert_eq!(
        reply.properties.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"call-7"[..]),
        "the answer carries the request's correlation data"
    );
}

/// A device may send only the packets MQTT lets a client send, with the fixed-header flags
/// MQTT gives them (§2.1.3; 3.1.1 §2.2.2). The rest end the connection as a protocol error at
/// the guard and never reach rumqttd, whose MQTT 5 reader panics on a CONNACK or UNSUBACK
/// with a body (found by the fuzz target `mqtt_rumqttd`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_only_a_server_sends_or_with_wrong_flags_end_the_connection_at_the_guard() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let bad: [(&str, &[u8]); 8] = [
        ("CONNACK", &[0x20, 2, 0, 0]),
        ("SUBACK", &[0x90, 3, 0, 1, 0]),
        ("UNSUBACK", &[0xB0, 2, 0, 1]),
        ("PINGRESP", &[0xD0, 0]),
        ("AUTH", &[0xF0, 0]),
        ("reserved type 0", &[0x00, 0]),
        ("PUBREL without its flags", &[0x60, 2, 0, 1]),
        ("PINGREQ with flags", &[0xC1, 0]),
    ];
    let mut closed = 0.0;
    for level in [4u8, 5] {
        let port = if level == 5 {
            gw.mqtt5_port
        } else {
            gw.mqtt_port
        };
        for (i, (what, bytes)) in bad.iter().enumerate() {
            let id = format!("bad-{level}-{i}");
            let mut d = Raw::open(port, &connect(level, &id, 30, &props(&[]), None)).await;
            assert_eq!(d.next().await[0], 0x20, "CONNACK");
            d.send(bytes).await;
            if level == 5 {
                assert_eq!(
                    d.next().await,
                    [0xE0, 1, 0x82],
                    "{what}: DISCONNECT, protocol error"
                );
            }
            assert_eq!(
                d.next_within(Duration::from_secs(5)).await,
                None,
                "{what} (MQTT {level}): the connection closes"
            );
            closed += 1.0;
        }
    }
    gw.wait_metric(
        r#"gateway_connections_closed_total{reason="protocol_error"}"#,
        closed,
    )
    .await;
    // The broker never saw them: it has nothing to say, and the endpoint still works.
    let ts = base_ms();
    publish_v5(
        gw.mqtt5_port,
        "after",
        vec![Message {
            topic: "telemetry/after/env".to_owned(),
            payload: reading(ts, 1.0),
            content_type: Some("application/json"),
        }],
    )
    .await
    .expect("published");
    eventually(Duration::from_secs(20), "the reading", || async {
        anyhow::ensure!(vm.count(r#"{__name__="env_v",device="after"}"#).await? == 1);
        Ok(())
    })
    .await;
    let logs = gw.logs();
    assert!(!logs.contains("panicked"), "a task panicked:\n{logs}");
}
