//! Checks that what the devices sent landed in the sink: exactly once per device series and
//! timestamp.
//!
//! The parsing and comparison are pure functions; [`verify`] adds the HTTP polling around them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// What each device sent. A device's readings carry the timestamps `start_ms + 0..count`
/// (see [`crate::payload::timestamp_ms`]), so a count per device describes them all.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub start_ms: i64,
    pub per_device: BTreeMap<String, u64>,
}

impl Expected {
    pub fn total(&self) -> u64 {
        self.per_device.values().sum()
    }

    /// One past the newest timestamp any device sent.
    pub fn end_ms(&self) -> i64 {
        let longest = self.per_device.values().copied().max().unwrap_or(0);
        crate::payload::timestamp_ms(self.start_ms, longest)
    }
}

/// What the sink returned, per `device` tag.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// Every timestamp of every point (VictoriaMetrics export): repeats are visible.
    Timestamps(BTreeMap<String, Vec<i64>>),
    /// Only a count of points (InfluxDB). The sink already merged points that share series and
    /// timestamp, so repeats cannot be seen; a count above the expected one still can.
    Counts(BTreeMap<String, u64>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceMismatch {
    pub device: String,
    pub expected: u64,
    pub found: u64,
    pub duplicated: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    pub expected_readings: u64,
    /// Expected readings present in the sink, each counted once.
    pub readings_found: u64,
    pub lost: u64,
    /// Points beyond the expected ones: a repeated timestamp, or one that was never sent.
    pub duplicated: u64,
    /// Only the devices whose counts differ from what they sent.
    pub per_device: Vec<DeviceMismatch>,
    /// Nothing lost. Duplicates are reported but do not fail a run: the gateway delivers at
    /// least once, and a retried batch may legitimately be stored twice by a sink that does not
    /// deduplicate.
    pub verified: bool,
    /// The timeout passed before everything was found; the numbers are from the last poll.
    pub timed_out: bool,
}

/// Compares what was sent with what the sink holds.
pub fn compare(expected: &Expected, observed: &Observed) -> Verification {
    let mut devices: Vec<&str> = expected.per_device.keys().map(String::as_str).collect();
    match observed {
        Observed::Timestamps(m) => devices.extend(m.keys().map(String::as_str)),
        Observed::Counts(m) => devices.extend(m.keys().map(String::as_str)),
    }
    devices.sort_unstable();
    devices.dedup();

    let mut v = Verification {
        expected_readings: 0,
        readings_found: 0,
        lost: 0,
        duplicated: 0,
        per_device: Vec::new(),
        verified: false,
        timed_out: false,
    };
    for device in devices {
        let want = expected.per_device.get(device).copied().unwrap_or(0);
        let (found, duplicated) = match observed {
            Observed::Timestamps(m) => {
                let ts = m.get(device).map(Vec::as_slice).unwrap_or_default();
                let end = crate::payload::timestamp_ms(expected.start_ms, want);
                let mut wanted: Vec<i64> = ts
                    .iter()
                    .copied()
                    .filter(|t| (expected.start_ms..end).contains(t))
                    .collect();
                wanted.sort_unstable();
                wanted.dedup();
                let found = wanted.len() as u64;
                (found, ts.len() as u64 - found)
            }
            Observed::Counts(m) => {
                let count = m.get(device).copied().unwrap_or(0);
                let found = count.min(want);
                (found, count - found)
            }
        };
        v.expected_readings += want;
        v.readings_found += found;
        v.lost += want - found;
        v.duplicated += duplicated;
        if found != want || duplicated != 0 {
            v.per_device.push(DeviceMismatch {
                device: device.to_owned(),
                expected: want,
                found,
                duplicated,
            });
        }
    }
    v.verified = v.lost == 0;
    v
}

/// One line of `/api/v1/export`.
#[derive(Deserialize)]
struct ExportLine {
    metric: BTreeMap<String, String>,
    #[serde(default)]
    timestamps: Vec<i64>,
}

/// Parses VictoriaMetrics' JSON-lines export into timestamps per `device` label. A device may
/// span several series (say, when the sink adds a label per write path); they are merged.
pub fn parse_vm_export(body: &str) -> Result<BTreeMap<String, Vec<i64>>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (i, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line: ExportLine = serde_json::from_str(line)
            .with_context(|| format!("export line {} is not a series", i + 1))?;
        let device = line.metric.get("device").cloned().unwrap_or_default();
        out.entry(device).or_default().extend(line.timestamps);
    }
    Ok(out)
}

