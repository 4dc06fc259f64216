//! A PUBACK means the reading is safe. Devices (real MQTT clients) track which PUBACKs they
//! received; the gateway is killed (`kill -9`), stopped (SIGTERM) or loses power (a failpoint
//! that throws away what was written after the last fdatasync) at random moments, and started
//! again on the same directories; devices resend what was never acknowledged, as MQTT devices
//! do. At the end every acknowledged reading is in the sink, counted exactly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::proxy::{Fault, FaultProxy};
use e2e::*;
use rand::{Rng, SeedableRng};

const DEVICES: usize = 10;
const MEASUREMENT: &str = "crash";

/// One device's readings: each timestamp is one reading, unique for the device.
#[derive(Default)]
struct Device {
    next_ts: i64,
    /// Sent, not (yet) acknowledged: sent again on the next connection.
    outbox: BTreeSet<i64>,
    acked: BTreeSet<i64>,
    /// Readings sent more than once.
    resent: u64,
}

struct Fleet {
    devices: Vec<Device>,
    acked: Arc<AtomicU64>,
}

impl Fleet {
    fn new() -> Self {
        let base = base_ms() - 3_600_000;
        let acked = Arc::new(AtomicU64::new(0));
        Self {
            devices: (0..DEVICES)
                .map(|d| Device {
                    // 100 s apart: room for 100,000 readings each, all within the accepted age.
                    next_ts: base + d as i64 * 100_000,
                    ..Device::default()
                })
                .collect(),
            acked,
        }
    }

    /// Every device publishes what it has not had acknowledged, then `fresh` new readings,
    /// until all are acknowledged or its connection ends. Returns once every device is done.
    async fn publish(&mut self, port: u16, fresh: usize) {
        let mut tasks = Vec::new();
        for (d, device) in self.devices.iter_mut().enumerate() {
            let mut send: Vec<i64> = device.outbox.iter().copied().collect();
            device.resent += send.len() as u64;
            for _ in 0..fresh {
                send.push(device.next_ts);
                device.outbox.insert(device.next_ts);
                device.next_ts += 1;
            }
            let acked = self.acked.clone();
            tasks.push(tokio::spawn(publish_tracked(port, d, send, acked)));
        }
        for (device, task) in self.devices.iter_mut().zip(tasks) {
            for ts in task.await.expect("device task") {
                device.outbox.remove(&ts);
                device.acked.insert(ts);
            }
        }
    }

    fn acked(&self) -> u64 {
        self.devices.iter().map(|d| d.acked.len() as u64).sum()
    }

    fn unacked(&self) -> u64 {
        self.devices.iter().map(|d| d.outbox.len() as u64).sum()
    }
}

