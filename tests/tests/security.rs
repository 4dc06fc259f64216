//! Security of the embedded broker, with real TLS and MQTT clients: who may connect, what each
//! device may write, the limits, and what is counted when a rule is broken.

use std::time::Duration;

use e2e::*;

/// `n` JSON readings of field `v` on measurement `sec` for topic device `device`.
fn readings(device: &str, n: usize) -> Vec<Message> {
    let base = base_ms();
    (0..n)
        .map(|i| Message {
            topic: format!("telemetry/{device}/sec"),
            payload: serde_json::to_vec(
                &serde_json::json!({"ts": base + i as i64, "fields": {"v": i}}),
            )
            .expect("json"),
            content_type: None,
        })
        .collect()
}

struct Secured {
    gw: Gateway,
    vm: VictoriaMetrics,
    tls_port: u16,
    certs: tempfile::TempDir,
    credentials: std::path::PathBuf,
}

async fn secured(extra: &[(&str, String)]) -> Secured {
    let vm = VictoriaMetrics::start().await;
    let certs = tempfile::tempdir().expect("tmp");
    make_test_ca(certs.path());
    make_client_cert(certs.path(), "dev-cert");
    let credentials = certs.path().join("devices");
    passwd(&credentials, "dev-a", "pw-a-31f9");
    passwd(&credentials, "dev-b", "pw-b-8c02");
    let tls_port = free_port();
    let path = |name: &str| certs.path().join(name).display().to_string();
    let mut env = vec![
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_AUTH__ANONYMOUS", "false".to_string()),
        (
            "GATEWAY_AUTH__CREDENTIALS_FILE",
            credentials.display().to_string(),
        ),
        ("GATEWAY_AUTH__RELOAD_INTERVAL", "200ms".to_string()),
        ("GATEWAY_MQTT__TLS_LISTEN", format!("127.0.0.1:{tls_port}")),
        ("GATEWAY_MQTT__TLS_CERT_FILE", path("server.pem")),
        ("GATEWAY_MQTT__TLS_KEY_FILE", path("server.key")),
        ("GATEWAY_MQTT__TLS_CLIENT_CA_FILE", path("ca.pem")),
        ("GATEWAY_DECODE__MAX_PAYLOAD_BYTES", "1KiB".to_string()),
    ];
    env.extend(extra.iter().cloned());
    let gw = Gateway::start(&env).await;
    Secured {
        gw,
        vm,
        tls_port,
        certs,
        credentials,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_authenticated_devices_write_and_only_as_themselves() {
    let s = secured(&[]).await;
    let (gw, tls_port) = (&s.gw, s.tls_port);
    let tls = tls_client(s.certs.path(), None);
    let a = Login::password("dev-a", "pw-a-31f9").over_tls(tls.clone());

    // The right password over TLS (MQTT 3.1.1), and over the plain MQTT 5 port.
    publish_v4_as(tls_port, "a-1", &a, readings("dev-a", 10))
        .await
        .expect("dev-a writes over TLS");
    publish_v5_as(
        gw.mqtt5_port,
        "b-1",
        &Login::password("dev-b", "pw-b-8c02"),
        readings("dev-b", 7),
    )
    .await
    .expect("dev-b writes over MQTT 5");
    // A client certificate instead of a password: its common name is the identity.
    let cert = Login::default().over_tls(tls_client(s.certs.path(), Some("dev-cert")));
    publish_v4_as(tls_port, "c-1", &cert, readings("dev-cert", 5))
        .await
        .expect("dev-cert writes with its certificate");

    // Refused at CONNECT, each with the MQTT reason and a counted one.
    let refused = |login: Login, port: u16| async move {
        publish_v4_as(port, "x", &login, readings("dev-a", 1))
            .await
            .expect_err("refused")
            .to_string()
    };
    let e = refused(
        Login::password("dev-a", "wrong").over_tls(tls.clone()),
        tls_port,
    )
    .await;
    assert!(e.contains("BadUserNamePassword"), "{e}");
    let e = refused(
        Login::password("ghost", "pw-a-31f9").over_tls(tls.clone()),
        tls_port,
    )
    .await;
    assert!(e.contains("BadUserNamePassword"), "{e}");
    let e = refused(Login::default().over_tls(tls.clone()), tls_port).await;
    assert!(e.contains("NotAuthorized"), "{e}");
    let e = refused(Login::default(), gw.mqtt_port).await;
    assert!(e.contains("NotAuthorized"), "{e}");
    // A certificate for dev-cert with the username of another device.
    let e = refused(
        Login {
            username: Some("dev-a".into()),
            password: Some("pw-a-31f9".into()),
            tls: cert.tls.clone(),
        },
        tls_port,
    )
    .await;
    assert!(e.contains("NotAuthorized"), "{e}");

    // A will under another device's id is refused at CONNECT.
    let will = {
        let mut opts = rumqttc::MqttOptions::new("a-will", "127.0.0.1", gw.mqtt_port);
        opts.set_credentials("dev-a", "pw-a-31f9");
        opts.set_last_will(rumqttc::LastWill::new(
            "telemetry/dev-b/status",
            "gone",
            rumqttc::QoS::AtLeastOnce,
            false,
        ));
        let (_client, mut events) = rumqttc::AsyncClient::new(opts, 8);
        tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .expect("an answer")
            .expect_err("refused")
            .to_string()
    };
    assert!(will.contains("NotAuthorized"), "{will}");

    // dev-a writing as dev-b: its connection is closed at that publish, which never lands.
    let mut as_b = readings("dev-a", 3);
    as_b.extend(readings("dev-b", 1));
    let e = publish_v4_as(tls_port, "a-2", &a, as_b)
        .await
        .expect_err("closed");
    assert!(e.to_string().contains("after 3 of 4 acks"), "{e}");
    // Subscribing to other devices' telemetry closes the connection too.
    let (client, mut events) = {
        let mut opts = rumqttc::MqttOptions::new("a-3", "127.0.0.1", tls_port);
        opts.set_credentials("dev-a", "pw-a-31f9");
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
        rumqttc::AsyncClient::new(opts, 8)
    };
    client
        .subscribe("telemetry/+/sec", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("queued");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the subscription closed the connection");

    // An oversized payload is refused by the decoder, counted, and the device stays connected.
    let mut big = readings("dev-a", 1);
    big[0].payload =
        serde_json::to_vec(&serde_json::json!({"fields": {"s": "x".repeat(1500)}})).expect("json");
    big.extend(readings("dev-a", 1));
    publish_v4_as(tls_port, "a-4", &a, big)
        .await
        .expect("both acknowledged");

    let m = gw.metrics().await.expect("metrics");
    let refused = |reason: &str| {
        get(
            &m,
            &format!("gateway_connections_refused_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(refused("bad_password"), 1.0);
    assert_eq!(refused("unknown_device"), 1.0);
    assert_eq!(refused("anonymous"), 2.0);
    assert_eq!(refused("certificate_mismatch"), 1.0);
    assert_eq!(refused("will_identity_mismatch"), 1.0);
    let closed = |reason: &str| {
        get(
            &m,
            &format!("gateway_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    // A device added while the gateway runs can log in within the reload interval.
    passwd(&s.credentials, "dev-new", "pw-new-55aa");
    let new = Login::password("dev-new", "pw-new-55aa").over_tls(tls.clone());
    eventually(Duration::from_secs(10), "dev-new accepted", || async {
        publish_v4_as(tls_port, "n-1", &new, readings("dev-new", 2)).await
    })
    .await;

    assert_eq!(closed("identity_mismatch"), 1.0);
    assert_eq!(closed("subscribe_denied"), 1.0);
    let m = gw.drained().await;
    assert_eq!(
        get(
            &m,
            "gateway_messages_rejected_total{reason=\"identity_mismatch\"}"
        ),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "gateway_messages_rejected_total{reason=\"payload_too_large\"}"
        ),
        1.0
    );
    assert_eq!(get(&m, "gateway_credentials_devices"), 3.0);

    let count = |device: &'static str| {
        let vm = &s.vm;
        async move {
            vm.count(&format!("sec_v{{device=\"{device}\"}}"))
                .await
                .expect("count")
        }
    };
    assert_eq!(count("dev-a").await, 10 + 3 + 1);
    assert_eq!(count("dev-b").await, 7, "nothing written as dev-b by dev-a");
    assert_eq!(count("dev-cert").await, 5);
    // The new device may have been refused a few times before the reload; its readings once.
    assert_eq!(count("dev-new").await, 2);
    assert_eq!(s.vm.count_samples("sec_v", 2).await.expect("count"), 28);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rate_and_count_limits_refuse_and_count() {
    let s = secured(&[
        ("GATEWAY_LIMITS__CONNECTION_RATE", "1".to_string()),
        ("GATEWAY_LIMITS__CONNECTION_BURST", "3".to_string()),
    ])
    .await;
    let a = Login::password("dev-a", "pw-a-31f9");
    // A burst of 3 passes; then one connection a second.
    for i in 0..3 {
        publish_v4_as(s.gw.mqtt_port, &format!("a-{i}"), &a, readings("dev-a", 1))
            .await
            .expect("within the burst");
    }
    let e = publish_v4_as(s.gw.mqtt_port, "a-9", &a, readings("dev-a", 1))
        .await
        .expect_err("over the rate");
    assert!(!e.to_string().is_empty());
    let m = s.gw.metrics().await.expect("metrics");
    assert_eq!(
        get(
            &m,
            "gateway_connections_refused_total{reason=\"connection_rate\"}"
        ),
        1.0
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    publish_v4_as(s.gw.mqtt_port, "a-10", &a, readings("dev-a", 1))
        .await
        .expect("refilled after a second");

    // mqtt.max_connections: the second connection of a gateway that takes one is refused.
    let one = secured(&[("GATEWAY_MQTT__MAX_CONNECTIONS", "1".to_string())]).await;
    let mut opts = rumqttc::MqttOptions::new("holder", "127.0.0.1", one.gw.mqtt_port);
    opts.set_credentials("dev-a", "pw-a-31f9");
    let (_holder, mut holder_events) = rumqttc::AsyncClient::new(opts, 8);
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) =
            holder_events.poll().await.expect("holder connects")
        {
            break;
        }
    }
    let keep = tokio::spawn(async move { while holder_events.poll().await.is_ok() {} });
    publish_v4_as(one.gw.mqtt_port, "second", &a, readings("dev-a", 1))
        .await
        .expect_err("no room");
    let m = one.gw.metrics().await.expect("metrics");
    assert_eq!(
        get(
            &m,
            "gateway_connections_refused_total{reason=\"too_many_connections\"}"
        ),
        1.0
    );
    keep.abort();
    assert_eq!(s.vm.count_samples("sec_v", 2).await.expect("count"), 4);
}
