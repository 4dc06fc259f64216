//! Failures lose nothing (docs/contract.md §3): outages and faults are redriven, bad points are
//! isolated, refusals are parked and replayed, and the ledger balances after every scenario.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::proxy::{Fault, FaultProxy};
use e2e::*;

/// Waits until nothing is queued, in flight or parked, and checks the ledger.
async fn settled(gw: &Gateway, accepted: f64) -> HashMap<String, f64> {
    let m = eventually(
        Duration::from_secs(120),
        "queue, flight and DLQ empty",
        || async {
            let m = gw.metrics().await?;
            let busy = get(&m, "gateway_queue_readings")
                + get(&m, "gateway_readings_in_flight")
                + get(&m, "gateway_dlq_readings");
            anyhow::ensure!(busy == 0.0, "queued/in flight/parked: {busy}");
            Ok(m)
        },
    )
    .await;
    assert_eq!(get(&m, "gateway_readings_accepted_total"), accepted);
    assert_eq!(
        get(&m, "gateway_readings_accepted_total") + get(&m, "gateway_dlq_inherited_readings"),
        get(&m, "gateway_sink_readings_written_total"),
        "ledger: accepted + inherited = written once everything settled"
    );
    assert_eq!(
        get(&m, "gateway_dlq_records"),
        0.0,
        "dead-letter queue empty"
    );
    m
}

async fn vm_count(vm: &VictoriaMetrics, measurement: &str, want: usize) -> usize {
    let selector = format!("{{__name__=\"{measurement}_v\"}}");
    eventually(Duration::from_secs(60), "sink count", || async {
        let n = vm.count(&selector).await?;
        anyhow::ensure!(n == want, "{n} of {want} in the sink");
        Ok(n)
    })
    .await
}

fn outage_secs() -> u64 {
    std::env::var("E2E_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_is_redriven_without_an_operator() {
    let mut vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_SINK__TIMEOUT", "2s".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "3".into()),
        ("GATEWAY_SINK__RETRY_INITIAL", "50ms".into()),
        ("GATEWAY_SINK__RETRY_MAX", "2s".into()),
    ])
    .await;
    vm.stop();
    let down_at = Instant::now();
    // 50 devices × 100 messages × 10 readings, all while the sink is down.
    publish_fleet(gw.mqtt_port, fleet(50, 100, 10, "outage", Encoding::Json)).await;
    let parked = gw.wait_metric("gateway_dlq_readings", 50_000.0).await;
    assert_eq!(get(&parked, "gateway_sink_up"), 0.0);
    let ready = http()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status().as_u16(),
        503,
        "not ready while the sink is down"
    );
    let (code, listed, err) = gw.dlq(&["list"]);
    assert_eq!(code, 0, "list works while the gateway runs: {err}");
    let readings: u64 = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["readings"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(readings, 50_000);
    let (code, _, err) = gw.dlq(&["replay", "--all"]);
    assert_eq!(code, 2, "replay refuses while the gateway runs");
    assert!(err.contains("is the gateway running"), "{err}");

    let outage = Duration::from_secs(outage_secs());
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    vm.restart().await;
    let m = settled(&gw, 50_000.0).await;
    assert_eq!(vm_count(&vm, "outage", 50_000).await, 50_000);
    assert_eq!(get(&m, "gateway_dlq_redriven_readings_total"), 50_000.0);
    assert_eq!(get(&m, "gateway_sink_up"), 1.0);
    let logs = gw.logs();
    assert_eq!(
        logs.matches("the sink is down").count(),
        1,
        "one error when it goes down, not a flood"
    );
    assert!(logs.contains("the sink is back"));
}

