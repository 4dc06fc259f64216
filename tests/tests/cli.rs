//! The `gateway` command's configuration subcommands, as an operator uses them.

use std::process::Command;

use e2e::gateway_binary;

fn gateway(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(gateway_binary());
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("gateway runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_config_prints_the_documented_defaults_which_check_config_accepts() {
    let (code, toml, _) = gateway(&["generate-config"], &[]);
    assert_eq!(code, 0);
    assert!(toml.contains("[mqtt]") && toml.contains("listen = \"0.0.0.0:1883\""));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &toml).expect("write");
    // Safe by default: no device may connect until the operator says how they authenticate.
    let (code, _, err) = gateway(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("auth.credentials_file") && err.contains("auth.anonymous = true"),
        "{err}"
    );
    let (code, out, err) = gateway(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        &[("GATEWAY_AUTH__ANONYMOUS", "true")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("configuration is valid"), "{out}");
}

#[test]
fn check_config_redacts_secrets_from_env_and_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let password = dir.path().join("password");
    std::fs::write(&password, "file-secret-7f3a\n").expect("write");
    let (code, out, err) = gateway(
        &["check-config"],
        &[
            ("GATEWAY_AUTH__ANONYMOUS", "true"),
            ("GATEWAY_SINK__TOKEN", "env-secret-91bd"),
            (
                "GATEWAY_SINK__PASSWORD_FILE",
                password.to_str().expect("utf-8"),
            ),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("env-secret-91bd") && !out.contains("file-secret-7f3a"),
        "{out}"
    );
    assert!(
        out.contains("token: <redacted>") && out.contains("password: <redacted>"),
        "{out}"
    );
}

#[test]
fn bad_settings_fail_with_the_key_and_the_fix() {
    let (code, _, err) = gateway(
        &["check-config"],
        &[
            ("GATEWAY_BATCH__MAX_READINGS", "0"),
            ("GATEWAY_SINK__URL", "influx:8086"),
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("batch.max_readings must be at least 1"),
        "{err}"
    );
    assert!(
        err.contains("sink.url \"influx:8086\" must start with http:// or https://"),
        "{err}"
    );
    let (code, _, err) = gateway(
        &["check-config"],
        &[("GATEWAY_MQTT__LISTEN", "not-an-address")],
    );
    assert_eq!(code, 2);
    assert!(
        err.to_lowercase().contains("mqtt.listen") && err.contains("GATEWAY_"),
        "{err}"
    );
    let (code, _, err) = gateway(&["run", "--config", "/nonexistent/gateway.toml"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("no such file") && err.contains("generate-config"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_secrets_appear_nowhere_and_the_admin_token_guards_metrics() {
    const SINK_TOKEN: &str = "sink-token-5b2e9";
    const MQTT_PASSWORD: &str = "mqtt-password-77c1";
    const ADMIN_TOKEN: &str = "admin-token-0d4f";
    const DEVICE_PASSWORD: &str = "device-password-3e6a";
    const WRONG_PASSWORD: &str = "wrong-password-91c0";
    let dead_sink = format!("http://127.0.0.1:{}", e2e::free_port());
    let credentials_dir = tempfile::tempdir().expect("tmp");
    let credentials = credentials_dir.path().join("devices");
    e2e::passwd(&credentials, "d1", DEVICE_PASSWORD);
    let env = [
        ("GATEWAY_AUTH__ANONYMOUS", "false".to_string()),
        (
            "GATEWAY_AUTH__CREDENTIALS_FILE",
            credentials.display().to_string(),
        ),
        ("GATEWAY_SINK__URL", dead_sink),
        ("GATEWAY_SINK__TOKEN", SINK_TOKEN.to_string()),
        ("GATEWAY_SINK__MAX_ATTEMPTS", "1".to_string()),
        ("GATEWAY_MQTT__PASSWORD", MQTT_PASSWORD.to_string()),
        ("GATEWAY_ADMIN__TOKEN", ADMIN_TOKEN.to_string()),
    ];
    let gw = e2e::Gateway::start(&env).await;
    // Some traffic, so that failures are logged (the sink is unreachable).
    let msg = e2e::Message {
        topic: "telemetry/d1/env".into(),
        payload: serde_json::to_vec(&serde_json::json!({"fields": {"v": 1}})).expect("json"),
        content_type: None,
    };
    e2e::publish_v4_as(
        gw.mqtt_port,
        "d1",
        &e2e::Login::password("d1", WRONG_PASSWORD),
        vec![msg.clone()],
    )
    .await
    .expect_err("wrong password refused");
    e2e::publish_v4_as(
        gw.mqtt_port,
        "d1",
        &e2e::Login::password("d1", DEVICE_PASSWORD),
        vec![msg],
    )
    .await
    .expect("published");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;

    let http = e2e::http();
    let denied = http
        .get(format!("{}/metrics", gw.admin))
        .send()
        .await
        .expect("request");
    assert_eq!(denied.status().as_u16(), 401, "no token, no metrics");
    let wrong = http
        .get(format!("{}/metrics", gw.admin))
        .bearer_auth("admin-token-0d4e")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status().as_u16(), 401);
    let health = http
        .get(format!("{}/healthz", gw.admin))
        .send()
        .await
        .expect("request");
    assert_eq!(health.status().as_u16(), 200, "liveness stays open");
    let metrics = http
        .get(format!("{}/metrics", gw.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("gateway_messages_received_total 1"),
        "{metrics}"
    );

    let mut check = std::process::Command::new(e2e::gateway_binary());
    check.arg("check-config").env_clear();
    for (k, v) in &env {
        check.env(k, v);
    }
    let out = check.output().expect("check-config runs");
    let check_config =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{check_config}");

    let logs = gw.logs();
    for secret in [
        SINK_TOKEN,
        MQTT_PASSWORD,
        ADMIN_TOKEN,
        DEVICE_PASSWORD,
        WRONG_PASSWORD,
    ] {
        assert!(!logs.contains(secret), "{secret} in the logs");
        assert!(!metrics.contains(secret), "{secret} in /metrics");
        assert!(!check_config.contains(secret), "{secret} in check-config");
    }
    assert!(
        logs.contains("the sink is down"),
        "failures were logged, so the logs were exercised"
    );
}

/// Every `GATEWAY_<SECTION>__<KEY>` that the demo, the container image and the compose file
/// set names a key the gateway has: a renamed or removed key must not leave them behind.
#[test]
fn the_shipped_scripts_set_only_keys_the_gateway_has() {
    let (code, toml, _) = gateway(&["generate-config"], &[]);
    assert_eq!(code, 0);
    let mut keys = std::collections::BTreeSet::new();
    let mut section = String::new();
    for line in toml.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
        } else if let Some((key, _)) = line.split_once(" = ") {
            if !line.starts_with('#') {
                keys.insert(format!("{section}.{key}"));
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["scripts/demo.sh", "Dockerfile", "docker-compose.yml"] {
        let text = std::fs::read_to_string(root.join(file)).expect("shipped file");
        for (at, _) in text.match_indices("GATEWAY_") {
            let name: String = text[at + "GATEWAY_".len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let Some((section, key)) = name.split_once("__") else {
                continue;
            };
            let key = format!("{}.{}", section.to_lowercase(), key.to_lowercase());
            assert!(
                keys.contains(&key),
                "{file} sets GATEWAY_{name}, but there is no {key}"
            );
        }
    }
}