/// Parses the InfluxDB 1.x answer to a `count(...) ... GROUP BY "device"` query.
pub fn parse_influx_counts(body: &str) -> Result<BTreeMap<String, u64>> {
    #[derive(Deserialize)]
    struct Response {
        #[serde(default)]
        results: Vec<StatementResult>,
        error: Option<String>,
    }
    #[derive(Deserialize)]
    struct StatementResult {
        #[serde(default)]
        series: Vec<Series>,
        error: Option<String>,
    }
    #[derive(Deserialize)]
    struct Series {
        #[serde(default)]
        tags: BTreeMap<String, String>,
        #[serde(default)]
        values: Vec<Vec<serde_json::Value>>,
    }

    let response: Response = serde_json::from_str(body).context("InfluxDB answer is not JSON")?;
    if let Some(e) = response.error {
        bail!("InfluxDB: {e}");
    }
    let mut out = BTreeMap::new();
    for result in response.results {
        if let Some(e) = result.error {
            bail!("InfluxDB: {e}");
        }
        for series in result.series {
            let device = series.tags.get("device").cloned().unwrap_or_default();
            // One row [time, count] per group, since the query does not group by time.
            let mut count = 0;
            for row in &series.values {
                let n = row
                    .get(1)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| {
                        format!("InfluxDB row {row:?} of device {device:?} has no count")
                    })?;
                count += n as u64;
            }
            *out.entry(device).or_insert(0) += count;
        }
    }
    Ok(out)
}

/// Where the gateway wrote.
#[derive(Debug, Clone)]
pub enum Sink {
    VictoriaMetrics { url: String },
    Influx1 { url: String, db: String },
}

/// Which run's points to look for. `run_id` and `measurement` go into queries unescaped, so
/// callers must keep them to characters that need no quoting (the CLI checks this).
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub measurement: &'a str,
    pub run_id: &'a str,
}

