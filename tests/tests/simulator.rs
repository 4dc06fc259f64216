//! The device simulator against the real gateway and VictoriaMetrics, one profile per test:
//! the `simulator` binary runs for a few seconds, and its exit code and JSON report are checked
//! against the sink and the gateway's own counters.
//!
//! Needs `target/<profile>/simulator` next to the gateway: `cargo build -p simulator`
//! (./scripts/test.sh builds it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use e2e::{eventually, get, sum, Gateway, VictoriaMetrics};
use serde_json::Value;

fn simulator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/simulator
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = profile_dir.join("simulator");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p simulator` (./scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// What one simulator run left behind.
struct Run {
    code: i32,
    report: Value,
    stdout: String,
}

/// Runs the simulator against `gw` (MQTT 3.1.1 port unless `args` names another) verifying in
/// `vm`, and returns its exit code and report.
async fn simulate(gw: &Gateway, vm: &VictoriaMetrics, args: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("report.json");
    let mut cmd = tokio::process::Command::new(simulator_binary());
    cmd.arg("run")
        .args(["--verify-vm", &vm.url])
        .args(["--poll-interval", "250ms"])
        .arg("--report")
        .arg(&report)
        .args(args)
        .env("RUST_LOG", "warn");
    // Defaults a test may override (a flag given twice is a usage error).
    let port = gw.mqtt_port.to_string();
    for (flag, value) in [("--port", port.as_str()), ("--verify-timeout", "20s")] {
        if !args.contains(&flag) {
            cmd.args([flag, value]);
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the simulator finishes within a minute")
        .expect("the simulator runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = std::fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| panic!("no report; stdout:\n{stdout}\nstderr:\n{stderr}"));
    // Output to a pipe or a file is plain text: no terminal colour codes.
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "colour codes in the simulator's output:\n{stderr}"
    );
    Run {
        code: out.status.code().unwrap_or(-1),
        report,
        stdout,
    }
}

fn u(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{pointer} missing in {v:#}"))
}

fn f(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} missing in {v:#}"))
}

/// Exit 0, every device fine, nothing lost, everything expected found.
fn assert_delivered(run: &Run) {
    let r = &run.report;
    assert_eq!(run.code, 0, "{}\n{r:#}", run.stdout);
    assert_eq!(u(r, "/devices_failed"), 0, "{r:#}");
    assert_eq!(u(r, "/verification/lost"), 0, "{}", run.stdout);
    let expected = u(r, "/readings_expected");
    assert!(expected > 0);
    assert_eq!(u(r, "/verification/expected_readings"), expected);
    assert_eq!(u(r, "/verification/readings_found"), expected);
    assert_eq!(r["verification"]["timed_out"], false);
}

async fn start() -> (VictoriaMetrics, Gateway) {
    let vm = VictoriaMetrics::start().await;
    let gw = Gateway::start(&[("GATEWAY_SINK__URL", vm.url.clone())]).await;
    (vm, gw)
}

/// This run's readings in the sink, per series, flushed first. The time range is explicit:
/// the export's default end is "now", which leaves out clocks that run ahead.
async fn export(vm: &VictoriaMetrics, run_id: &str, device: Option<&str>) -> Vec<e2e::VmSeries> {
    let device = device
        .map(|d| format!(r#",device="{d}""#))
        .unwrap_or_default();
    let http = e2e::http();
    http.post(format!("{}/internal/force_flush", vm.url))
        .send()
        .await
        .expect("force_flush");
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let body = http
        .get(format!("{}/api/v1/export", vm.url))
        .query(&[
            (
                "match[]",
                format!(r#"{{__name__="env_value",run="{run_id}"{device}}}"#),
            ),
            ("start", "0".to_owned()),
            ("end", (now_s + 3600).to_string()),
        ])
        .send()
        .await
        .expect("export")
        .error_for_status()
        .expect("export answered")
        .text()
        .await
        .expect("export body");
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("export line"))
        .collect()
}

/// Timestamps in the sink of one device of one run, in order.
async fn stamps(vm: &VictoriaMetrics, run_id: &str, device: &str) -> Vec<i64> {
    let mut ts: Vec<i64> = export(vm, run_id, Some(device))
        .await
        .into_iter()
        .flat_map(|s| s.timestamps)
        .collect();
    ts.sort_unstable();
    ts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_fleet_everything_found_with_latency_per_device() {
    let (vm, gw) = start().await;
    let run = simulate(
        &gw,
        &vm,
        &[
            "--devices",
            "30",
            "--rate",
            "5",
            "--duration",
            "3s",
            "--readings-per-message",
            "3",
            "--format",
            "mixed",
        ],
    )
    .await;
    assert_delivered(&run);
    let r = &run.report;
    // 30 devices × 5 messages/s × 3 s, 3 readings each.
    assert_eq!(u(r, "/messages_sent"), 450);
    assert_eq!(u(r, "/acked"), 450);
    assert_eq!(u(r, "/readings_expected"), 1350);
    let lat = &r["verification"]["latency"];
    assert_eq!(u(lat, "/readings"), 1350);
    let (p50, p90, p99, max) = (
        f(lat, "/p50_ms"),
        f(lat, "/p90_ms"),
        f(lat, "/p99_ms"),
        f(lat, "/max_ms"),
    );
    assert!(0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= max, "{lat}");
    assert!(max < 20_000.0, "{lat}");
    // Per device: all 30, each with its 45 readings and its own latency.
    let devices = r["verification"]["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 30);
    for d in devices {
        assert_eq!(
            (u(d, "/expected"), u(d, "/found"), u(d, "/lost")),
            (45, 45, 0)
        );
        assert!(f(d, "/latency_p50_ms") > 0.0);
    }
    // The sink, asked independently, holds exactly that, once each.
    let run_id = r["run_id"].as_str().expect("run id");
    let ts = stamps(&vm, run_id, "dev-00007").await;
    assert_eq!(ts.len(), 45);
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "unique timestamps");
    assert!(run.stdout.contains("latency   publish to visible: p50"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursty_fleets_on_off_and_poisson() {
    let (vm, gw) = start().await;
    // On-off over MQTT 5: 1 s bursts at 10 messages/s, 1 s of silence.
    let run = simulate(
        &gw,
        &vm,
        &[
            "--port",
            &gw.mqtt5_port.to_string(),
            "--protocol",
            "v5",
            "--devices",
            "20",
            "--profile",
            "on-off",
            "--rate",
            "10",
            "--on",
            "1s",
            "--off",
            "1s",
            "--duration",
            "4s",
        ],
    )
    .await;
    assert_delivered(&run);
    let r = &run.report;
    let start = r["start_ms"].as_i64().expect("start_ms");
    let run_id = r["run_id"].as_str().expect("run id");
    let ts = stamps(&vm, run_id, "dev-00005").await;
    assert!((15..=25).contains(&ts.len()), "{}", ts.len());
    // Every reading was measured inside a burst (plus a little scheduling slack).
    for t in &ts {
        let into_period = (t - start).rem_euclid(2000);
        assert!(
            into_period < 1100,
            "reading at {into_period} ms into a 2 s period"
        );
    }

    // Poisson at QoS 0: irregular gaps, so devices send different counts; still nothing lost.
    let run = simulate(
        &gw,
        &vm,
        &[
            "--devices",
            "20",
            "--profile",
            "poisson",
            "--rate",
            "10",
            "--duration",
            "3s",
            "--qos",
            "0",
        ],
    )
    .await;
    assert_delivered(&run);
    let counts: Vec<u64> = run.report["verification"]["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| u(d, "/expected"))
        .collect();
    let (lo, hi) = (counts.iter().min(), counts.iter().max());
    assert!(lo < hi, "Poisson arrivals vary per device: {counts:?}");
    let total: u64 = counts.iter().sum();
    assert!(
        (400..=800).contains(&total),
        "about 20 × 10/s × 3 s: {total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thundering_herd_every_device_reconnects_at_once_and_nothing_is_lost() {
    let (vm, gw) = start().await;
    let run = simulate(
        &gw,
        &vm,
        &[
            "--devices",
            "200",
            "--profile",
            "thundering-herd",
            "--herd-at",
            "2s",
            "--rate",
            "2",
            "--duration",
            "4s",
        ],
    )
    .await;
    assert_delivered(&run);
    let r = &run.report;
    assert_eq!(u(r, "/herd/reconnected"), 200, "{r:#}");
    assert_eq!(u(r, "/herd/reconnect/count"), 200);
    assert_eq!(u(r, "/messages_sent"), 1600);
    // Both connections of every device went through the gateway's broker.
    let m = gw.metrics().await.expect("metrics");
    assert_eq!(sum(&m, "gateway_readings_rejected_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backlog_lands_with_its_old_timestamps() {
    let (vm, gw) = start().await;
    let run = simulate(
        &gw,
        &vm,
        &[
            "--devices",
            "10",
            "--profile",
            "offline-backlog",
            "--offline-ratio",
            "0.5",
            "--offline-at",
            "1s",
            "--offline-for",
            "3s",
            "--rate",
            "4",
            "--duration",
            "6s",
        ],
    )
    .await;
    assert_delivered(&run);
    let r = &run.report;
    assert_eq!(u(r, "/backlog/devices"), 5, "{r:#}");
    // 3 s offline at 4 messages/s: 12 buffered readings each.
    let buffered = u(r, "/backlog/readings");
    assert!((55..=65).contains(&buffered), "{buffered}");
    assert!(f(r, "/backlog/max_age_ms") >= 2500.0, "{r:#}");
    // Devices 2, 4, ... went offline: their readings from the outage are in the sink, stamped
    // when they were measured, not when they were sent.
    let start = r["start_ms"].as_i64().expect("start_ms");
    let run_id = r["run_id"].as_str().expect("run id");
    let ts = stamps(&vm, run_id, "dev-00002").await;
    let during: Vec<i64> = ts
        .iter()
        .copied()
        .filter(|t| (start + 1000..start + 4000).contains(t))
        .collect();
    assert!((11..=13).contains(&during.len()), "{during:?} of {ts:?}");
    assert_eq!(ts.len(), 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_rejections_match_the_gateways_counters_exactly() {
    let (vm, gw) = start().await;
    let mut expected: HashMap<String, u64> = HashMap::new();
    // Over MQTT 3.1.1 (the gateway sniffs the format) and MQTT 5 (content type), both formats.
    for (port, protocol, seed) in [(gw.mqtt_port, "v4", "1"), (gw.mqtt5_port, "v5", "2")] {
        let run = simulate(
            &gw,
            &vm,
            &[
                "--port",
                &port.to_string(),
                "--protocol",
                protocol,
                "--seed",
                seed,
                "--devices",
                "20",
                "--messages",
                "40",
                "--rate",
                "20",
                "--format",
                "mixed",
                "--bad-ratio",
                "0.3",
            ],
        )
        .await;
        assert_delivered(&run);
        let r = &run.report;
        let sent = r["bad_input_sent"].as_object().expect("bad_input_sent");
        assert_eq!(sent.len(), 7, "every kind: {sent:?}");
        for (reason, n) in r["expected_rejections"].as_object().expect("rejections") {
            *expected.entry(reason.clone()).or_default() += n.as_u64().expect("count");
        }
        // The good messages all landed; the bad ones are not expected there.
        let bad: u64 = sent.values().filter_map(Value::as_u64).sum();
        assert_eq!(u(r, "/messages_sent"), 800);
        assert_eq!(u(r, "/readings_expected"), 800 - bad);
    }
    let m = gw.drained().await;
    for (reason, n) in &expected {
        let key = format!("gateway_readings_rejected_total{{reason=\"{reason}\"}}");
        assert_eq!(m.get(&key).copied().unwrap_or(0.0), *n as f64, "{reason}");
    }
    let total: u64 = expected.values().sum();
    assert_eq!(sum(&m, "gateway_readings_rejected_total"), total as f64);

    // And when readings do not land, the simulator says so and exits non-zero: a topic prefix
    // the gateway does not serve is not telemetry, and goes to the embedded broker (for its
    // subscribers) instead of the sink.
    let before = gw.metric("gateway_messages_received_total").await;
    let run = simulate(
        &gw,
        &vm,
        &[
            "--devices",
            "3",
            "--messages",
            "5",
            "--topic-prefix",
            "elsewhere",
            "--verify-timeout",
            "2s",
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert_eq!(u(&run.report, "/verification/lost"), 15);
    assert_eq!(u(&run.report, "/verification/readings_found"), 0);
    assert!(run.stdout.contains("lost 15"), "{}", run.stdout);
    let m = gw.metrics().await.expect("metrics");
    assert_eq!(
        get(&m, "gateway_messages_received_total"),
        before,
        "not telemetry: none of it reached the decoder"
    );
    assert_eq!(
        get(&m, r#"gateway_readings_rejected_total{reason="bad_topic"}"#),
        expected.get("bad_topic").copied().unwrap_or(0) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_within_the_limit_lands_beyond_it_is_refused_and_counted() {
    let (vm, gw) = start().await;
    let run = simulate(
        &gw,
        &vm,
        &[
            "--devices",
            "40",
            "--skew-ratio",
            "1",
            "--skew-max",
            "20m",
            "--rate",
            "4",
            "--duration",
            "2s",
            "--readings-per-message",
            "2",
        ],
    )
    .await;
    assert_delivered(&run);
    let r = &run.report;
    let beyond = u(r, "/skew/devices_beyond_limits");
    assert_eq!(u(r, "/skew/devices_skewed"), 40);
    assert!(beyond > 0 && beyond < 40, "{r:#}");
    // Each device beyond +10 minutes: 8 messages of 2 readings, all refused.
    let refused = u(r, "/expected_rejections/timestamp_in_future");
    assert_eq!(refused, beyond * 16);
    assert_eq!(u(r, "/readings_expected"), (40 - beyond) * 16);
    let m = gw.drained().await;
    assert_eq!(
        m.get(r#"gateway_readings_rejected_total{reason="timestamp_in_future"}"#)
            .copied()
            .unwrap_or(0.0),
        refused as f64
    );
    assert_eq!(sum(&m, "gateway_readings_rejected_total"), refused as f64);
    // What landed carries the devices' own clocks: minutes off the run's start, both ways.
    let start = r["start_ms"].as_i64().expect("start_ms");
    let run_id = r["run_id"].as_str().expect("run id");
    let offsets: Vec<i64> = export(&vm, run_id, None)
        .await
        .into_iter()
        .flat_map(|s| s.timestamps.into_iter().map(|t| t - start))
        .collect();
    assert_eq!(offsets.len() as u64, (40 - beyond) * 16);
    assert!(
        offsets.iter().any(|o| *o < -60_000),
        "some clocks are behind"
    );
    assert!(
        offsets.iter().any(|o| *o > 60_000),
        "some clocks are ahead, within the limit"
    );
    assert!(offsets.iter().all(|o| *o < 600_000 + 5_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_credentials_against_a_broker_that_demands_both() {
    // mosquitto with a certificate from a throwaway CA and a password file: the gateway's
    // embedded broker has neither, an external broker usually has both.
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    e2e::make_test_ca(d);
    e2e::tool(
        d,
        "mosquitto_passwd",
        &["-b", "-c", "passwd", "device", "s3cret"],
    );
    std::fs::write(d.join("device.pw"), "s3cret\n").expect("write password");
    std::fs::write(d.join("wrong.pw"), "guess\n").expect("write password");
    let port = e2e::free_port();
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            // `user root`: as root, mosquitto would otherwise switch to its own user, which
            // cannot read this directory (it is ignored when not started as root).
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {p}/passwd\n\
             cafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\n",
            p = d.display()
        ),
    )
    .expect("write mosquitto.conf");
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(d.join("mosquitto.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("mosquitto starts ({e}); install it with: {}", e2e::INSTALL));
    let _mosquitto = e2e::Proc {
        child,
        name: "mosquitto",
    };
    eventually(Duration::from_secs(10), "mosquitto listening", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        Ok(())
    })
    .await;

    let run = |password_file: &'static str| {
        let port = port.to_string();
        let d = d.to_path_buf();
        async move {
            let mut cmd = tokio::process::Command::new(simulator_binary());
            cmd.arg("run")
                .args([
                    "--port",
                    &port,
                    "--devices",
                    "3",
                    "--messages",
                    "5",
                    "--rate",
                    "0",
                ])
                .args(["--tls", "--ca-file"])
                .arg(d.join("ca.pem"))
                .args(["--username", "device", "--password-file"])
                .arg(d.join(password_file))
                .args(["--connect-timeout", "5s"])
                .env("RUST_LOG", "error");
            let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
                .await
                .expect("the simulator finishes")
                .expect("the simulator runs");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        }
    };
    let (code, stdout) = run("device.pw").await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("acked     15 of 15"), "{stdout}");
    // The broker refuses a wrong password: every device fails, and the exit code says so.
    let (code, stdout) = run("wrong.pw").await;
    assert_eq!(code, 2, "{stdout}");
    assert!(stdout.contains("failed    3 devices"), "{stdout}");
}
