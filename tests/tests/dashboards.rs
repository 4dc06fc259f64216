//! The observability files against the real thing: every InfluxQL query of the Grafana
//! dashboards and alert rules runs on InfluxDB 1.6 filled by a real gateway (telemetry and
//! self-metrics), the compose file validates, and the payload and dead-letter schemas of
//! docs/asyncapi.yaml accept what devices and `gateway dlq show --json` really produce.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ciborium::Value as C;
use e2e::*;
use serde_json::{json, Value};

const DB: &str = "telemetry";
const INSTANCE: &str = "gw-dash";
const DEVICES: [&str; 3] = ["dash-1", "dash-2", "dash-3"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json_file(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
}

fn yaml_file(rel: &str) -> Value {
    serde_norway::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// One InfluxQL statement of a dashboard or an alert rule, named for failure messages.
#[derive(Debug, Clone)]
struct Query {
    name: String,
    text: String,
}

/// Panel targets (rows' nested panels too) and template variable queries.
fn dashboard_queries(rel: &str) -> Vec<Query> {
    fn panels(file: &str, list: &Value, out: &mut Vec<Query>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let text = t["query"].as_str().unwrap_or_else(|| {
                    panic!("{file}: panel {title:?} has a target without a raw query")
                });
                assert_eq!(
                    t["rawQuery"], true,
                    "{file}: panel {title:?}: raw InfluxQL expected"
                );
                out.push(Query {
                    name: format!("{file}: panel {title:?} target {}", t["refId"]),
                    text: text.to_owned(),
                });
            }
            panels(file, &p["panels"], out);
        }
    }
    let d = json_file(rel);
    let mut out = Vec::new();
    panels(rel, &d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or("?");
        let text = v["query"]
            .as_str()
            .or_else(|| v["query"]["query"].as_str())
            .unwrap_or_else(|| panic!("{rel}: variable {name} has no query"));
        out.push(Query {
            name: format!("{rel}: variable ${name}"),
            text: text.to_owned(),
        });
    }
    assert!(!out.is_empty(), "{rel}: no queries found");
    out
}

/// The InfluxQL queries of every alert rule (expressions run in Grafana, not here).
fn alert_queries() -> Vec<Query> {
    let doc = yaml_file("dashboards/alerts.yaml");
    let mut out = Vec::new();
    for g in doc["groups"].as_array().expect("alerts.yaml: groups") {
        for r in g["rules"].as_array().expect("alerts.yaml: rules") {
            let uid = r["uid"].as_str().expect("rule uid");
            for d in r["data"].as_array().expect("rule data") {
                match d["datasourceUid"].as_str() {
                    Some("influxdb") => out.push(Query {
                        name: format!("alerts.yaml: rule {uid} query {}", d["refId"]),
                        text: d["model"]["query"]
                            .as_str()
                            .unwrap_or_else(|| panic!("rule {uid}: no query"))
                            .to_owned(),
                    }),
                    Some("__expr__") => {}
                    other => panic!("rule {uid}: unexpected datasource {other:?}"),
                }
            }
        }
    }
    out
}

/// Fills in template variables the way Grafana does for single values.
fn substitute(q: &Query, vars: &[(&str, &str)]) -> Query {
    let mut text = q.text.clone();
    for (k, v) in vars {
        text = text.replace(k, v);
    }
    // A `$` that ends a regex (`/^env$/`) is not a variable; one before a name is.
    let left = text
        .as_bytes()
        .windows(2)
        .any(|w| w[0] == b'$' && (w[1].is_ascii_alphanumeric() || w[1] == b'_' || w[1] == b'{'));
    assert!(
        !left,
        "{}: a variable is left after substitution: {text}",
        q.name
    );
    Query {
        name: q.name.clone(),
        text,
    }
}