/// Polls the sink until every expected reading is there or `timeout` passes.
///
/// The gateway batches and the sink flushes on its own schedule, so the first look usually
/// comes up short; only the last poll counts. `Err` means the sink never answered usefully.
pub async fn verify(
    sink: &Sink,
    query: &Query<'_>,
    expected: &Expected,
    timeout: Duration,
) -> Result<Verification> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let deadline = Instant::now() + timeout;
    let mut last: Option<Verification> = None;
    let mut last_err = None;
    loop {
        match observe(&http, sink, query, expected).await {
            Ok(observed) => {
                let v = compare(expected, &observed);
                tracing::debug!(found = v.readings_found, lost = v.lost, "verification poll");
                if v.lost == 0 {
                    return Ok(v);
                }
                last = Some(v);
            }
            Err(e) => {
                tracing::warn!("querying the sink: {e:#}");
                last_err = Some(e);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep((deadline - now).min(Duration::from_secs(1))).await;
    }
    match (last, last_err) {
        (Some(mut v), _) => {
            v.timed_out = true;
            Ok(v)
        }
        (None, Some(e)) => Err(e.context("no usable answer from the sink")),
        (None, None) => bail!("verification timeout of {timeout:?} is too short to query once"),
    }
}

async fn observe(
    http: &reqwest::Client,
    sink: &Sink,
    query: &Query<'_>,
    expected: &Expected,
) -> Result<Observed> {
    match sink {
        Sink::VictoriaMetrics { url } => {
            let url = url.trim_end_matches('/');
            // Recent samples are searchable only once VictoriaMetrics flushes its in-memory
            // buffers; forcing it shortens the wait. Old versions lack it, hence no error.
            if let Err(e) = http
                .post(format!("{url}/internal/force_flush"))
                .send()
                .await
            {
                tracing::debug!("force_flush: {e}");
            }
            let selector = format!(
                r#"{{__name__="{}_value",run="{}"}}"#,
                query.measurement, query.run_id
            );
            // Bounds in whole seconds. The end is explicit because a large run stamps readings
            // into the future, and the default end is "now".
            let start = expected.start_ms.div_euclid(1000);
            let end = expected.end_ms().div_euclid(1000) + 1;
            let body = http
                .get(format!("{url}/api/v1/export"))
                .query(&[
                    ("match[]", selector),
                    ("start", start.to_string()),
                    ("end", end.to_string()),
                ])
                .send()
                .await
                .context("GET /api/v1/export")?
                .error_for_status()
                .context("GET /api/v1/export")?
                .text()
                .await
                .context("reading the export")?;
            Ok(Observed::Timestamps(parse_vm_export(&body)?))
        }
        Sink::Influx1 { url, db } => {
            let url = url.trim_end_matches('/');
            // Explicit time bounds: without them InfluxDB may cap the range at now(), which
            // would miss the future-stamped end of a large run.
            let q = format!(
                r#"SELECT count("value") FROM "{}" WHERE "run"='{}' AND time >= {}ms AND time < {}ms GROUP BY "device""#,
                query.measurement,
                query.run_id,
                expected.start_ms,
                expected.end_ms()
            );
            let body = http
                .get(format!("{url}/query"))
                .query(&[("db", db.as_str()), ("q", q.as_str()), ("epoch", "ms")])
                .send()
                .await
                .context("GET /query")?
                .error_for_status()
                .context("GET /query")?
                .text()
                .await
                .context("reading the query answer")?;
            Ok(Observed::Counts(parse_influx_counts(&body)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(per_device: &[(&str, u64)]) -> Expected {
        Expected {
            start_ms: 1000,
            per_device: per_device
                .iter()
                .map(|(d, n)| (d.to_string(), *n))
                .collect(),
        }
    }

    #[test]
    fn vm_export_parses_and_merges_series() {
        let body = concat!(
            r#"{"metric":{"__name__":"env_value","device":"dev-00001","run":"r"},"values":[1,2],"timestamps":[1000,1001]}"#,
            "\n",
            r#"{"metric":{"__name__":"env_value","device":"dev-00001","run":"r","db":"x"},"values":[3],"timestamps":[1002]}"#,
            "\n\n",
            r#"{"metric":{"__name__":"env_value","device":"dev-00002","run":"r"},"values":[1],"timestamps":[1000]}"#,
            "\n",
        );
        let m = parse_vm_export(body).expect("parse");
        assert_eq!(m["dev-00001"], vec![1000, 1001, 1002]);
        assert_eq!(m["dev-00002"], vec![1000]);
        assert!(parse_vm_export("").expect("empty").is_empty());
        assert!(parse_vm_export("not json").is_err());
    }

    #[test]
    fn timestamps_compare_counts_lost_and_duplicated() {
        let exp = expected(&[("a", 3), ("b", 2), ("c", 2)]);
        let obs = Observed::Timestamps(BTreeMap::from([
            ("a".to_string(), vec![1000, 1001, 1002]),
            // One repeat and one timestamp that was never sent.
            ("b".to_string(), vec![1001, 1000, 1001, 1005]),
            // Missing one; "c" also loses nothing else.
            ("c".to_string(), vec![1001]),
            // A device that never existed.
            ("z".to_string(), vec![1000]),
        ]));
        let v = compare(&exp, &obs);
        assert_eq!(v.expected_readings, 7);
        assert_eq!(v.readings_found, 6);
        assert_eq!(v.lost, 1);
        assert_eq!(v.duplicated, 3);
        assert!(!v.verified);
        assert_eq!(
            v.per_device,
            vec![
                DeviceMismatch {
                    device: "b".into(),
                    expected: 2,
                    found: 2,
                    duplicated: 2
                },
                DeviceMismatch {
                    device: "c".into(),
                    expected: 2,
                    found: 1,
                    duplicated: 0
                },
                DeviceMismatch {
                    device: "z".into(),
                    expected: 0,
                    found: 0,
                    duplicated: 1
                },
            ]
        );
    }

    #[test]
    fn everything_found_verifies() {
        let exp = expected(&[("a", 2)]);
        let v = compare(
            &exp,
            &Observed::Timestamps(BTreeMap::from([("a".to_string(), vec![1001, 1000])])),
        );
        assert!(v.verified);
        assert!(v.per_device.is_empty());
        assert_eq!((v.readings_found, v.lost, v.duplicated), (2, 0, 0));
    }

    #[test]
    fn influx_counts_parse_and_compare() {
        let body = r#"{"results":[{"statement_id":0,"series":[
            {"name":"env","tags":{"device":"dev-00001"},"columns":["time","count"],"values":[[0,5]]},
            {"name":"env","tags":{"device":"dev-00002"},"columns":["time","count"],"values":[["1970-01-01T00:00:00Z",7]]}
        ]}]}"#;
        let counts = parse_influx_counts(body).expect("parse");
        assert_eq!(
            counts,
            BTreeMap::from([("dev-00001".to_string(), 5), ("dev-00002".to_string(), 7)])
        );

        let exp = expected(&[("dev-00001", 5), ("dev-00002", 6), ("dev-00003", 4)]);
        let v = compare(&exp, &Observed::Counts(counts));
        assert_eq!(v.readings_found, 11);
        assert_eq!(v.lost, 4);
        assert_eq!(v.duplicated, 1);
        assert_eq!(v.per_device.len(), 2);

        // No data yet: InfluxDB omits "series".
        let empty = parse_influx_counts(r#"{"results":[{"statement_id":0}]}"#).expect("parse");
        assert!(empty.is_empty());
        assert!(parse_influx_counts(r#"{"results":[{"error":"database not found: x"}]}"#).is_err());
        assert!(parse_influx_counts(r#"{"error":"bad query"}"#).is_err());
    }

    #[test]
    fn expected_bounds() {
        let exp = expected(&[("a", 3), ("b", 10)]);
        assert_eq!(exp.total(), 13);
        assert_eq!(exp.end_ms(), 1010);
    }
}
