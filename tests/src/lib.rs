//! End-to-end harness: real servers on free loopback ports, the real gateway binary, real MQTT
//! clients. A server that is not installed fails the test with the command that installs it.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod proxy;
pub mod raw;

pub const INSTALL: &str =
    "sudo apt-get install -y --no-install-recommends victoria-metrics influxdb mosquitto \
     (or run ./scripts/test.sh, which installs them)";

/// A port nobody listens on right now.
///
/// Ports come from below the kernel's ephemeral range (32768 and up on Linux), so that no
/// outgoing connection of the gateway or a server takes one between this check and its
/// listener's bind, and none is handed out twice in one test process. Test processes run in
/// parallel start at offsets of their own (by process id), so they rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (start + step.wrapping_mul(13)) % SPAN;
        let port = u16::try_from(port).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!(
        "no free port on the loopback interface between {LOW} and {}",
        LOW + SPAN
    )
}

fn require(binary: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let path = PathBuf::from(dir).join(binary);
        if path.exists() {
            return path;
        }
    }
    panic!("{binary} is not installed; install it with: {INSTALL}");
}

/// Waits until `check` succeeds or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        match check().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within {timeout:?}; last error: {last:?}");
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VictoriaMetrics: takes InfluxDB v2 writes, is read back with `/api/v1/export`.
pub struct VictoriaMetrics {
    pub url: String,
    port: u16,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
}