/// The series of a query's answer, or an error naming the query.
async fn series(influx: &Influx1, q: &Query) -> Result<Vec<Value>> {
    let body = influx
        .query(DB, &q.text)
        .await
        .with_context(|| format!("{} failed", q.name))?;
    let series = body["results"][0]["series"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !series
        .iter()
        .any(|s| s["values"].as_array().is_some_and(|v| !v.is_empty()))
    {
        bail!(
            "{} returned no series with values: {}\n  {}",
            q.name,
            body,
            q.text
        );
    }
    Ok(series)
}

/// Runs every query; Err lists each one that failed or came back empty.
async fn run_all(influx: &Influx1, queries: &[Query]) -> Result<()> {
    let mut failed = Vec::new();
    for q in queries {
        if let Err(e) = series(influx, q).await {
            failed.push(format!("{e:#}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "{} of {} queries:\n{}",
            failed.len(),
            queries.len(),
            failed.join("\n")
        )
    }
}

fn first_column(series: &[Value]) -> BTreeSet<String> {
    // SHOW MEASUREMENTS: ["name"]; SHOW TAG VALUES: ["key", "value"]; SHOW FIELD KEYS:
    // ["fieldKey", "fieldType"]. Grafana takes the value column, or the first one.
    series
        .iter()
        .flat_map(|s| {
            let col = usize::from(s["columns"][1] == "value");
            s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(move |row| row[col].as_str().map(str::to_owned))
        })
        .collect()
}

fn now_ms() -> i64 {
    base_ms() + 3_600_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_alert_query_answers_on_influxdb_1_6() {
    let influx = Influx1::start(DB).await;
    let gw = Gateway::start(&[
        ("GATEWAY_SINK__API", "v1".into()),
        ("GATEWAY_SINK__URL", influx.url.clone()),
        ("GATEWAY_SINK__DATABASE", DB.into()),
        ("GATEWAY_SELF_METRICS__INTERVAL", "1s".into()),
        ("GATEWAY_SELF_METRICS__INSTANCE", INSTANCE.into()),
        ("GATEWAY_BATCH__LINGER", "50ms".into()),
    ])
    .await;

    // Telemetry: measurement env, fields temp and hum, from three devices; JSON one reading
    // at a time and a CBOR array, timestamps in the last few seconds.
    let now = now_ms();
    for (d, device) in DEVICES.iter().enumerate() {
        let topic = format!("telemetry/{device}/env");
        let mut messages: Vec<Message> = (0..5)
            .map(|i| Message {
                topic: topic.clone(),
                payload: json!({"ts": now - 10_000 + i, "fields": {"temp": 20.0 + d as f64 + i as f64 / 10.0, "hum": 40 + i}, "tags": {"site": "north"}})
                    .to_string()
                    .into_bytes(),
                content_type: None,
            })
            .collect();
        let batch: Vec<C> = (0..5)
            .map(|i| {
                C::Map(vec![
                    (C::Text("ts".into()), C::Integer((now - 5_000 + i).into())),
                    (
                        C::Text("fields".into()),
                        C::Map(vec![
                            (C::Text("temp".into()), C::Float(21.5 + d as f64)),
                            (C::Text("hum".into()), C::Integer(45.into())),
                        ]),
                    ),
                ])
            })
            .collect();
        messages.push(Message {
            topic: topic.clone(),
            payload: cbor(&C::Array(batch)),
            content_type: None,
        });
        publish_v4(gw.mqtt_port, &format!("dash-pub-{d}"), messages)
            .await
            .expect("publish telemetry");
    }
    gw.wait_metric("gateway_sink_readings_written_total", 30.0)
        .await;

    // Refusals, so that rejection reasons and rejected input exist ...
    let bad: Vec<Message> = [
        r#"{"fields": {}}"#,
        r#"{"fields": {"temp": {"celsius": 20}}}"#,
        r#"{"tags": {"site": "north"}}"#,
        "{not json}",
    ]
    .iter()
    .map(|p| Message {
        topic: "telemetry/dash-1/env".into(),
        payload: p.as_bytes().to_vec(),
        content_type: None,
    })
    .collect();
    publish_v4(gw.mqtt_port, "dash-bad", bad)
        .await
        .expect("publish bad payloads");
    // ... and a field type conflict (temp is a float in the sink), so that the sink answers
    // 400: outcome "rejected", a rejected_by_sink record.
    publish_v4(
        gw.mqtt_port,
        "dash-conflict",
        vec![Message {
            topic: "telemetry/dash-2/env".into(),
            payload: format!(r#"{{"ts": {now}, "fields": {{"temp": "warm"}}}}"#).into_bytes(),
            content_type: None,
        }],
    )
    .await
    .expect("publish a conflicting reading");
    gw.wait_metric(
        "gateway_dlq_parked_readings_total{kind=\"rejected_by_sink\"}",
        1.0,
    )
    .await;

    let one = [
        ("$timeFilter", "time > now() - 1h"),
        ("$__interval", "10s"),
        ("$measurement", "env"),
        ("$device", "dash-2"),
        ("$field", "temp"),
        ("$instance", INSTANCE),
    ];
    // "All" of a multi-value variable: the dashboards set allValue to .*
    let all = [
        ("$timeFilter", "time > now() - 1h"),
        ("$__interval", "10s"),
        ("$measurement", "env"),
        ("$device", ".*"),
        ("$field", "temp"),
        ("$instance", ".*"),
    ];
    let mut raw = dashboard_queries("dashboards/telemetry.json");
    raw.extend(dashboard_queries("dashboards/gateway-health.json"));
    let alerts = alert_queries();
    assert!(
        alerts.len() >= 7,
        "alerts.yaml: expected a query per rule, found {}",
        alerts.len()
    );
    raw.extend(alerts);
    let mut queries: Vec<Query> = raw.iter().map(|q| substitute(q, &one)).collect();
    queries.extend(raw.iter().map(|q| {
        let mut q = substitute(q, &all);
        q.name.push_str(" (All)");
        q
    }));

    // Rates need two self-metrics intervals' worth of buckets: wait until every query has
    // something to say (the panic names the ones that did not).
    eventually(
        Duration::from_secs(90),
        "every dashboard and alert query returns data",
        || run_all(&influx, &queries),
    )
    .await;

    // What the variables offer.
    let find = |needle: &str| {
        queries
            .iter()
            .find(|q| q.name.contains(needle))
            .unwrap_or_else(|| panic!("no query named like {needle}"))
            .clone()
    };
    let measurements = first_column(
        &series(&influx, &find("variable $measurement"))
            .await
            .expect("measurements"),
    );
    assert!(
        measurements.contains("env") && !measurements.contains("gateway"),
        "$measurement must offer telemetry and not the gateway's own measurement: {measurements:?}"
    );
    let devices = first_column(
        &series(&influx, &find("variable $device"))
            .await
            .expect("devices"),
    );
    assert_eq!(
        devices,
        DEVICES.iter().map(|d| d.to_string()).collect(),
        "$device"
    );
    let fields = first_column(
        &series(&influx, &find("variable $field"))
            .await
            .expect("fields"),
    );
    assert!(
        fields.contains("temp") && fields.contains("hum"),
        "$field: {fields:?}"
    );
    let instances = first_column(
        &series(&influx, &find("variable $instance"))
            .await
            .expect("instances"),
    );
    assert_eq!(
        instances,
        BTreeSet::from([INSTANCE.to_owned()]),
        "$instance"
    );

    // The rejection panel shows each reason the payloads above earned.
    let reasons: BTreeSet<String> = series(&influx, &find("panel \"Rejections by reason\""))
        .await
        .expect("rejections")
        .iter()
        .filter_map(|s| s["tags"]["reason"].as_str().map(str::to_owned))
        .collect();
    for reason in [
        "empty_fields",
        "nested_value",
        "missing_fields",
        "malformed_json",
    ] {
        assert!(reasons.contains(reason), "no {reason} in {reasons:?}");
    }
    // Nobody is silent: every device has readings in its last 15 minutes.
    let silent = series(&influx, &find("rule telemetry-device-silent query \"A\""))
        .await
        .expect("device silent");
    assert_eq!(
        silent.len(),
        DEVICES.len(),
        "one series per device: {silent:?}"
    );
    for s in &silent {
        assert!(
            s["values"][0][1].as_f64().unwrap_or(0.0) >= 1.0,
            "a device that just sent readings counts as silent: {s}"
        );
    }
    // The sink-error rule sees the refused write.
    let outcome = series(&influx, &find("rule gateway-sink-errors query \"B\""))
        .await
        .expect("sink requests");
    assert_eq!(outcome[0]["tags"]["instance"], INSTANCE);

    // Once drained, the ledger panel balances.
    gw.drained().await;
    let ledger = find("panel \"Ledger balance\"");
    eventually(Duration::from_secs(20), "ledger balance 0", || async {
        let s = series(&influx, &ledger).await?;
        let values = s[0]["values"].as_array().context("values")?;
        let last = values.last().context("a value")?[1].as_f64();
        anyhow::ensure!(last == Some(0.0), "last ledger balance {last:?}");
        Ok(())
    })
    .await;

    // The dead-letter records, as `gateway dlq list/show --json` print them, fit the schema
    // of docs/asyncapi.yaml.
    let record = schema("DeadLetterRecord");
    let (code, list, err) = gw.dlq(&["list"]);
    assert_eq!(code, 0, "dlq list: {err}");
    let records = list.as_array().expect("dlq list --json prints an array");
    let kinds: BTreeSet<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert!(
        kinds.contains("rejected_input") && kinds.contains("rejected_by_sink"),
        "{kinds:?}"
    );
    for r in records {
        assert_valid(&record, r, "dlq list entry");
        let id = r["id"].as_str().expect("id");
        let (code, shown, err) = gw.dlq(&["show", id]);
        assert_eq!(code, 0, "dlq show {id}: {err}");
        assert!(shown.get("data").is_some() || shown.get("data_hex").is_some());
        assert_valid(&record, &shown, "dlq show");
    }
}

#[test]
fn docker_compose_file_is_valid() {
    let root = repo_root();
    let out = match Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(&root)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "docker-compose is not installed; install it with: sudo apt-get install docker-compose \
             (or run ./scripts/test.sh, which installs it)"
        ),
        Err(e) => panic!("docker-compose: {e}"),
    };
    assert!(
        out.status.success(),
        "docker-compose -f docker-compose.yml config -q: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The provisioning files agree with each other: one datasource uid everywhere, every
/// alert's runbook link lands on a heading of docs/operations.md.
#[test]
fn provisioning_files_agree() {
    let ds = yaml_file("dashboards/provisioning/datasources/influxdb.yaml");
    let source = &ds["datasources"][0];
    assert_eq!(source["uid"], "influxdb");
    assert_eq!(source["type"], "influxdb");
    assert_eq!(source["jsonData"]["dbName"], "telemetry");
    let providers = yaml_file("dashboards/provisioning/dashboards/dashboards.yaml");
    assert_eq!(
        providers["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );

    for rel in [
        "dashboards/telemetry.json",
        "dashboards/gateway-health.json",
    ] {
        let d = json_file(rel);
        assert_eq!(d["schemaVersion"], 39, "{rel}");
        let text = d.to_string();
        // Every datasource reference is the provisioned one.
        let mut refs = Vec::new();
        collect_datasources(&d, &mut refs);
        assert!(!refs.is_empty(), "{rel}: no datasource references");
        for r in refs {
            assert!(
                r == json!({"type": "influxdb", "uid": "influxdb"})
                    || r["type"] == "grafana"
                    || r["type"] == "datasource",
                "{rel}: datasource {r}"
            );
        }
        assert!(text.contains("$timeFilter"), "{rel}: no $timeFilter");
    }

    let headings: BTreeSet<String> = read("docs/operations.md")
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect();
    let alerts = yaml_file("dashboards/alerts.yaml");
    let mut rules = 0;
    for g in alerts["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            rules += 1;
            let uid = r["uid"].as_str().expect("uid");
            let url = r["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("rule {uid} has no runbook_url"));
            let anchor = url.strip_prefix("docs/operations.md#").unwrap_or_else(|| {
                panic!("rule {uid}: runbook_url {url} is not docs/operations.md#…")
            });
            assert!(
                headings.contains(anchor),
                "rule {uid}: no heading for #{anchor} in docs/operations.md"
            );
            let condition = r["condition"].as_str().expect("condition");
            assert!(
                r["data"]
                    .as_array()
                    .expect("data")
                    .iter()
                    .any(|d| d["refId"] == condition),
                "rule {uid}: condition {condition} names no query or expression"
            );
        }
    }
    assert!(rules >= 7, "alerts.yaml has {rules} rules");
}

fn collect_datasources(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "datasource" && v.is_object() {
                    out.push(v.clone());
                } else {
                    collect_datasources(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_datasources(v, out)),
        _ => {}
    }
}

/// GitHub's heading anchors: lower case, spaces to hyphens, punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// A validator for `#/components/schemas/<name>` of docs/asyncapi.yaml.
fn schema(name: &str) -> jsonschema::Validator {
    let doc = yaml_file("docs/asyncapi.yaml");
    assert_eq!(doc["asyncapi"], "3.0.0");
    let root = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$ref": format!("#/components/schemas/{name}"),
        "components": {"schemas": doc["components"]["schemas"].clone()},
    });
    jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|e| panic!("schema {name} does not compile: {e}"))
}

fn assert_valid(v: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = v.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "{what} does not validate: {errors:?}\n{instance}"
    );
}

#[test]
fn payloads_validate_against_the_asyncapi_schema() {
    use simulator::payload::{encode, Encoding, Reading};

    let payload = schema("TelemetryPayload");
    // docs/contract.md §1's example.
    let contract: Value = serde_json::from_str(
        r#"{"ts": 1764126000123, "fields": {"temp": 21.5, "hum": 40, "door": false}, "tags": {"site": "north"}}"#,
    )
    .expect("the contract's example is JSON");
    assert_valid(&payload, &contract, "the contract's example");

    // The simulator's payloads, JSON and CBOR (the CBOR data model read as JSON values), one
    // reading (a map) and several (an array).
    let one = [Reading::new("r1", 1_764_126_000_000, 3, 21.5)];
    let many: Vec<Reading> = (0..5)
        .map(|i| Reading::new("r1", 1_764_126_000_000, i, i as f64 * 1.5 - 2.0))
        .collect();
    for readings in [&one[..], &many[..]] {
        let json_bytes = encode(readings, Encoding::Json).expect("JSON");
        let v: Value = serde_json::from_slice(&json_bytes).expect("JSON");
        assert_valid(&payload, &v, "a simulator JSON payload");
        let cbor_bytes = encode(readings, Encoding::Cbor).expect("CBOR");
        let v: Value = ciborium::from_reader(cbor_bytes.as_slice()).expect("CBOR as JSON values");
        assert_valid(&payload, &v, "a simulator CBOR payload");
    }

    // Every timestamp spelling, tags of every scalar type, text fields, no ts.
    for ok in [
        json!({"fields": {"v": 1}}),
        json!({"ts": 1764126000.123, "fields": {"v": 1.5}}),
        json!({"ts": "2025-11-26T03:00:00.123Z", "fields": {"v": "text", "ok": true}}),
        json!({"fields": {"v": -3}, "tags": {"floor": 3, "indoor": true, "site": "north"}}),
        json!([]),
        json!([{"fields": {"a": 1}}, {"fields": {"b": 2}, "ts": 1764126000000_i64}]),
    ] {
        assert_valid(&payload, &ok, "a valid payload");
    }

    // The document's own message examples fit their payload schemas.
    let doc = yaml_file("docs/asyncapi.yaml");
    let record = schema("DeadLetterRecord");
    for (message, validator) in [("ReadingsJson", &payload), ("DeadLetterRecord", &record)] {
        let examples = doc["components"]["messages"][message]["examples"]
            .as_array()
            .unwrap_or_else(|| panic!("message {message} has no examples"));
        for e in examples {
            assert_valid(
                validator,
                &e["payload"],
                &format!("example {} of {message}", e["name"]),
            );
        }
    }

    // What the gateway refuses must not validate either.
    let too_many: serde_json::Map<String, Value> =
        (0..257).map(|i| (format!("f{i}"), json!(1))).collect();
    for (why, bad) in [
        ("missing fields", json!({"tags": {"site": "north"}})),
        (
            "missing fields in an array",
            json!([{"fields": {"a": 1}}, {"ts": 1}]),
        ),
        ("empty fields", json!({"fields": {}})),
        (
            "nested field value",
            json!({"fields": {"temp": {"celsius": 20}}}),
        ),
        ("array field value", json!({"fields": {"temp": [1, 2]}})),
        (
            "nested tag value",
            json!({"fields": {"a": 1}, "tags": {"site": {"x": "y"}}}),
        ),
        ("null value", json!({"fields": {"a": null}})),
        ("unknown key", json!({"fields": {"a": 1}, "device": "d1"})),
        ("fields not a map", json!({"fields": [1, 2]})),
        ("bool timestamp", json!({"fields": {"a": 1}, "ts": true})),
        ("not a date", json!({"fields": {"a": 1}, "ts": "yesterday"})),
        ("empty key", json!({"fields": {"": 1}})),
        (
            "empty tag value",
            json!({"fields": {"a": 1}, "tags": {"site": ""}}),
        ),
        ("line break in text", json!({"fields": {"a": "x\ny"}})),
        ("257 fields", json!({ "fields": too_many })),
        ("a bare number", json!(42)),
        ("an array of arrays", json!([[{"fields": {"a": 1}}]])),
    ] {
        assert!(
            !payload.is_valid(&bad),
            "{why}: {bad} validates, but the gateway refuses it"
        );
    }
}
