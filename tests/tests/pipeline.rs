//! The pipeline as a whole: `gateway::run` in this process, and a stage that fails stopping
//! the gateway with its error instead of vanishing.

use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::*;

/// `gateway::run` in-process: readings published go to the sink, and the ledger it returns
/// at shutdown accounts for every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_process_writes_everything_and_returns_a_balanced_ledger() {
    let vm = VictoriaMetrics::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let (mqtt, mqtt5, admin) = (free_port(), free_port(), free_port());
    let toml = format!(
        r#"
        [mqtt]
        listen = "127.0.0.1:{mqtt}"
        listen_v5 = "127.0.0.1:{mqtt5}"
        [auth]
        anonymous = true
        [sink]
        url = "{url}"
        [admin]
        listen = "127.0.0.1:{admin}"
        [wal]
        dir = "{wal}"
        [dlq]
        dir = "{dlq}"
        "#,
        url = vm.url,
        wal = dir.path().join("wal").display(),
        dlq = dir.path().join("dlq").display(),
    );
    let config = gateway::config::Config::from_toml(&toml).expect("config");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(gateway::run(config, async move {
        let _ = stopped.await;
    }));
    eventually(Duration::from_secs(20), "MQTT listener", || async {
        publish_v4(mqtt, "probe", Vec::new()).await
    })
    .await;
    publish_fleet(mqtt, fleet(4, 25, 10, "inproc", Encoding::Json)).await;
    eventually(
        Duration::from_secs(30),
        "1,000 readings in the sink",
        || async {
            let n = vm.count(r#"{__name__="inproc_v"}"#).await?;
            anyhow::ensure!(n == 1_000, "{n} of 1,000");
            Ok(())
        },
    )
    .await;
    stop.send(()).expect("still running");
    let ledger = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("stops in time")
        .expect("joined")
        .expect("a clean stop");
    assert!(ledger.balanced(), "{ledger:?}");
    assert_eq!((ledger.accepted, ledger.written), (1_000, 1_000));
    assert_eq!(ledger.queued + ledger.in_flight + ledger.in_dlq, 0);
}

/// A stage's task panics (failpoint `task_panic=<name>`): the gateway stops on its own, says
/// which task failed and how, and exits with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_that_panics_stops_the_gateway_with_its_error() {
    for task in ["batcher", "redrive", "guard", "wal feeder", "admin"] {
        let dir = tempfile::tempdir().expect("tmp");
        let log = dir.path().join("gateway.log");
        let mut child = Command::new(gateway_binary())
            .arg("run")
            .env_clear()
            .env("GATEWAY_MQTT__LISTEN", format!("127.0.0.1:{}", free_port()))
            .env(
                "GATEWAY_MQTT__LISTEN_V5",
                format!("127.0.0.1:{}", free_port()),
            )
            .env(
                "GATEWAY_ADMIN__LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("GATEWAY_DLQ__DIR", dir.path().join("dlq"))
            .env("GATEWAY_WAL__DIR", dir.path().join("wal"))
            .env(
                "GATEWAY_SINK__URL",
                format!("http://127.0.0.1:{}", free_port()),
            )
            .env("GATEWAY_AUTH__ANONYMOUS", "true")
            .env("FAILPOINTS", format!("task_panic={task}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("gateway starts");
        let status = eventually(Duration::from_secs(30), "the gateway stops", || {
            let exited = child.try_wait();
            async move { exited?.ok_or_else(|| anyhow::anyhow!("still running")) }
        })
        .await;
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        assert_eq!(status.code(), Some(1), "{task}: exit code\n{logs}");
        let said =
            format!("the {task} task panicked: failpoint task_panic={task}; the gateway stopped");
        assert!(logs.contains(&said), "{task}: no {said:?} in\n{logs}");
    }
}