impl VictoriaMetrics {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut vm = Self {
            url: String::new(),
            port: free_port(),
            proc: None,
            dir,
        };
        vm.url = format!("http://127.0.0.1:{}", vm.port);
        vm.restart().await;
        vm
    }

    /// Stops the server (SIGKILL: an outage, not a shutdown). What it acknowledged in its last
    /// second may be lost with it: VictoriaMetrics buffers before it writes to disk.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Stops the server with SIGTERM: it flushes what it acknowledged first.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pid = p.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let _ = p.child.wait();
        }
    }

    /// Starts the server again on the same port and data.
    pub async fn restart(&mut self) {
        let bin = require("victoria-metrics");
        let child = Command::new(bin)
            .arg(format!("-httpListenAddr=127.0.0.1:{}", self.port))
            .arg(format!("-storageDataPath={}", self.dir.path().display()))
            .arg("-retentionPeriod=100y")
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            // The same series and timestamp written twice is one sample, as in InfluxDB: a
            // write that timed out but landed, then retried, must not count twice.
            .arg("-dedup.minScrapeInterval=1ms")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("victoria-metrics starts");
        self.proc = Some(Proc {
            child,
            name: "victoria-metrics",
        });
        let health = format!("{}/health", self.url);
        eventually(
            Duration::from_secs(20),
            "victoria-metrics ready",
            || async {
                http().get(&health).send().await?.error_for_status()?;
                Ok(())
            },
        )
        .await;
    }

    /// Every series matching `selector`, flushed first so recent writes are visible.
    pub async fn export(&self, selector: &str) -> Result<Vec<VmSeries>> {
        http()
            .post(format!("{}/internal/force_flush", self.url))
            .send()
            .await?;
        let text = http()
            .get(format!("{}/api/v1/export", self.url))
            .query(&[("match[]", selector), ("start", "0")])
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("export line {l}")))
            .collect()
    }

    /// Number of samples of `metric` in the last `hours`, counted by the server (cheaper than
    /// an export for millions of samples).
    pub async fn count_samples(&self, metric: &str, hours: u32) -> Result<u64> {
        http()
            .post(format!("{}/internal/force_flush", self.url))
            .send()
            .await?;
        let query = format!("sum(count_over_time({{__name__=\"{metric}\"}}[{hours}h]))");
        let body: serde_json::Value = http()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query.as_str())])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let value = body
            .pointer("/data/result/0/value/1")
            .and_then(|v| v.as_str())
            .unwrap_or("0");
        Ok(value.parse::<f64>()? as u64)
    }

    /// Number of samples matching `selector`.
    pub async fn count(&self, selector: &str) -> Result<usize> {
        Ok(self
            .export(selector)
            .await?
            .iter()
            .map(|s| s.timestamps.len())
            .sum())
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct VmSeries {
    pub metric: HashMap<String, String>,
    pub values: Vec<f64>,
    pub timestamps: Vec<i64>,
}

/// InfluxDB 1.6: the v1 write API with real 400s, read back with InfluxQL.
pub struct Influx1 {
    pub url: String,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Influx1 {
    pub async fn start(database: &str) -> Self {
        let bin = require("influxd");
        let dir = tempfile::tempdir().expect("temp dir");
        let (http_port, rpc_port) = (free_port(), free_port());
        let d = dir.path().display();
        let config = format!(
            "reporting-disabled = true\nbind-address = \"127.0.0.1:{rpc_port}\"\n\
             [meta]\n dir = \"{d}/meta\"\n logging-enabled = false\n\
             [data]\n dir = \"{d}/data\"\n wal-dir = \"{d}/wal\"\n query-log-enabled = false\n\
             [monitor]\n store-enabled = false\n\
             [http]\n bind-address = \"127.0.0.1:{http_port}\"\n log-enabled = false\n\
             [continuous_queries]\n enabled = false\n\
             [logging]\n level = \"warn\"\n"
        );
        let config_path = dir.path().join("influxdb.conf");
        std::fs::write(&config_path, config).expect("write influxdb.conf");
        let child = Command::new(bin)
            .arg("-config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("influxd starts");
        let url = format!("http://127.0.0.1:{http_port}");
        let influx = Self {
            url,
            _proc: Proc {
                child,
                name: "influxd",
            },
            _dir: dir,
        };
        let ping = format!("{}/ping", influx.url);
        eventually(Duration::from_secs(30), "influxd ready", || async {
            http().get(&ping).send().await?.error_for_status()?;
            Ok(())
        })
        .await;
        influx
            .query("", &format!("CREATE DATABASE \"{database}\""))
            .await
            .expect("create database");
        influx
    }

    /// The first value of the first row of `q` (a count, a last value), as a float; None when
    /// the query returns no rows.
    pub async fn scalar(&self, db: &str, q: &str) -> Option<f64> {
        let body = self.query(db, q).await.expect("InfluxQL query");
        body.pointer("/results/0/series/0/values/0/1")
            .and_then(|v| v.as_f64())
    }

    /// Runs InfluxQL; timestamps come back as integer nanoseconds.
    pub async fn query(&self, db: &str, q: &str) -> Result<serde_json::Value> {
        let response = http()
            .post(format!("{}/query", self.url))
            .query(&[("db", db), ("epoch", "ns")])
            .form(&[("q", q)])
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() || body.pointer("/results/0/error").is_some() {
            bail!("query {q:?} failed: {status} {body}");
        }
        Ok(body)
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// The gateway binary built next to this test binary.
pub fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/gateway
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = profile_dir.join("gateway");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p gateway` (./scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// Adds `device` to the credentials file with `gateway passwd`, as an operator does.
pub fn passwd(file: &std::path::Path, device: &str, password: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(gateway_binary())
        .args(["passwd", file.to_str().expect("utf-8"), device])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gateway passwd runs");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{password}").expect("password written");
    drop(stdin);
    let out = child.wait_with_output().expect("gateway passwd ends");
    assert!(out.status.success(), "gateway passwd {device}");
}

/// A gateway process on free ports, configured through environment overrides.
pub struct Gateway {
    pub proc: Proc,
    pub mqtt_port: u16,
    pub mqtt5_port: u16,
    pub admin: String,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
    /// The overrides it was started with (DLQ commands use the same configuration).
    pub env: Vec<(String, String)>,
}

impl Gateway {
    /// Starts with `env` on top of loopback listeners; waits for /healthz.
    pub async fn start(env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (mqtt_port, mqtt5_port, admin_port) = (free_port(), free_port(), free_port());
        let log = dir.path().join("gateway.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(gateway_binary());
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("GATEWAY_MQTT__LISTEN", format!("127.0.0.1:{mqtt_port}"))
            .env("GATEWAY_MQTT__LISTEN_V5", format!("127.0.0.1:{mqtt5_port}"))
            .env("GATEWAY_ADMIN__LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("GATEWAY_DLQ__DIR", dir.path().join("dlq"))
            .env("GATEWAY_WAL__DIR", dir.path().join("wal"))
            .env("GATEWAY_LOG__FORMAT", "json")
            .env(
                "GATEWAY_LOG__LEVEL",
                std::env::var("E2E_GATEWAY_LOG").unwrap_or_else(|_| "info,rumqttd=warn".into()),
            )
            .env("GATEWAY_SHUTDOWN__TIMEOUT", "20s")
            // Tests that check authentication turn it back on.
            .env("GATEWAY_AUTH__ANONYMOUS", "true")
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("gateway starts");
        let mut all_env: Vec<(String, String)> = vec![
            ("GATEWAY_AUTH__ANONYMOUS".into(), "true".into()),
            (
                "GATEWAY_DLQ__DIR".into(),
                dir.path().join("dlq").display().to_string(),
            ),
            (
                "GATEWAY_WAL__DIR".into(),
                dir.path().join("wal").display().to_string(),
            ),
        ];
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let gw = Self {
            proc: Proc {
                child,
                name: "gateway",
            },
            mqtt_port,
            mqtt5_port,
            admin: format!("http://127.0.0.1:{admin_port}"),
            log,
            dir,
            env: all_env,
        };
        let health = format!("{}/healthz", gw.admin);
        eventually(Duration::from_secs(20), "gateway /healthz", || async {
            http().get(&health).send().await?.error_for_status()?;
            Ok(())
        })
        .await;
        // The broker's listeners start on their own threads: wait until each answers a real
        // MQTT CONNECT. (A bare TCP probe that closes before CONNECT makes rumqttd 0.20 log
        // "already gone" and can cut a device that connects at the same moment.)
        let external = env
            .iter()
            .any(|(k, v)| *k == "GATEWAY_MQTT__MODE" && v == "external");
        if external {
            // No listeners of its own: ready once it is connected to its broker.
            eventually(
                Duration::from_secs(20),
                "connected to the broker",
                || async {
                    let up = gw
                        .metrics()
                        .await?
                        .get("gateway_ingest_up")
                        .copied()
                        .unwrap_or(0.0);
                    anyhow::ensure!(up == 1.0, "not connected yet");
                    Ok(())
                },
            )
            .await;
            return gw;
        }
        let authenticated = env
            .iter()
            .any(|(k, v)| *k == "GATEWAY_AUTH__ANONYMOUS" && v == "false");
        if authenticated {
            // An anonymous probe would be refused; the guard accepts devices only once the
            // broker behind it listens.
            return gw;
        }
        eventually(Duration::from_secs(10), "MQTT 3.1.1 listener", || async {
            publish_v4(mqtt_port, "probe-v4", Vec::new()).await
        })
        .await;
        eventually(Duration::from_secs(10), "MQTT 5 listener", || async {
            publish_v5(mqtt5_port, "probe-v5", Vec::new()).await
        })
        .await;
        gw
    }

    /// The gateway's metrics: `name{labels}` → value.
    pub async fn metrics(&self) -> Result<HashMap<String, f64>> {
        let text = http()
            .get(format!("{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await?;
        Ok(parse_metrics(&text))
    }

    /// Waits until metric `name` (with labels, as exposed) equals `want`; returns all metrics.
    pub async fn wait_metric(&self, name: &str, want: f64) -> HashMap<String, f64> {
        eventually(Duration::from_secs(60), name, || async {
            let m = self.metrics().await?;
            let got = m.get(name).copied().unwrap_or(0.0);
            anyhow::ensure!(got == want, "{name} = {got}, waiting for {want}");
            Ok(m)
        })
        .await
    }

    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .expect("metrics")
            .get(name)
            .copied()
            .unwrap_or(0.0)
    }

    /// Waits until the ledger is balanced with nothing queued or in flight, and returns it.
    pub async fn drained(&self) -> HashMap<String, f64> {
        // The broker acknowledges before the gateway reads: wait until nothing is queued or
        // in flight AND no message arrived since the previous look, so that a message still
        // being decoded is not missed.
        let last_seen = std::sync::Mutex::new(-1.0f64);
        eventually(Duration::from_secs(60), "gateway drained", || async {
            let m = self.metrics().await?;
            let g = |k: &str| m.get(k).copied().unwrap_or(0.0);
            let received = g("gateway_messages_received_total");
            let previous = std::mem::replace(&mut *last_seen.lock().expect("lock"), received);
            anyhow::ensure!(
                g("gateway_queue_readings") == 0.0
                    && g("gateway_readings_in_flight") == 0.0
                    && g("gateway_wal_readings") == 0.0
                    && received == previous,
                "queued {} in flight {}, {received} messages received so far",
                g("gateway_queue_readings"),
                g("gateway_readings_in_flight")
            );
            Ok(m)
        })
        .await
    }

    /// Peak resident memory of the gateway process so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.status_bytes("VmHWM:")
    }

    /// Resident memory of the gateway process now (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    fn status_bytes(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.proc.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `gateway dlq <args> --json` with this gateway's configuration; returns the exit
    /// code, the parsed JSON (Null when there was none) and stderr.
    pub fn dlq(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let mut cmd = Command::new(gateway_binary());
        cmd.arg("dlq").args(args).arg("--json").env_clear();
        cmd.env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("gateway dlq runs");
        let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (
            out.status.code().unwrap_or(-1),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A failing test shows what the gateway said.
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("--- last gateway log lines ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Parses Prometheus/OpenMetrics text into `name{labels}` → value (comments skipped).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of a counter over all its label sets, e.g. every reason of readings_rejected.
pub fn sum(metrics: &HashMap<String, f64>, name: &str) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

/// One MQTT message to publish.
#[derive(Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    /// MQTT 5 content type; `Some` publishes over the v5 listener.
    pub content_type: Option<&'static str>,
}

/// What a test client's event loop reported, in the terms the publishers need.
pub enum Seen {
    ConnAck,
    PubAck,
    Other,
}

/// The two rumqttc event loops (MQTT 3.1.1 and 5) seen through one interface.
pub trait Events {
    fn next_seen(&mut self) -> impl std::future::Future<Output = Result<Seen, String>> + Send;
}

impl Events for rumqttc::EventLoop {
    async fn next_seen(&mut self) -> Result<Seen, String> {
        use rumqttc::{Event, Packet};
        Ok(match self.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::ConnAck(_)) => Seen::ConnAck,
            Event::Incoming(Packet::PubAck(_)) => Seen::PubAck,
            _ => Seen::Other,
        })
    }
}

impl Events for rumqttc::v5::EventLoop {
    async fn next_seen(&mut self) -> Result<Seen, String> {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::Event;
        Ok(match self.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::ConnAck(_)) => Seen::ConnAck,
            Event::Incoming(Packet::PubAck(_)) => Seen::PubAck,
            _ => Seen::Other,
        })
    }
}

/// Waits for the CONNACK (even with nothing to publish), then for `total` PUBACKs.
async fn await_acks(events: &mut impl Events, client_id: &str, total: usize) -> Result<()> {
    let step = Duration::from_secs(10);
    // A thousand devices connecting at once while other tests load both cores can wait
    // longer than one step for their turn.
    let connect = Duration::from_secs(60);
    loop {
        match tokio::time::timeout(connect, events.next_seen()).await {
            Ok(Ok(Seen::ConnAck)) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{client_id}: cannot connect: {e}"),
            Err(_) => bail!("{client_id}: no CONNACK within {connect:?}"),
        }
    }
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout(step, events.next_seen()).await {
            Ok(Ok(Seen::PubAck)) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("{client_id}: connection error after {acked} of {total} acks: {e}"),
            Err(_) => bail!("{client_id}: no progress for {step:?} after {acked} of {total} acks"),
        }
    }
    Ok(())
}

/// How a test device proves who it is: a username and password, TLS (with a client
/// certificate in the config, or not), or nothing.
#[derive(Clone, Default)]
pub struct Login {
    pub username: Option<String>,
    pub password: Option<String>,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Login {
    pub fn password(username: &str, password: &str) -> Self {
        Self {
            username: Some(username.into()),
            password: Some(password.into()),
            tls: None,
        }
    }

    pub fn over_tls(self, tls: std::sync::Arc<rustls::ClientConfig>) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }
}

/// TLS to a listener whose certificate `make_test_ca` made in `dir`; with `client`, also the
/// client certificate `make_client_cert(dir, client)` made.
pub fn tls_client(
    dir: &std::path::Path,
    client: Option<&str>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let pem = |name: &str| {
        std::io::BufReader::new(std::fs::File::open(dir.join(name)).expect("PEM file"))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem("ca.pem")) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = rustls_pemfile::certs(&mut pem(&format!("{name}.pem")))
                .collect::<Result<Vec<_>, _>>()
                .expect("client PEM");
            let key = rustls_pemfile::private_key(&mut pem(&format!("{name}.key")))
                .expect("key PEM")
                .expect("a key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
    };
    std::sync::Arc::new(config)
}

/// An MQTT 3.1.1 client for a test publisher.
fn v4_client(
    port: u16,
    client_id: &str,
    clean: bool,
    login: &Login,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(4 << 20, 4 << 20);
    opts.set_clean_session(clean);
    if let Some(user) = &login.username {
        opts.set_credentials(user, login.password.clone().unwrap_or_default());
    }
    if let Some(tls) = &login.tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls.clone()),
        ));
    }
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
    // A thousand devices connecting at once wait in the broker's accept queue.
    eventloop.network_options.set_connection_timeout(60);
    (client, eventloop)
}

/// Publishes `messages` at QoS 1 from a task of its own, while the caller polls the event loop.
fn spawn_publisher(
    client: rumqttc::AsyncClient,
    messages: Vec<Message>,
) -> tokio::task::JoinHandle<Result<rumqttc::AsyncClient>> {
    tokio::spawn(async move {
        for m in messages {
            client
                .publish(m.topic, rumqttc::QoS::AtLeastOnce, false, m.payload)
                .await?;
        }
        anyhow::Ok(client)
    })
}

/// Publishes `messages` at QoS 1 over MQTT 3.1.1 from one client and waits for every PUBACK.
pub async fn publish_v4(port: u16, client_id: &str, messages: Vec<Message>) -> Result<()> {
    publish_v4_as(port, client_id, &Login::default(), messages).await
}

/// [`publish_v4`] with a login.
pub async fn publish_v4_as(
    port: u16,
    client_id: &str,
    login: &Login,
    messages: Vec<Message>,
) -> Result<()> {
    let (client, mut eventloop) = v4_client(port, client_id, true, login);
    let total = messages.len();
    let publisher = spawn_publisher(client, messages);
    await_acks(&mut eventloop, client_id, total).await?;
    // Close the socket without an MQTT DISCONNECT: rumqttd 0.20 handles a DISCONNECT followed
    // by the socket closing as two disconnections, and the second one can cut whichever new
    // device has just been given the freed connection id (docs/contract.md, known issue in the embedded broker).
    drop(publisher.await??);
    drop(eventloop);
    Ok(())
}

/// Publishes over MQTT 5 with each message's content type, QoS 1, waiting for every PUBACK.
pub async fn publish_v5(port: u16, client_id: &str, messages: Vec<Message>) -> Result<()> {
    publish_v5_as(port, client_id, &Login::default(), messages).await
}

/// [`publish_v5`] with a username and password (no TLS).
pub async fn publish_v5_as(
    port: u16,
    client_id: &str,
    login: &Login,
    messages: Vec<Message>,
) -> Result<()> {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{AsyncClient, MqttOptions};
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    if let Some(user) = &login.username {
        opts.set_credentials(user, login.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let total = messages.len();
    let publisher = tokio::spawn(async move {
        for m in messages {
            let props = PublishProperties {
                content_type: m.content_type.map(str::to_owned),
                ..Default::default()
            };
            client
                .publish_with_properties(m.topic, QoS::AtLeastOnce, false, m.payload, props)
                .await?;
        }
        anyhow::Ok(client)
    });
    await_acks(&mut eventloop, client_id, total).await?;
    // No DISCONNECT, for the reason given in publish_v4.
    drop(publisher.await??);
    drop(eventloop);
    Ok(())
}

pub fn cbor(value: &ciborium::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("CBOR encodes");
    out
}

/// Milliseconds since the epoch, an hour ago, so that a test's timestamps are recent but
/// never in the future.
pub fn base_ms() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    now - 3_600_000
}

/// mosquitto from Debian's packages: the external broker, with persistence on.
pub struct Mosquitto {
    pub port: u16,
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    /// More of mosquitto.conf (another listener, say), after the plain anonymous one.
    extra: String,
    /// `max_inflight_messages`: QoS 1 messages sent to a client and not yet acknowledged (0:
    /// no limit; mosquitto then ignores the client's receive maximum too).
    max_inflight: u32,
}

impl Mosquitto {
    pub async fn start() -> Self {
        Self::start_with(String::new()).await
    }

    /// Starts with `extra` appended to the configuration (`per_listener_settings` is on).
    pub async fn start_with(extra: String) -> Self {
        Self::start_full(extra, 1000).await
    }

    /// Starts with `max_inflight_messages` set to `max_inflight` (0: no limit).
    pub async fn start_with_max_inflight(max_inflight: u32) -> Self {
        Self::start_full(String::new(), max_inflight).await
    }

    async fn start_full(extra: String, max_inflight: u32) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut m = Self {
            port: free_port(),
            proc: None,
            dir,
            extra,
            max_inflight,
        };
        m.restart().await;
        m
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGTERM: mosquitto saves its persistence file on the way out.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let pid = p.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let _ = p.child.wait();
        }
    }

    pub async fn restart(&mut self) {
        let bin = require("mosquitto");
        let d = self.dir.path().display();
        // Root drops to user mosquitto unless told otherwise, and then cannot write `dir`.
        // The default max_queued_messages (1000) would drop what a slow subscriber has not
        // taken yet: a broker in front of this gateway must hold the backlog.
        let config = format!(
            "per_listener_settings true\npersistence true\npersistence_location {d}/\n\
             autosave_interval 1\nuser root\nmax_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages {}\n\
             listener {} 127.0.0.1\nallow_anonymous true\n{}",
            self.max_inflight, self.port, self.extra
        );
        let path = self.dir.path().join("mosquitto.conf");
        std::fs::write(&path, config).expect("write mosquitto.conf");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        self.proc = Some(Proc {
            child,
            name: "mosquitto",
        });
        let port = self.port;
        eventually(Duration::from_secs(10), "mosquitto ready", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            Ok(())
        })
        .await;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Publishes at QoS 1 over MQTT 3.1.1 and rides out broker restarts: rumqttc reconnects and
/// sends again what was not acknowledged. Returns once `messages.len()` acknowledgements came.
pub async fn publish_resilient(port: u16, client_id: &str, messages: Vec<Message>) -> Result<()> {
    use rumqttc::{Event, Packet};
    let (client, mut eventloop) = v4_client(port, client_id, false, &Login::default());
    let total = messages.len();
    let publisher = spawn_publisher(client, messages);
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while acked < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{client_id}: {acked} of {total} acknowledged"
        );
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            // mosquitto drops messages for a shared subscription while none of its members
            // is connected: give the gateways time to reconnect first (docs/external-mode.md).
            Ok(Err(_)) => tokio::time::sleep(Duration::from_secs(3)).await,
            Err(_) => bail!("{client_id}: no progress for 30 s after {acked} acks"),
        }
    }
    drop(publisher.await??);
    drop(eventloop);
    Ok(())
}

/// Runs `program` with `args` in `dir`, failing the test with its output when it fails.
pub fn tool(dir: &std::path::Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A throwaway CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it
/// (`server.pem`, `server.key`) in `dir`, made with openssl.
pub fn make_test_ca(dir: &std::path::Path) {
    let openssl = |args: &[&str]| tool(dir, "openssl", args);
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    signed(
        dir,
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    );
}

/// A device certificate `name.pem` / `name.key` with common name `name`, signed by the CA that
/// [`make_test_ca`] made in `dir`.
pub fn make_client_cert(dir: &std::path::Path, name: &str) {
    signed(
        dir,
        name,
        &format!("/CN={name}"),
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    );
}

/// A key `name.key` and a certificate `name.pem` for `subject` with `extensions`, signed by
/// the CA in `dir`.
fn signed(dir: &std::path::Path, name: &str, subject: &str, extensions: &str) {
    let openssl = |args: &[&str]| tool(dir, "openssl", args);
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.cnf"),
    );
    openssl(&[
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
    ]);
    std::fs::write(dir.join(&ext), extensions).expect("write the extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &ext,
        "-out",
        &pem,
    ]);
}

/// A metric by its exposed name (labels included), 0 when absent.
pub fn get(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// How a test fleet encodes its payloads.
#[derive(Debug, Clone, Copy)]
pub enum Encoding {
    Json,
    Cbor,
}

/// `devices` devices × `messages` messages × `per_message` readings of field `v` on
/// `measurement` (device `<measurement>-<n>`); every reading of a device has its own millisecond.
pub fn fleet(
    devices: usize,
    messages: usize,
    per_message: usize,
    measurement: &str,
    encoding: Encoding,
) -> Vec<(String, Vec<Message>)> {
    let base = base_ms();
    (0..devices)
        .map(|d| {
            let device = format!("{measurement}-{d:04}");
            let msgs = (0..messages)
                .map(|m| {
                    let index = |r: usize| (m * per_message + r) as i64;
                    let payload = match encoding {
                        Encoding::Json => {
                            let readings: Vec<serde_json::Value> = (0..per_message)
                                .map(|r| serde_json::json!({"ts": base + index(r), "fields": {"v": index(r)}}))
                                .collect();
                            serde_json::to_vec(&readings).expect("json")
                        }
                        Encoding::Cbor => {
                            use ciborium::Value as C;
                            let readings = (0..per_message)
                                .map(|r| {
                                    C::Map(vec![
                                        (C::Text("ts".into()), C::Integer((base + index(r)).into())),
                                        (
                                            C::Text("fields".into()),
                                            C::Map(vec![(C::Text("v".into()), C::Float(index(r) as f64))]),
                                        ),
                                    ])
                                })
                                .collect();
                            cbor(&C::Array(readings))
                        }
                    };
                    Message { topic: format!("telemetry/{device}/{measurement}"), payload, content_type: None }
                })
                .collect();
            (device, msgs)
        })
        .collect()
}

/// Publishes a fleet, one MQTT 3.1.1 connection per device at once, every message
/// acknowledged; returns how long that took.
pub async fn publish_fleet(port: u16, fleet: Vec<(String, Vec<Message>)>) -> Duration {
    let started = Instant::now();
    let tasks: Vec<_> = fleet
        .into_iter()
        .map(|(device, msgs)| tokio::spawn(async move { publish_v4(port, &device, msgs).await }))
        .collect();
    for t in tasks {
        t.await.expect("task").expect("published and acknowledged");
    }
    started.elapsed()
}
