//! The spine, end to end: MQTT devices → embedded broker → decode → queue → batches → a real
//! sink, counted exactly.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ciborium::Value as C;
use e2e::*;

const DEVICES: usize = 20;
const CBOR_MSGS: usize = 25; // per device, 20 readings each: 10,000 CBOR readings
const CBOR_PER_MSG: usize = 20;
const JSON_MSGS: usize = 5; // per device, 10 readings each: 1,000 JSON readings
const JSON_PER_MSG: usize = 10;
const PER_DEVICE: usize = CBOR_MSGS * CBOR_PER_MSG + JSON_MSGS * JSON_PER_MSG;

/// Tag and string values that need every kind of line-protocol escaping.
const SITE: &str = "north east,row=1 \"B\" back\\slash";
const NOTE: &str = "say \"hi\", a=b c\\d\tand a tab";

#[derive(Debug, Clone, PartialEq)]
struct Reading {
    device: String,
    ts: i64, // in the unit the test configures
    temp: f64,
    hum: i64,
    ok: bool,
}

fn readings(base: i64, step: i64) -> Vec<Reading> {
    let mut out = Vec::new();
    for d in 0..DEVICES {
        for i in 0..PER_DEVICE {
            out.push(Reading {
                device: format!("dev-{d:02}"),
                ts: base + i as i64 * step,
                temp: d as f64 * 1000.0 + i as f64 + 0.25,
                hum: i as i64 % 100,
                ok: i % 3 == 0,
            });
        }
    }
    out
}

fn cbor_reading(r: &Reading) -> C {
    C::Map(vec![
        (C::Text("ts".into()), C::Integer(r.ts.into())),
        (
            C::Text("fields".into()),
            C::Map(vec![
                (C::Text("temp".into()), C::Float(r.temp)),
                (C::Text("hum".into()), C::Integer(r.hum.into())),
                (C::Text("ok".into()), C::Bool(r.ok)),
                (C::Text("note".into()), C::Text(NOTE.into())),
            ]),
        ),
        (
            C::Text("tags".into()),
            C::Map(vec![(C::Text("site".into()), C::Text(SITE.into()))]),
        ),
    ])
}

fn json_reading(r: &Reading) -> serde_json::Value {
    serde_json::json!({"ts": r.ts, "fields": {"temp": r.temp, "hum": r.hum, "ok": r.ok, "note": NOTE}, "tags": {"site": SITE}})
}

/// Publishes every reading: CBOR over MQTT 3.1.1 (format sniffed), JSON over MQTT 5 with its
/// content type, one client per device and protocol, all at QoS 1.
async fn publish_fleet(gw: &Gateway, all: &[Reading]) {
    let mut tasks = Vec::new();
    for d in 0..DEVICES {
        let mine: Vec<&Reading> = all
            .iter()
            .filter(|r| r.device == format!("dev-{d:02}"))
            .collect();
        let topic = format!("telemetry/dev-{d:02}/env");
        let (cbor_part, json_part) = mine.split_at(CBOR_MSGS * CBOR_PER_MSG);
        let cbor_msgs: Vec<Message> = cbor_part
            .chunks(CBOR_PER_MSG)
            .map(|c| Message {
                topic: topic.clone(),
                payload: cbor(&C::Array(c.iter().map(|r| cbor_reading(r)).collect())),
                content_type: None,
            })
            .collect();
        let json_msgs: Vec<Message> = json_part
            .chunks(JSON_PER_MSG)
            .map(|c| Message {
                topic: topic.clone(),
                payload: serde_json::to_vec(&c.iter().map(|r| json_reading(r)).collect::<Vec<_>>())
                    .expect("json"),
                content_type: Some("application/json"),
            })
            .collect();
        let (p4, p5) = (gw.mqtt_port, gw.mqtt5_port);
        tasks.push(tokio::spawn(async move {
            publish_v4(p4, &format!("cbor-{d}"), cbor_msgs).await
        }));
        tasks.push(tokio::spawn(async move {
            publish_v5(p5, &format!("json-{d}"), json_msgs).await
        }));
    }
    for t in tasks {
        t.await
            .expect("publisher task")
            .expect("all published and acknowledged");
    }
}