/// The disk refuses the delete of the first record redriven (a failpoint): the record is
/// drained all the same, never written a second time, and deleted by the next try.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redriven_record_whose_delete_fails_is_written_once() {
    let mut vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_SINK__TIMEOUT", "2s".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "2".into()),
        ("GATEWAY_SINK__RETRY_INITIAL", "50ms".into()),
        ("GATEWAY_SINK__RETRY_MAX", "500ms".into()),
        ("FAILPOINTS", "dlq_delete_fails=1".into()),
    ])
    .await;
    vm.stop();
    publish_fleet(gw.mqtt_port, fleet(5, 20, 10, "undeleted", Encoding::Json)).await;
    gw.wait_metric("gateway_dlq_readings", 1_000.0).await;
    vm.restart().await;
    let m = settled(&gw, 1_000.0).await;
    assert_eq!(get(&m, "gateway_dlq_redriven_readings_total"), 1_000.0);
    assert_eq!(vm_count(&vm, "undeleted", 1_000).await, 1_000);
    let logs = gw.logs();
    assert!(
        logs.contains("cannot delete a redriven dead-letter record"),
        "the failpoint fired"
    );
    let (code, listed, err) = gw.dlq(&["list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "deleted at last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_through_a_proxy_are_retried_and_redriven() {
    let vm = VictoriaMetrics::start().await;
    let proxy = FaultProxy::start(&vm.url).await;
    let gw = Gateway::start(&[
        // v1: the influxdb2 crate hides Retry-After; the v1 path reads it.
        ("GATEWAY_SINK__API", "v1".into()),
        ("GATEWAY_SINK__URL", proxy.url.clone()),
        ("GATEWAY_SINK__TIMEOUT", "1s".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "3".into()),
        ("GATEWAY_SINK__RETRY_INITIAL", "50ms".into()),
        ("GATEWAY_SINK__RETRY_MAX", "2s".into()),
    ])
    .await;
    let mut total = 0.0;
    for (fault, measurement) in [
        (Fault::Status(503, None), "f503"),
        (Fault::Status(429, Some(1)), "f429"),
        (Fault::Hang, "fhang"),
    ] {
        proxy.set(fault.clone());
        let before = proxy.faults_served();
        publish_fleet(gw.mqtt_port, fleet(4, 50, 10, measurement, Encoding::Json)).await;
        total += 2_000.0;
        eventually(Duration::from_secs(30), "faults served", || async {
            anyhow::ensure!(proxy.faults_served() > before, "no fault served yet");
            Ok(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.set(Fault::Pass);
        settled(&gw, total).await;
        assert_eq!(vm_count(&vm, measurement, 2_000).await, 2_000, "{fault:?}");
    }
    // The 429's Retry-After of 1 s was waited for at least.
    let honoured = gw
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| {
            v.pointer("/fields/status").and_then(|s| s.as_str()) == Some("Some(429)")
                && v.pointer("/fields/wait_ms")
                    .and_then(|w| w.as_u64())
                    .is_some_and(|w| w >= 1000)
        });
    assert!(honoured, "a retry after 429 waited the Retry-After");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn field_type_conflict_parks_only_the_conflicting_lines() {
    let influx = Influx1::start("telemetry").await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__API", "v1".into()),
        ("GATEWAY_SINK__URL", influx.url.clone()),
        ("GATEWAY_SINK__DATABASE", "telemetry".into()),
        ("GATEWAY_BATCH__LINGER", "1s".into()),
    ])
    .await;
    let base = base_ms();
    // First `v` is a float in `env`.
    let first = Message {
        topic: "telemetry/seed/env".into(),
        payload: serde_json::to_vec(&serde_json::json!({"ts": base, "fields": {"v": 1.5}}))
            .expect("json"),
        content_type: None,
    };
    publish_v4(gw.mqtt_port, "seed", vec![first])
        .await
        .expect("published");
    gw.wait_metric("gateway_sink_readings_written_total", 1.0)
        .await;
    // Then 1,000 readings in a few batches, 10 of them with `v` as text: a type conflict.
    let readings: Vec<serde_json::Value> = (0..1000)
        .map(|i| {
            let v = if i % 100 == 7 {
                serde_json::json!(format!("text-{i}"))
            } else {
                serde_json::json!(i)
            };
            serde_json::json!({"ts": base + 1 + i, "fields": {"v": v}})
        })
        .collect();
    let msgs: Vec<Message> = readings
        .chunks(100)
        .map(|c| Message {
            topic: "telemetry/mixed/env".into(),
            payload: serde_json::to_vec(c).expect("json"),
            content_type: None,
        })
        .collect();
    publish_v4(gw.mqtt_port, "mixed", msgs)
        .await
        .expect("published");
    let m = eventually(Duration::from_secs(60), "settled", || async {
        let m = gw.metrics().await?;
        anyhow::ensure!(
            get(&m, "gateway_queue_readings") + get(&m, "gateway_readings_in_flight") == 0.0
                && get(&m, "gateway_dlq_readings") == 10.0,
            "{} parked",
            get(&m, "gateway_dlq_readings")
        );
        Ok(m)
    })
    .await;
    assert_eq!(
        get(&m, "gateway_sink_readings_written_total"),
        991.0,
        "every other line written"
    );
    assert_eq!(
        get(
            &m,
            "gateway_dlq_parked_readings_total{kind=\"rejected_by_sink\"}"
        ),
        10.0
    );
    let (_, listed, _) = gw.dlq(&["list"]);
    let records = listed.as_array().expect("array");
    assert_eq!(records.len(), 10, "one record per bad line");
    for r in records {
        assert_eq!(r["kind"], "rejected_by_sink");
        assert_eq!(r["status"], 400);
        assert!(
            r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("field type conflict"),
            "{r}"
        );
        let (_, shown, _) = gw.dlq(&["show", r["id"].as_str().expect("id")]);
        assert!(
            shown["data"].as_str().unwrap_or("").contains("v=\"text-"),
            "{shown}"
        );
    }
    assert_eq!(
        influx.scalar("telemetry", "SELECT count(v) FROM env").await,
        Some(991.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_writes_wait_for_the_operator_then_replay() {
    let influx = Influx1::start("telemetry").await;
    let env = [
        ("GATEWAY_SINK__API", "v1".to_string()),
        ("GATEWAY_SINK__URL", influx.url.clone()),
        // Not created: InfluxDB answers 404 "database not found".
        ("GATEWAY_SINK__DATABASE", "missing".to_string()),
    ];
    let mut gw = Gateway::start(&env).await;
    publish_fleet(gw.mqtt_port, fleet(5, 20, 5, "refused", Encoding::Json)).await;
    let m = gw.wait_metric("gateway_dlq_readings", 500.0).await;
    assert_eq!(
        get(
            &m,
            "gateway_dlq_parked_readings_total{kind=\"refused_by_sink\"}"
        ),
        500.0
    );
    let (_, listed, _) = gw.dlq(&["list"]);
    for r in listed.as_array().expect("array") {
        assert_eq!(r["status"], 404);
        assert!(
            r["reason"]
                .as_str()
                .unwrap_or("")
                .contains("database not found"),
            "{r}"
        );
    }
    assert!(gw.logs().contains("the sink refuses the gateway's writes"));
    // Refused records are not redriven by themselves: still there a few seconds later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(gw.metric("gateway_dlq_readings").await, 500.0);

    // The operator fixes the cause, stops the gateway and replays.
    assert!(gw.terminate().success());
    influx
        .query("", "CREATE DATABASE \"missing\"")
        .await
        .expect("create");
    let (code, dry, err) = gw.dlq(&["replay", "--all", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(dry["records"], listed.as_array().map_or(0, Vec::len));
    let (code, report, err) = gw.dlq(&["replay", "--all"]);
    assert_eq!(code, 0, "{err} {report}");
    assert_eq!(report["written_readings"], 500);
    assert_eq!(report["left"], 0);
    let (_, listed, _) = gw.dlq(&["list"]);
    assert_eq!(listed, serde_json::json!([]), "the queue is empty");
    assert_eq!(
        influx
            .scalar("missing", "SELECT count(v) FROM refused")
            .await,
        Some(500.0)
    );
    // Replaying again is harmless: nothing left to replay.
    let (code, report, _) = gw.dlq(&["replay", "--all"]);
    assert_eq!((code, report["records"].as_u64()), (0, Some(0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_input_is_kept_within_a_per_device_allowance() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_DLQ__REJECTED_INPUT_PER_DEVICE", "3".into()),
    ])
    .await;
    let garbage: Vec<Message> = (0..10u8)
        .map(|i| Message {
            topic: "telemetry/noisy/env".into(),
            payload: vec![0xff, 0xfe, i],
            content_type: None,
        })
        .collect();
    publish_v4(gw.mqtt_port, "noisy", garbage)
        .await
        .expect("published");
    let m = gw.wait_metric("gateway_dlq_rejected_inputs", 3.0).await;
    assert_eq!(
        get(&m, "gateway_dlq_rejected_input_skipped_total"),
        7.0,
        "over the allowance: counted"
    );
    assert_eq!(
        sum(&m, "gateway_readings_rejected_total"),
        10.0,
        "every rejection counted"
    );
    assert_eq!(
        get(&m, "gateway_dlq_readings"),
        0.0,
        "rejected input is not in the ledger's DLQ term"
    );
    let (_, listed, _) = gw.dlq(&["list"]);
    let first = &listed.as_array().expect("array")[0];
    assert_eq!(first["kind"], "rejected_input");
    assert_eq!(first["topics"], serde_json::json!(["telemetry/noisy/env"]));
    let (_, shown, _) = gw.dlq(&["show", first["id"].as_str().expect("id")]);
    assert_eq!(shown["data_hex"], "fffe00", "the raw payload");
    assert!(
        shown["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("malformed_cbor"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_token_is_parked_with_the_sinks_answer_and_replayed() {
    let vm = VictoriaMetrics::start().await;
    let proxy = FaultProxy::start(&vm.url).await;
    proxy.set(Fault::Status(401, None));
    let mut gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", proxy.url.clone()),
        ("GATEWAY_SINK__TOKEN", "wrong-token".into()),
    ])
    .await;
    publish_fleet(gw.mqtt_port, fleet(3, 10, 10, "token", Encoding::Json)).await;
    let m = gw.wait_metric("gateway_dlq_readings", 300.0).await;
    assert_eq!(
        get(
            &m,
            "gateway_dlq_parked_readings_total{kind=\"refused_by_sink\"}"
        ),
        300.0
    );
    assert_eq!(get(&m, "gateway_sink_up"), 0.0, "refused: not ready");
    let (_, listed, _) = gw.dlq(&["list"]);
    assert!(
        listed[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("fault injected"),
        "the sink's body: {listed}"
    );
    assert!(
        !gw.logs().contains("wrong-token"),
        "the token never reaches the logs"
    );
    assert!(gw.terminate().success());
    // Fixed: the proxy lets requests through again.
    proxy.set(Fault::Pass);
    let (code, report, err) = gw.dlq(&["replay", "--all"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(report["written_readings"], 300);
    assert_eq!(vm_count(&vm, "token", 300).await, 300);
    let (_, listed, _) = gw.dlq(&["list"]);
    assert_eq!(listed, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_dlq_pushes_back_and_loses_nothing() {
    let mut vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_SINK__TIMEOUT", "1s".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "1".into()),
        ("GATEWAY_BATCH__MAX_READINGS", "500".into()),
        ("GATEWAY_DLQ__MAX_BYTES", "128KiB".into()),
        ("GATEWAY_DLQ__SEGMENT_BYTES", "64KiB".into()),
    ])
    .await;
    vm.stop();
    // About 1.4 MB of line protocol: ten times what the DLQ may hold.
    publish_fleet(gw.mqtt_port, fleet(20, 100, 10, "full", Encoding::Json)).await;
    let m = gw.wait_metric("gateway_dlq_full", 1.0).await;
    assert!(
        get(&m, "gateway_dlq_bytes") <= 128.0 * 1024.0,
        "the cap holds"
    );
    assert!(
        get(&m, "gateway_queue_readings") + get(&m, "gateway_readings_in_flight") > 0.0,
        "what does not fit is held, not dropped"
    );
    assert!(gw.logs().contains("cannot park: holding the batch"));
    vm.restart().await;
    let m = settled(&gw, 20_000.0).await;
    assert_eq!(get(&m, "gateway_dlq_full"), 0.0);
    assert_eq!(vm_count(&vm, "full", 20_000).await, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_old_records_and_counts_them() {
    let gw = Gateway::start(&[
        (
            "GATEWAY_SINK__URL",
            format!("http://127.0.0.1:{}", free_port()),
        ),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "1".into()),
        ("GATEWAY_DLQ__RETENTION", "2s".into()),
    ])
    .await;
    publish_fleet(gw.mqtt_port, fleet(2, 5, 10, "old", Encoding::Json)).await;
    let m = gw
        .wait_metric("gateway_dlq_expired_readings_total", 100.0)
        .await;
    assert_eq!(get(&m, "gateway_dlq_records"), 0.0);
    assert!(gw.logs().contains("passed dlq.retention"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_parks_what_it_could_not_write() {
    let vm = VictoriaMetrics::start().await;
    let proxy = FaultProxy::start(&vm.url).await;
    proxy.set(Fault::Hang);
    let mut gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", proxy.url.clone()),
        ("GATEWAY_SINK__TIMEOUT", "2s".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "10".into()),
        ("GATEWAY_SHUTDOWN__TIMEOUT", "1s".into()),
    ])
    .await;
    publish_fleet(gw.mqtt_port, fleet(4, 25, 10, "shutdown", Encoding::Json)).await;
    gw.wait_metric("gateway_readings_accepted_total", 1_000.0)
        .await;
    let started = Instant::now();
    assert!(gw.terminate().success(), "exit 0");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the shutdown timeout bounds the flush"
    );
    let (_, listed, _) = gw.dlq(&["list"]);
    let parked: u64 = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|r| r["readings"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        parked, 1_000,
        "everything not written is in the dead-letter queue"
    );
    assert!(gw
        .logs()
        .contains("some readings wait in the dead-letter queue"));
}