/// Publishes `stamps` at QoS 1 over MQTT 3.1.1 and returns those whose PUBACK arrived before
/// the connection ended.
async fn publish_tracked(
    port: u16,
    device: usize,
    stamps: Vec<i64>,
    acked: Arc<AtomicU64>,
) -> Vec<i64> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
    let mut opts = MqttOptions::new(format!("crash-{device}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(50);
    let (client, mut events) = AsyncClient::new(opts, 64);
    let topic = format!("telemetry/{MEASUREMENT}-{device}/{MEASUREMENT}");
    let total = stamps.len();
    let payloads: Vec<(i64, Vec<u8>)> = stamps
        .iter()
        .map(|ts| {
            let json = serde_json::json!({"ts": ts, "fields": {"v": *ts as f64}});
            (*ts, serde_json::to_vec(&json).expect("json"))
        })
        .collect();
    let order: Vec<i64> = payloads.iter().map(|(ts, _)| *ts).collect();
    let publisher = tokio::spawn(async move {
        for (_, payload) in payloads {
            if client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    // rumqttc gives packet ids in the order of the publishes: the k-th outgoing PUBLISH is
    // the k-th reading, and its id stands for it until its PUBACK.
    let mut sent = 0usize;
    let mut in_flight: HashMap<u16, i64> = HashMap::new();
    let mut done = Vec::new();
    while done.len() < total {
        match tokio::time::timeout(Duration::from_secs(30), events.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                in_flight.insert(pkid, order[sent]);
                sent += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                if let Some(ts) = in_flight.remove(&ack.pkid) {
                    done.push(ts);
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Ok(_)) => {}
            // The gateway went away: what was not acknowledged is sent again next time.
            Ok(Err(_)) | Err(_) => break,
        }
    }
    publisher.abort();
    done
}

/// The fleet publishes `fresh` readings a device (after its outbox); once `target` PUBACKs
/// have gone out in all, `fault` strikes, and the devices finish as their connections end.
async fn interrupt(fleet: &mut Fleet, port: u16, fresh: usize, target: u64, fault: impl FnOnce()) {
    let acked = fleet.acked.clone();
    let published = std::sync::atomic::AtomicBool::new(false);
    let publish = async {
        fleet.publish(port, fresh).await;
        published.store(true, Ordering::Release);
    };
    let strike = async {
        while acked.load(Ordering::Relaxed) < target && !published.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        fault();
    };
    tokio::join!(publish, strike);
}

/// A gateway on `dir`'s write-ahead log and dead-letter queue, writing through `sink`.
async fn gateway(dir: &Path, sink: &str, extra: &[(&'static str, String)]) -> Gateway {
    let mut env = vec![
        ("GATEWAY_SINK__URL", sink.to_owned()),
        ("GATEWAY_SINK__TIMEOUT", "1s".to_owned()),
        ("GATEWAY_SINK__RETRY_MAX", "200ms".to_owned()),
        ("GATEWAY_WAL__DIR", dir.join("wal").display().to_string()),
        ("GATEWAY_DLQ__DIR", dir.join("dlq").display().to_string()),
    ];
    env.extend(extra.iter().cloned());
    Gateway::start(&env).await
}

/// What the sink holds for the fleet: timestamps per device, and how many samples in all.
async fn in_sink(vm: &VictoriaMetrics) -> (BTreeMap<usize, BTreeSet<i64>>, u64) {
    let series = vm
        .export(&format!(r#"{{__name__="{MEASUREMENT}_v"}}"#))
        .await
        .expect("export");
    let mut found: BTreeMap<usize, BTreeSet<i64>> = BTreeMap::new();
    let mut samples = 0u64;
    for s in series {
        let device: usize = s.metric["device"]
            .trim_start_matches(&format!("{MEASUREMENT}-"))
            .parse()
            .expect("device number");
        samples += s.timestamps.len() as u64;
        found.entry(device).or_default().extend(s.timestamps);
    }
    (found, samples)
}

/// Starts a last gateway with a healthy sink, lets the devices send what was never
/// acknowledged, and checks the sink: every acknowledged reading is there, nothing that was
/// never sent is, and duplicates are counted. Returns the acknowledged readings lost.
async fn settle_and_count(dir: &Path, vm: &VictoriaMetrics, fleet: &mut Fleet, what: &str) -> u64 {
    let gw = gateway(dir, &vm.url, &[]).await;
    // A device resends until everything it has is acknowledged.
    for _ in 0..5 {
        if fleet.unacked() == 0 {
            break;
        }
        fleet.publish(gw.mqtt_port, 0).await;
    }
    assert_eq!(
        fleet.unacked(),
        0,
        "a healthy gateway acknowledges everything"
    );
    let expected: u64 = fleet.acked();
    eventually(
        Duration::from_secs(120),
        "written, nothing left behind",
        || async {
            let m = gw.metrics().await?;
            let left = get(&m, "gateway_wal_readings")
                + get(&m, "gateway_queue_readings")
                + get(&m, "gateway_readings_in_flight")
                + get(&m, "gateway_dlq_readings");
            let taken = get(&m, "gateway_readings_accepted_total")
                + get(&m, "gateway_wal_inherited_readings")
                + get(&m, "gateway_dlq_inherited_readings");
            let written = get(&m, "gateway_sink_readings_written_total");
            anyhow::ensure!(
                left == 0.0 && written == taken,
                "{written} of {taken} written, {left} not yet"
            );
            Ok(())
        },
    )
    .await;
    let (found, samples) = in_sink(vm).await;
    let mut lost = 0u64;
    let mut distinct = 0u64;
    for (d, device) in fleet.devices.iter().enumerate() {
        let there = found.get(&d).cloned().unwrap_or_default();
        lost += device.acked.difference(&there).count() as u64;
        let never_sent: Vec<_> = there.difference(&device.acked).take(5).collect();
        assert!(
            never_sent.is_empty(),
            "device {d}: readings never sent: {never_sent:?}"
        );
        distinct += there.len() as u64;
    }
    let resent: u64 = fleet.devices.iter().map(|d| d.resent).sum();
    eprintln!(
        "{what}: {expected} readings acknowledged, {distinct} distinct in the sink, {lost} lost; \
         {} duplicate samples, {resent} readings resent without a PUBACK",
        samples - distinct
    );
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_loses_no_acknowledged_reading() {
    let vm = VictoriaMetrics::start().await;
    let proxy = FaultProxy::start(&vm.url).await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut fleet = Fleet::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let cycles = 20;
    for cycle in 0..cycles {
        // Sink up, slow, or hanging, in turn.
        let fault = match cycle % 3 {
            0 => Fault::Pass,
            1 => Fault::Throttle(2_000),
            _ => Fault::Hang,
        };
        proxy.set(fault);
        let mut gw = gateway(dir.path(), &proxy.url, &[]).await;
        // Killed once this many more PUBACKs have gone out: a moment the test does not choose.
        let target = fleet.acked() + rng.gen_range(50..2_500);
        let port = gw.mqtt_port;
        let acked = fleet.acked.clone();
        interrupt(&mut fleet, port, 300, target, || {
            gw.proc.child.kill().expect("kill -9");
        })
        .await;
        let _ = gw.proc.child.kill();
        let _ = gw.proc.child.wait();
        eprintln!(
            "cycle {cycle}: {} acknowledged so far",
            acked.load(Ordering::Relaxed)
        );
    }
    proxy.set(Fault::Pass);
    let lost = settle_and_count(dir.path(), &vm, &mut fleet, "kill -9 × 20").await;
    assert_eq!(lost, 0, "acknowledged readings lost");
}

/// The ledger from the shutdown's last log line: (balanced, the line).
fn final_ledger(logs: &str) -> (bool, String) {
    let line = logs
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| {
            v.pointer("/fields/ledger")
                .and_then(|l| l.as_str())
                .map(str::to_owned)
        })
        .expect("a ledger line at shutdown");
    let field = |name: &str| -> u64 {
        let start = line.find(&format!("{name}: ")).expect("field") + name.len() + 2;
        line[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .expect("number")
    };
    let left = field("accepted") + field("inherited");
    let right = [
        "written",
        "in_dlq",
        "expired",
        "in_log",
        "queued",
        "in_flight",
    ]
    .iter()
    .map(|f| field(f))
    .sum::<u64>();
    (left == right, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_devices_publish_loses_no_acknowledged_reading() {
    let vm = VictoriaMetrics::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut fleet = Fleet::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for cycle in 0..3 {
        let mut gw = gateway(dir.path(), &vm.url, &[]).await;
        let target = fleet.acked() + rng.gen_range(500..3_000);
        let pid = gw.proc.child.id().to_string();
        interrupt(&mut fleet, gw.mqtt_port, 1_000, target, || {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status();
        })
        .await;
        let status = gw.terminate();
        assert!(
            status.success(),
            "cycle {cycle}: exit 0 after SIGTERM, got {status:?}"
        );
        let (balanced, ledger) = final_ledger(&gw.logs());
        assert!(balanced, "cycle {cycle}: the ledger balances: {ledger}");
    }
    let lost = settle_and_count(dir.path(), &vm, &mut fleet, "SIGTERM × 3").await;
    assert_eq!(lost, 0, "acknowledged readings lost");
}

/// Devices publish until the gateway's `failpoints` end it with a power cut; returns the
/// acknowledged readings lost once it is back.
async fn power_cut(failpoints: &str, seed: u64) -> u64 {
    let vm = VictoriaMetrics::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let mut fleet = Fleet::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let at = rng.gen_range(5..100);
    let spec = format!("{failpoints}wal_power_cut={at}");
    let mut gw = gateway(dir.path(), &vm.url, &[("FAILPOINTS", spec)]).await;
    // The gateway cuts its own power at its `at`-th sync; the devices publish until it does.
    let mut rounds = 0;
    let status = loop {
        fleet.publish(gw.mqtt_port, 500).await;
        if let Some(status) = gw.proc.child.try_wait().expect("wait") {
            break status;
        }
        rounds += 1;
        assert!(rounds < 100, "no power cut at sync {at}");
    };
    assert!(
        !status.success(),
        "ended by the failpoint, not by itself: {status:?}"
    );
    assert!(
        gw.logs().contains("failpoint wal_power_cut"),
        "the power cut happened"
    );
    settle_and_count(dir.path(), &vm, &mut fleet, failpoints).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_power_cut_loses_no_acknowledged_reading() {
    assert_eq!(power_cut("", 23).await, 0, "acknowledged readings lost");
}

/// The power-cut test catches the bug it is there for: acknowledging before the sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_power_cut_test_fails_when_acknowledgements_go_before_the_sync() {
    let lost = power_cut("wal_ack_before_sync,", 29).await;
    assert!(
        lost > 0,
        "acknowledged before the sync, so a power cut must lose some"
    );
}