fn assert_ledger(m: &HashMap<String, f64>, accepted: f64) {
    let g = |k: &str| m.get(k).copied().unwrap_or(0.0);
    assert_eq!(g("gateway_readings_accepted_total"), accepted, "accepted");
    assert_eq!(
        g("gateway_sink_readings_written_total"),
        accepted,
        "written"
    );
    assert_eq!(g("gateway_queue_readings"), 0.0);
    assert_eq!(g("gateway_readings_in_flight"), 0.0);
    assert_eq!(g("gateway_dlq_readings"), 0.0, "nothing parked");
    assert_eq!(
        sum(m, "gateway_readings_rejected_total"),
        0.0,
        "nothing rejected"
    );
    assert_eq!(
        g("gateway_broker_dropped_total"),
        0.0,
        "the broker lost nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_lands_exactly_in_victoria_metrics_v2() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__API", "v2".into()),
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_SINK__TOKEN", "test-token".into()),
        ("GATEWAY_SINK__GZIP", "true".into()),
    ])
    .await;
    let all = readings(base_ms(), 1);
    publish_fleet(&gw, &all).await;
    let total = all.len();
    assert_eq!(total, 11_000);

    let m = gw.drained().await;
    assert_ledger(&m, total as f64);
    assert_eq!(
        m["gateway_messages_received_total"],
        (DEVICES * (CBOR_MSGS + JSON_MSGS)) as f64
    );

    // VictoriaMetrics stores `<measurement>_<field>` with tags as labels and ms timestamps.
    let mut want: BTreeMap<(String, String, i64), f64> = BTreeMap::new();
    for r in &all {
        want.insert(("env_temp".into(), r.device.clone(), r.ts), r.temp);
        want.insert(("env_hum".into(), r.device.clone(), r.ts), r.hum as f64);
        want.insert(
            ("env_ok".into(), r.device.clone(), r.ts),
            if r.ok { 1.0 } else { 0.0 },
        );
    }
    let selector = r#"{__name__=~"env_(temp|hum|ok)"}"#;
    let got = eventually(Duration::from_secs(30), "all samples visible", || async {
        let series = vm.export(selector).await?;
        let n: usize = series.iter().map(|s| s.timestamps.len()).sum();
        anyhow::ensure!(n == want.len(), "{n} of {} samples", want.len());
        Ok(series)
    })
    .await;
    let mut found = BTreeMap::new();
    for s in &got {
        assert_eq!(
            s.metric.get("site").map(String::as_str),
            Some(SITE),
            "tag value survives escaping"
        );
        let device = s.metric["device"].clone();
        for (ts, v) in s.timestamps.iter().zip(&s.values) {
            found.insert((s.metric["__name__"].clone(), device.clone(), *ts), *v);
        }
    }
    assert_eq!(
        found, want,
        "exactly the published readings, values and ms timestamps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_lands_exactly_in_influxdb_1_6_v1() {
    let influx = Influx1::start("telemetry").await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__API", "v1".into()),
        ("GATEWAY_SINK__URL", influx.url.clone()),
        ("GATEWAY_SINK__DATABASE", "telemetry".into()),
        ("GATEWAY_DECODE__TIMESTAMP_UNIT", "ns".into()),
    ])
    .await;
    // Nanosecond timestamps that are not whole microseconds.
    let all = readings(base_ms() * 1_000_000 + 7, 1_001);
    publish_fleet(&gw, &all).await;
    let m = gw.drained().await;
    assert_ledger(&m, all.len() as f64);

    let body = eventually(Duration::from_secs(30), "all points queryable", || async {
        let body = influx
            .query("telemetry", "SELECT count(temp) FROM env")
            .await?;
        let n = body
            .pointer("/results/0/series/0/values/0/1")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        anyhow::ensure!(n == all.len() as u64, "{n} of {} points", all.len());
        influx
            .query(
                "telemetry",
                "SELECT device, hum, note, ok, site, temp FROM env",
            )
            .await
    })
    .await;
    let values = body
        .pointer("/results/0/series/0/values")
        .and_then(|v| v.as_array())
        .expect("rows");
    let mut found: Vec<Reading> = values
        .iter()
        .map(|row| {
            assert_eq!(
                row[3].as_str(),
                Some(NOTE),
                "string field survives escaping"
            );
            assert_eq!(row[5].as_str(), Some(SITE), "tag value survives escaping");
            Reading {
                ts: row[0].as_i64().expect("ns time"),
                device: row[1].as_str().expect("device").to_owned(),
                hum: row[2].as_f64().expect("hum is a float") as i64,
                ok: row[4].as_bool().expect("ok"),
                temp: row[6].as_f64().expect("temp"),
            }
        })
        .collect();
    let mut want = all.clone();
    let key = |r: &Reading| (r.device.clone(), r.ts);
    found.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(found.len(), want.len());
    assert_eq!(
        found, want,
        "exactly the published readings, to the nanosecond"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_by_reason_while_good_devices_flow() {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_DECODE__MAX_PAYLOAD_BYTES", "4KiB".into()),
        ("GATEWAY_DECODE__MAX_TEXT_BYTES", "100".into()),
    ])
    .await;
    let ts = base_ms();
    let good = |v: f64| serde_json::json!({"ts": ts, "fields": {"v": v}});
    // One payload mixing good and bad readings: the good ones land.
    let mixed = serde_json::json!([
        good(1.0),
        {"ts": ts + 1, "fields": {}},
        {"ts": ts + 2},
        {"ts": ts + 3, "fields": {"v": {"nested": 1}}},
        {"ts": ts + 4, "fields": {"v": 2.0}},
        {"ts": 4_102_444_800_000i64, "fields": {"v": 3.0}},
        {"ts": ts + 5, "fields": {"s": "x".repeat(101)}},
    ]);
    let nan = cbor(&C::Map(vec![(
        C::Text("fields".into()),
        C::Map(vec![(C::Text("v".into()), C::Float(f64::NAN))]),
    )]));
    let inf = cbor(&C::Map(vec![(
        C::Text("fields".into()),
        C::Map(vec![(C::Text("v".into()), C::Float(f64::INFINITY))]),
    )]));
    let good_cbor = cbor(&C::Map(vec![
        (C::Text("ts".into()), C::Integer(ts.into())),
        (
            C::Text("fields".into()),
            C::Map(vec![(C::Text("v".into()), C::Float(1.0))]),
        ),
    ]));
    let truncated = good_cbor[..good_cbor.len() - 4].to_vec();
    let msg = |topic: &str, payload: Vec<u8>| Message {
        topic: topic.into(),
        payload,
        content_type: None,
    };
    let bad_topic = "telemetry/bad/env";
    let bad = vec![
        msg(bad_topic, serde_json::to_vec(&mixed).expect("json")),
        msg(bad_topic, b"\xde\xad\xbe\xef garbage".to_vec()),
        msg(bad_topic, truncated),
        msg(bad_topic, br#"{"fields": {"v": 1"#.to_vec()),
        msg(bad_topic, nan),
        msg(bad_topic, inf),
        msg(bad_topic, vec![b' '; 5000]),
        msg("telemetry/bad", br#"{"fields": {"v": 1}}"#.to_vec()),
        msg("elsewhere/bad/env", br#"{"fields": {"v": 1}}"#.to_vec()),
        msg(
            "telemetry/bad device/env",
            br#"{"fields": {"v": 1}}"#.to_vec(),
        ),
    ];
    // Meanwhile another device keeps publishing good readings.
    let good_msgs: Vec<Message> = (0..500)
        .map(|i| {
            msg(
                "telemetry/good/env",
                serde_json::to_vec(&serde_json::json!({"ts": ts + i, "fields": {"v": i}}))
                    .expect("json"),
            )
        })
        .collect();
    let port = gw.mqtt_port;
    let good_task = tokio::spawn(async move { publish_v4(port, "good", good_msgs).await });
    publish_v4(gw.mqtt_port, "bad", bad)
        .await
        .expect("bad device's messages are acknowledged too");
    good_task
        .await
        .expect("task")
        .expect("good device unaffected");

    let m = gw.drained().await;
    let reason = |r: &str| {
        m.get(&format!(
            "gateway_readings_rejected_total{{reason=\"{r}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    let expected = [
        ("empty_fields", 1.0),
        ("missing_fields", 1.0),
        ("nested_value", 1.0),
        ("timestamp_in_future", 1.0),
        ("text_too_long", 1.0),
        ("malformed_cbor", 1.0),
        ("truncated", 2.0),
        ("non_finite", 2.0),
        ("payload_too_large", 1.0),
        // telemetry/bad and telemetry/bad device/env; elsewhere/bad/env is not telemetry and
        // goes to the embedded broker's subscribers.
        ("bad_topic", 2.0),
    ];
    for (r, n) in expected {
        assert_eq!(reason(r), n, "reason {r}; metrics: {m:?}");
    }
    let rejected_total: f64 = expected.iter().map(|(_, n)| n).sum();
    assert_eq!(
        sum(&m, "gateway_readings_rejected_total"),
        rejected_total,
        "no other reasons"
    );
    // 500 good + 2 good readings of the mixed payload.
    assert_eq!(m["gateway_readings_accepted_total"], 502.0);
    assert_eq!(m["gateway_sink_readings_written_total"], 502.0);
    let n = eventually(Duration::from_secs(20), "good readings visible", || async {
        let n = vm.count(r#"{__name__="env_v"}"#).await?;
        anyhow::ensure!(n == 502, "{n} of 502");
        Ok(n)
    })
    .await;
    assert_eq!(n, 502);
    let logs = gw.logs();
    assert!(
        logs.contains("non_finite") && logs.contains("bad_topic"),
        "rejections are logged with their reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_sink_parks_everything_in_the_dlq() {
    // Nothing listens on this port: every write fails to connect.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", dead),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "2".into()),
        ("GATEWAY_SINK__RETRY_INITIAL", "10ms".into()),
        ("GATEWAY_SINK__RETRY_MAX", "20ms".into()),
    ])
    .await;
    let ts = base_ms();
    let msgs: Vec<Message> = (0..50)
        .map(|i| Message {
            topic: "telemetry/d1/env".into(),
            payload: serde_json::to_vec(&serde_json::json!({"ts": ts + i, "fields": {"v": i}}))
                .expect("json"),
            content_type: None,
        })
        .collect();
    publish_v4(gw.mqtt_port, "d1", msgs)
        .await
        .expect("published");
    let m = gw.drained().await;
    assert_eq!(m["gateway_readings_accepted_total"], 50.0);
    assert_eq!(
        m.get("gateway_sink_readings_written_total")
            .copied()
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        m["gateway_dlq_parked_readings_total{kind=\"retries_exhausted\"}"],
        50.0
    );
    assert_eq!(m["gateway_dlq_readings"], 50.0, "parked, not gone");
    assert!(m["gateway_sink_retries_total"] >= 1.0);
    let ready = http()
        .get(format!("{}/readyz", gw.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status().as_u16(),
        503,
        "not ready while the sink is unreachable"
    );
    assert!(gw.logs().contains("the sink is down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_load_writes_everything_accepted() {
    let vm = VictoriaMetrics::start().await;
    let mut gw = Gateway::start(&[
        ("GATEWAY_SINK__URL", vm.url.clone()),
        ("GATEWAY_BATCH__LINGER", "2s".into()),
    ])
    .await;
    let ts = base_ms();
    let port = gw.mqtt_port;
    // Publishers keep going while the signal arrives; some of their messages land after it.
    let load: Vec<_> = (0..4)
        .map(|d| {
            tokio::spawn(async move {
                let msgs: Vec<Message> = (0..5000)
                    .map(|i| Message {
                        topic: format!("telemetry/load-{d}/env"),
                        payload: serde_json::to_vec(
                            &serde_json::json!({"ts": ts + i, "fields": {"v": i}}),
                        )
                        .expect("json"),
                        content_type: None,
                    })
                    .collect();
                publish_v4(port, &format!("load-{d}"), msgs).await
            })
        })
        .collect();
    eventually(Duration::from_secs(30), "load under way", || async {
        let n = gw
            .metrics()
            .await?
            .get("gateway_readings_accepted_total")
            .copied()
            .unwrap_or(0.0);
        anyhow::ensure!(n >= 2000.0, "{n} accepted so far");
        Ok(())
    })
    .await;
    let status = gw.terminate();
    assert!(status.success(), "exit 0 after SIGTERM, got {status:?}");
    for t in load {
        let _ = t.await; // publishers may see the connection close: expected
    }
    // The final log line is the ledger.
    let logs = gw.logs();
    let last: serde_json::Value = logs
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.pointer("/fields/ledger").is_some())
        .expect("a ledger line at shutdown");
    let ledger = last
        .pointer("/fields/ledger")
        .and_then(|v| v.as_str())
        .expect("ledger text")
        .to_owned();
    let field = |name: &str| -> u64 {
        let start = ledger.find(&format!("{name}: ")).expect("field") + name.len() + 2;
        ledger[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .expect("digits")
            .parse()
            .expect("number")
    };
    let (accepted, written) = (field("accepted"), field("written"));
    assert!(accepted >= 2000);
    assert_eq!(
        written, accepted,
        "everything accepted before the signal was written: {ledger}"
    );
    let in_sink = eventually(Duration::from_secs(20), "sink count", || async {
        let n = vm.count(r#"{__name__="env_v"}"#).await?;
        anyhow::ensure!(n as u64 == written, "{n} in the sink, {written} written");
        Ok(n)
    })
    .await;
    assert_eq!(in_sink as u64, accepted);
}

/// A sink that accepts connections and never answers: the pipeline behind the broker stalls.
fn hanging_sink() -> (std::net::TcpListener, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    (listener, url)
}

/// A sink that holds every connection open without answering until `release` is set; then
/// the listener closes, so writes fail fast (connection refused) and the pipeline drains.
fn held_sink() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (listener, url) = hanging_sink();
    let release = std::sync::Arc::new(AtomicBool::new(false));
    let holder = {
        let release = release.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            listener.set_nonblocking(true).expect("nonblocking");
            let until = std::time::Instant::now() + Duration::from_secs(120);
            while std::time::Instant::now() < until && !release.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    };
    (url, release, holder)
}

/// The settings under which a stalled sink backs up into the write-ahead log, and fills it.
fn stalled_pipeline(url: String) -> Vec<(&'static str, String)> {
    vec![
        ("GATEWAY_SINK__URL", url),
        ("GATEWAY_SINK__TIMEOUT", "1s".into()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "1".into()),
        ("GATEWAY_SINK__MAX_IN_FLIGHT", "1".into()),
        ("GATEWAY_QUEUE__MAX_READINGS", "10".into()),
        ("GATEWAY_BATCH__MAX_READINGS", "10".into()),
        // The smallest log the config allows: one segment of 64 KiB, about 150 messages.
        ("GATEWAY_WAL__MAX_BYTES", "64KiB".into()),
        ("GATEWAY_WAL__SEGMENT_BYTES", "64KiB".into()),
    ]
}

/// `n` messages of about 450 bytes from device `flood`.
fn flood(n: u64) -> Vec<Message> {
    let ts = base_ms();
    let padding = "p".repeat(400);
    (0..n as i64)
        .map(|i| Message {
            topic: "telemetry/flood/env".into(),
            payload: serde_json::to_vec(
                &serde_json::json!({"ts": ts + i, "fields": {"v": i, "pad": padding}}),
            )
            .expect("json"),
            content_type: None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_write_ahead_log_holds_devices_back_instead_of_dropping() {
    use std::sync::atomic::Ordering;
    let (url, release, holder) = held_sink();
    let gw = Gateway::start(&stalled_pipeline(url)).await;
    let published = 5_000u64;
    let port = gw.mqtt_port;
    let publisher = tokio::spawn(async move { publish_v4(port, "flood", flood(published)).await });
    let m = eventually(
        Duration::from_secs(30),
        "the guard holds the device back",
        || async {
            let m = gw.metrics().await?;
            anyhow::ensure!(
                get(&m, "gateway_ingest_paused_total") > 0.0 && get(&m, "gateway_wal_full") == 1.0,
                "not full yet"
            );
            Ok(m)
        },
    )
    .await;
    let taken = get(&m, "gateway_messages_received_total");
    assert!(
        taken < published as f64,
        "the device waits with most of its messages: {taken} taken"
    );
    assert!(!publisher.is_finished(), "the device is held back");
    release.store(true, Ordering::Relaxed);
    let _ = holder.join();
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the device finishes once the pipeline moves")
        .expect("joined")
        .expect("every message acknowledged");
    let m = gw
        .wait_metric("gateway_messages_received_total", published as f64)
        .await;
    assert_eq!(
        get(&m, "gateway_readings_accepted_total"),
        published as f64,
        "nothing dropped"
    );
    // The sink never came back: every reading is parked exactly once, none left in the log.
    let m = gw
        .wait_metric("gateway_dlq_readings", published as f64)
        .await;
    assert_eq!(get(&m, "gateway_wal_readings"), 0.0, "{m:?}");
}
