//! Bursts without loss: what the queue cannot hold waits in the write-ahead log and comes back
//! in order, memory stays bounded, a per-device rate limit refuses with a counted reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::proxy::{Fault, FaultProxy};
use e2e::*;

/// Messages from one device that all write the same series and timestamp with a rising
/// `seq`: if the gateway keeps the order, the sink ends with the last one.
fn overwrites(device: &str, measurement: &str, count: usize) -> Vec<Message> {
    let ts = base_ms() - 60_000;
    (0..count)
        .map(|k| Message {
            topic: format!("telemetry/{device}/{measurement}"),
            payload: serde_json::to_vec(&serde_json::json!({"ts": ts, "fields": {"seq": k}}))
                .expect("json"),
            content_type: None,
        })
        .collect()
}

async fn settled(gw: &Gateway, accepted: f64, within: Duration) -> HashMap<String, f64> {
    let m = eventually(within, "everything written", || async {
        let m = gw.metrics().await?;
        let busy = get(&m, "gateway_queue_readings")
            + get(&m, "gateway_readings_in_flight")
            + get(&m, "gateway_wal_readings")
            + get(&m, "gateway_dlq_readings");
        anyhow::ensure!(
            busy == 0.0 && get(&m, "gateway_sink_readings_written_total") == accepted,
            "written {} of {accepted}, {busy} on the way",
            get(&m, "gateway_sink_readings_written_total")
        );
        Ok(m)
    })
    .await;
    assert_eq!(get(&m, "gateway_readings_accepted_total"), accepted);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_readings_through_a_throttled_sink() {
    let vm = VictoriaMetrics::start().await;
    let proxy = FaultProxy::start(&vm.url).await;
    proxy.set(Fault::Throttle(20_000));
    // Default sizing: queue 500,000 readings / 128 MiB, write-ahead log 1 GiB.
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", proxy.url.clone())]).await;
    let fleet = fleet(1_000, 10, 100, "burst", Encoding::Cbor);
    let took = publish_fleet(gw.mqtt_port, fleet).await;
    eprintln!("burst: 1,000,000 readings from 1,000 devices published in {took:.1?}");
    let m = settled(&gw, 1_000_000.0, Duration::from_secs(240)).await;
    let rss = gw.peak_rss();
    eprintln!(
        "peak RSS {:.1} MiB; {} readings read back from the log; broker dropped {}",
        rss as f64 / 1048576.0,
        get(&m, "gateway_wal_fed_readings_total"),
        get(&m, "gateway_broker_dropped_total")
    );
    assert_eq!(
        get(&m, "gateway_broker_dropped_total"),
        0.0,
        "default sizing loses nothing in the broker"
    );
    assert!(
        get(&m, "gateway_wal_fed_readings_total") > 0.0,
        "the queue filled and the rest waited in the log"
    );
    // Stated bound: queue bytes (128 MiB) + the broker's log (128 MiB) + 128 MiB for the rest.
    assert!(
        rss < 384 * 1024 * 1024,
        "peak RSS {rss} over the stated bound"
    );
    let n = eventually(Duration::from_secs(30), "all in the sink", || async {
        let n = vm.count_samples("burst_v", 3).await?;
        anyhow::ensure!(n == 1_000_000, "{n} in the sink");
        Ok(n)
    })
    .await;
    assert_eq!(n, 1_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_log_keeps_the_order_of_a_device() {
    let influx = Influx1::start("telemetry").await;
    let proxy = FaultProxy::start(&influx.url).await;
    proxy.set(Fault::Throttle(20_000));
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__API", "v1".into()),
        ("GATEWAY_SINK__URL", proxy.url.clone()),
        ("GATEWAY_SINK__DATABASE", "telemetry".into()),
        // Writes in order, and a small queue so that most of the burst waits in the log.
        ("GATEWAY_SINK__MAX_IN_FLIGHT", "1".into()),
        ("GATEWAY_QUEUE__MAX_READINGS", "2000".into()),
    ])
    .await;
    let port = gw.mqtt_port;
    let probe = tokio::spawn(async move {
        publish_v4(port, "order-probe", overwrites("probe", "ordered", 300)).await
    });
    publish_fleet(gw.mqtt_port, fleet(20, 20, 100, "ordered", Encoding::Cbor)).await;
    probe.await.expect("task").expect("probe published");
    let m = settled(&gw, 40_300.0, Duration::from_secs(120)).await;
    assert!(
        get(&m, "gateway_wal_fed_readings_total") > 10_000.0,
        "most came back from the log: {m:?}"
    );
    assert_eq!(
        influx
            .scalar(
                "telemetry",
                "SELECT last(seq) FROM ordered WHERE device = 'probe'"
            )
            .await,
        Some(299.0),
        "the last overwrite wins: order kept through log, queue and batches"
    );
    assert_eq!(
        influx
            .scalar("telemetry", "SELECT count(v) FROM ordered")
            .await,
        Some(40_000.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sink_down_throughout_a_million_reading_burst_then_everything_in_order() {
    let influx = Influx1::start("telemetry").await;
    let proxy = FaultProxy::start(&influx.url).await;
    proxy.set(Fault::Status(503, None));
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__API", "v1".into()),
        ("GATEWAY_SINK__URL", proxy.url.clone()),
        ("GATEWAY_SINK__DATABASE", "telemetry".into()),
        ("GATEWAY_SINK__MAX_IN_FLIGHT", "1".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "2".into()),
        ("GATEWAY_SINK__RETRY_INITIAL", "10ms".into()),
        ("GATEWAY_SINK__RETRY_MAX", "1s".into()),
        ("GATEWAY_QUEUE__MAX_READINGS", "5000".into()),
    ])
    .await;
    let port = gw.mqtt_port;
    let probe = tokio::spawn(async move {
        publish_v4(port, "down-probe", overwrites("probe", "down", 200)).await
    });
    publish_fleet(gw.mqtt_port, fleet(1_000, 10, 100, "down", Encoding::Cbor)).await;
    probe.await.expect("task").expect("probe published");
    // Everything is on disk: the dead-letter queue (batches whose writes failed) and the log.
    let held = eventually(Duration::from_secs(60), "held on disk", || async {
        let m = gw.metrics().await?;
        let held = get(&m, "gateway_dlq_readings")
            + get(&m, "gateway_wal_readings")
            + get(&m, "gateway_queue_readings")
            + get(&m, "gateway_readings_in_flight");
        anyhow::ensure!(
            get(&m, "gateway_readings_accepted_total") == 1_000_200.0 && held == 1_000_200.0,
            "held {held}"
        );
        Ok(held)
    })
    .await;
    assert_eq!(held, 1_000_200.0);
    proxy.set(Fault::Pass);
    let m = settled(&gw, 1_000_200.0, Duration::from_secs(120)).await;
    eprintln!(
        "sink down: parked {} readings, {} back from the log, redriven {}; peak RSS {:.1} MiB",
        get(
            &m,
            "gateway_dlq_parked_readings_total{kind=\"retries_exhausted\"}"
        ),
        get(&m, "gateway_wal_fed_readings_total"),
        get(&m, "gateway_dlq_redriven_readings_total"),
        gw.peak_rss() as f64 / 1048576.0
    );
    assert_eq!(
        influx
            .scalar(
                "telemetry",
                "SELECT last(seq) FROM down WHERE device = 'probe'"
            )
            .await,
        Some(199.0),
        "redriven oldest first: the last overwrite wins"
    );
    assert_eq!(
        influx
            .scalar("telemetry", "SELECT count(v) FROM down")
            .await,
        Some(1_000_000.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_device_rate_limit_refuses_with_a_counted_reason() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_LIMITS__DEVICE_RATE", "50".into()),
        ("GATEWAY_LIMITS__DEVICE_BURST", "100".into()),
    ])
    .await;
    let port = gw.mqtt_port;
    let other = tokio::spawn(async move {
        publish_v4(
            port,
            "calm",
            fleet(1, 1, 100, "calm", Encoding::Cbor).remove(0).1,
        )
        .await
    });
    // 2,000 readings as fast as possible: the burst of 100 passes, then about 50 a second.
    let started = Instant::now();
    publish_v4(
        gw.mqtt_port,
        "greedy",
        fleet(1, 20, 100, "greedy", Encoding::Cbor).remove(0).1,
    )
    .await
    .expect("published");
    other.await.expect("task").expect("published");
    let elapsed = started.elapsed().as_secs_f64();
    // Every reading ends accepted or refused with a reason.
    let m = eventually(
        Duration::from_secs(30),
        "all 2,100 readings counted",
        || async {
            let m = gw.metrics().await?;
            let counted = get(&m, "gateway_readings_accepted_total")
                + get(
                    &m,
                    "gateway_readings_rejected_total{reason=\"rate_limited\"}",
                );
            anyhow::ensure!(counted == 2_100.0, "{counted} of 2,100");
            Ok(m)
        },
    )
    .await;
    let limited = get(
        &m,
        "gateway_readings_rejected_total{reason=\"rate_limited\"}",
    );
    let accepted = get(&m, "gateway_readings_accepted_total");
    assert!(
        limited >= 2_000.0 - 100.0 - 50.0 * (elapsed + 1.0) - 100.0,
        "refused {limited} in {elapsed:.1} s"
    );
    assert!(
        accepted >= 200.0,
        "the calm device (100) and the greedy device's burst (100) pass"
    );
    assert!(gw.logs().contains("rate_limited"));
}
