//! The embedded endpoint as MQTT clients see it now that the guard takes telemetry in itself:
//! MQTT 5 reason codes for refused messages, QoS 2 exactly once, everything that is not
//! telemetry still served by the embedded broker (subscriptions, other topics, retained
//! messages), and telemetry-only devices kept alive.

use std::io::{Read, Write};
use std::time::Duration;

use e2e::raw::{next_publish, packet, string};
use e2e::*;

fn reading(ts: i64, v: f64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"ts": ts, "fields": {"v": v}})).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_refusals_come_back_as_puback_reason_codes_on_a_live_connection() {
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let vm = VictoriaMetrics::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let credentials = dir.path().join("devices");
    passwd(&credentials, "dev-a", "pw-a-5e1f");
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_AUTH__ANONYMOUS", "false".into()),
        (
            "GATEWAY_AUTH__CREDENTIALS_FILE",
            credentials.display().to_string(),
        ),
    ])
    .await;
    let mut opts = MqttOptions::new("a-v5", "127.0.0.1", gw.mqtt5_port);
    opts.set_credentials("dev-a", "pw-a-5e1f");
    let (client, mut events) = AsyncClient::new(opts, 16);
    let ts = base_ms();
    let sends: Vec<(&str, Vec<u8>)> = vec![
        ("telemetry/dev-a/rc", reading(ts, 1.0)),
        ("telemetry/dev-a/rc", b"\xff\x00 not a payload".to_vec()),
        ("telemetry/dev-b/rc", reading(ts + 1, 2.0)),
        ("telemetry/dev-a/rc", reading(ts + 2, 3.0)),
    ];
    let mut reasons = Vec::new();
    let mut connected = false;
    let mut sent = 0;
    while reasons.len() < sends.len() {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("an event in time")
            .expect("the connection stays up");
        match event {
            Event::Incoming(Packet::ConnAck(_)) => connected = true,
            Event::Incoming(Packet::PubAck(ack)) => reasons.push(ack.reason),
            _ => {}
        }
        // One publish at a time, so that each PUBACK belongs to the publish before it.
        if connected && sent == reasons.len() && sent < sends.len() {
            let (topic, payload) = sends[sent].clone();
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queued");
            sent += 1;
        }
    }
    assert_eq!(
        reasons,
        vec![
            PubAckReason::Success,
            PubAckReason::PayloadFormatInvalid,
            PubAckReason::NotAuthorized,
            PubAckReason::Success,
        ],
        "each refusal named, and the connection lived on to take the last one"
    );
    let m = gw.drained().await;
    assert_eq!(
        get(
            &m,
            r#"gateway_messages_rejected_total{reason="identity_mismatch"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"gateway_readings_rejected_total{reason="malformed_cbor"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            r#"gateway_connections_closed_total{reason="identity_mismatch"}"#
        ),
        0.0,
        "MQTT 5 refuses the message, not the connection"
    );
    let n = eventually(Duration::from_secs(20), "dev-a's two readings", || async {
        let n = vm.count(r#"{__name__="rc_v"}"#).await?;
        anyhow::ensure!(n >= 2, "{n} of 2");
        Ok(n)
    })
    .await;
    assert_eq!(n, 2, "nothing of dev-b's, nothing of the bad payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_telemetry_lands_exactly_once() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let (client, mut events) =
        AsyncClient::new(MqttOptions::new("q2", "127.0.0.1", gw.mqtt_port), 128);
    let ts = base_ms();
    let total = 200;
    let publisher = tokio::spawn(async move {
        for i in 0..total {
            client
                .publish(
                    "telemetry/q2/once",
                    QoS::ExactlyOnce,
                    false,
                    reading(ts + i, i as f64),
                )
                .await
                .expect("queued");
        }
        client
    });
    let mut completed = 0;
    while completed < total {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("an event in time")
            .expect("connected");
        if let Event::Incoming(Packet::PubComp(_)) = event {
            completed += 1;
        }
    }
    drop(publisher.await.expect("publisher"));
    let m = gw.drained().await;
    assert_eq!(get(&m, "gateway_messages_received_total"), total as f64);
    assert_eq!(get(&m, "gateway_readings_accepted_total"), total as f64);
    let n = eventually(Duration::from_secs(20), "all in the sink", || async {
        let n = vm.count(r#"{__name__="once_v"}"#).await?;
        anyhow::ensure!(n as i64 >= total, "{n} of {total}");
        Ok(n)
    })
    .await;
    assert_eq!(n as i64, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_telemetry_is_still_brokered_and_retained_telemetry_is_both() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let port = gw.mqtt_port;
    // A subscriber to commands, as a device would be.
    let (sub, mut sub_events) =
        AsyncClient::new(MqttOptions::new("listener", "127.0.0.1", port), 16);
    sub.subscribe("commands/#", QoS::AtLeastOnce)
        .await
        .expect("queued");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = sub_events.poll().await.expect("subscribed") {
            break;
        }
    }
    let ts = base_ms();
    publish_v4(
        port,
        "talker",
        vec![Message {
            topic: "commands/dev-1/reboot".into(),
            payload: b"now".to_vec(),
            content_type: None,
        }],
    )
    .await
    .expect("acknowledged by the broker");
    let got = next_publish(&mut sub_events).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("commands/dev-1/reboot", &b"now"[..])
    );

    // A retained telemetry message: written to the sink, and kept by the broker for whoever
    // subscribes later.
    let (client, mut events) = AsyncClient::new(MqttOptions::new("keeper", "127.0.0.1", port), 16);
    client
        .publish(
            "telemetry/keeper/env",
            QoS::AtLeastOnce,
            true,
            reading(ts, 7.0),
        )
        .await
        .expect("queued");
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = events.poll().await.expect("acknowledged") {
            break;
        }
    }
    let (late, mut late_events) = AsyncClient::new(MqttOptions::new("late", "127.0.0.1", port), 16);
    late.subscribe("telemetry/keeper/env", QoS::AtLeastOnce)
        .await
        .expect("queued");
    let retained = next_publish(&mut late_events).await;
    assert!(retained.retain, "delivered as the retained value");
    assert_eq!(&retained.payload[..], &reading(ts, 7.0)[..]);
    let n = eventually(
        Duration::from_secs(20),
        "the retained reading in the sink",
        || async {
            let n = vm.count(r#"{__name__="env_v",device="keeper"}"#).await?;
            anyhow::ensure!(n >= 1, "{n} of 1");
            Ok(n)
        },
    )
    .await;
    assert_eq!(n, 1);
    let m = gw.metrics().await.expect("metrics");
    assert_eq!(
        get(&m, "gateway_messages_received_total"),
        1.0,
        "only the telemetry message was decoded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_only_publishes_telemetry_outlives_its_keep_alive() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    let port = gw.mqtt_port;
    let ts = base_ms();
    // A raw client: keep-alive 2 s, never a PINGREQ, a QoS 1 publish every 250 ms for 4 s.
    // The broker behind the guard sees none of those publishes; without the guard's pings on
    // the device's behalf it would cut the connection after 3 s.
    let acked = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut connect = string(b"MQTT");
        connect.extend_from_slice(&[4, 0x02, 0, 2]);
        connect.extend(string(b"raw-keepalive"));
        s.write_all(&packet(0x10, &connect)).expect("CONNECT");
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).expect("CONNACK");
        assert_eq!(connack, [0x20, 2, 0, 0]);
        let mut acked = 0;
        for i in 0..16u16 {
            let mut body = string(b"telemetry/raw/alive");
            body.extend_from_slice(&(i + 1).to_be_bytes());
            body.extend(reading(ts + i64::from(i), f64::from(i)));
            s.write_all(&packet(0x32, &body)).expect("PUBLISH");
            let mut puback = [0u8; 4];
            s.read_exact(&mut puback)
                .expect("PUBACK: the connection is alive");
            assert_eq!(puback, [0x40, 2, 0, (i + 1) as u8]);
            acked += 1;
            std::thread::sleep(Duration::from_millis(250));
        }
        acked
    })
    .await
    .expect("client");
    assert_eq!(acked, 16);
}
