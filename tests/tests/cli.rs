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
    let (code, out, err) = gateway(
        &["check-config", "--config", path.to_str().expect("utf-8")],
        &[],
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
