//! Asks the sink for this run's readings: during the run, to see when each first shows up
//! (latency), and after it, to count what was lost or duplicated.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::SinkKind;
use crate::shared::{Counters, Sent};
use crate::tracker::{Comparison, Samples, Tracker};

/// Pending readings further apart than this are fetched in separate ranges.
const RANGE_GAP_MS: i64 = 10_000;
/// Most ranges fetched per poll.
const MAX_RANGES: usize = 16;

/// Where the gateway wrote.
#[derive(Debug, Clone)]
pub struct Sink {
    pub kind: SinkKind,
    /// Base URL, without a trailing '/'.
    pub url: String,
    /// InfluxDB 1.x database.
    pub database: String,
}

/// Which run's points to look for. Both go into queries unescaped, so they are held to
/// characters that need no quoting (the settings check this).
#[derive(Debug, Clone)]
pub struct Query {
    pub measurement: String,
    pub run_id: String,
}

#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    pub poll_interval: Duration,
    /// How long to keep looking once the devices are done.
    pub timeout: Duration,
    /// Devices of the run, so that one that sent nothing still shows in the figures.
    pub devices: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    /// "victoria-metrics" or "influx".
    pub sink: &'static str,
    #[serde(flatten)]
    pub comparison: Comparison,
    /// How often the sink was polled: a reading's latency is measured to the end of the first
    /// poll that showed it, so it is late by up to this much plus `slowest_poll_ms`.
    pub latency_resolution_ms: u64,
    /// Polls made, and the longest one took (force flush and export).
    pub polls: u64,
    pub slowest_poll_ms: u64,
    /// Nothing lost. Duplicates are reported but do not fail a run: the gateway delivers at
    /// least once, and a sink that does not deduplicate may store a retried batch twice.
    pub verified: bool,
    /// The timeout passed before everything was found.
    pub timed_out: bool,
    /// Polls that failed (the sink was busy or down); the run goes on without them.
    pub failed_polls: u64,
}

/// Takes every published message from `sent`, polls the sink for the readings not seen yet
/// every `poll_interval`, and once the channel closes (the devices are done) keeps polling
/// until everything is seen or `timeout` passes; then compares everything.
pub async fn watch(
    sink: &Sink,
    query: &Query,
    mut sent: mpsc::UnboundedReceiver<Sent>,
    mut tracker: Tracker,
    opts: WatchOptions,
    counters: &Counters,
) -> Result<Verification> {
    let http = reqwest::Client::builder()
        // Large final exports of a big run take a while.
        .timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let mut tick = tokio::time::interval(opts.poll_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut deadline: Option<Instant> = None;
    let mut failed_polls = 0;
    let mut polls = 0;
    let mut slowest_poll = Duration::ZERO;
    let mut last_error = None;
    let timed_out = loop {
        tokio::select! {
            got = sent.recv(), if deadline.is_none() => match got {
                Some(s) => tracker.add(s),
                None => deadline = Some(Instant::now() + opts.timeout),
            },
            _ = tick.tick() => {
                while let Ok(s) = sent.try_recv() {
                    tracker.add(s);
                }
                if tracker.pending() > 0 {
                    let ranges = tracker.pending_ranges(RANGE_GAP_MS, MAX_RANGES);
                    let started = Instant::now();
                    polls += 1;
                    let fetched = fetch(&http, sink, query, &ranges).await;
                    slowest_poll = slowest_poll.max(started.elapsed());
                    match fetched {
                        Ok(samples) => {
                            tracker.observe(&samples, Instant::now());
                        }
                        Err(e) => {
                            tracing::debug!("polling the sink: {e:#}");
                            failed_polls += 1;
                            last_error = Some(e);
                        }
                    }
                }
                counters.expected.store(tracker.expected(), Ordering::Relaxed);
                counters.seen.store(tracker.expected() - tracker.pending(), Ordering::Relaxed);
                if let Some(d) = deadline {
                    if tracker.pending() == 0 {
                        break false;
                    }
                    if Instant::now() >= d {
                        break true;
                    }
                }
            }
        }
    };
    if let Some(e) = &last_error {
        tracing::warn!(
            failed_polls,
            "some polls of the sink failed, the last: {e:#}"
        );
    }
    // The last word: everything, including repeats that the polls ignored.
    let ranges = tracker.all_ranges(RANGE_GAP_MS, MAX_RANGES);
    let samples = fetch(&http, sink, query, &ranges)
        .await
        .context("reading the run back from the sink")?;
    tracker.observe(&samples, Instant::now());
    let comparison = tracker.compare(&samples, opts.devices);
    Ok(Verification {
        sink: match sink.kind {
            SinkKind::Influx => "influx",
            _ => "victoria-metrics",
        },
        verified: comparison.lost == 0,
        comparison,
        latency_resolution_ms: opts.poll_interval.as_millis() as u64,
        polls,
        slowest_poll_ms: slowest_poll.as_millis() as u64,
        timed_out,
        failed_polls,
    })
}

/// This run's points with timestamps in `ranges` (ms, inclusive), per device.
pub async fn fetch(
    http: &reqwest::Client,
    sink: &Sink,
    query: &Query,
    ranges: &[(i64, i64)],
) -> Result<Samples> {
    let mut out = Samples::new();
    if sink.kind == SinkKind::VictoriaMetrics && !ranges.is_empty() {
        // Recent samples are searchable only once VictoriaMetrics flushes its in-memory
        // buffers; forcing it makes the latency measured the gateway's, not the sink's
        // flush interval. Old versions lack it, hence no error.
        if let Err(e) = http
            .post(format!("{}/internal/force_flush", sink.url))
            .send()
            .await
        {
            tracing::debug!("force_flush: {e}");
        }
    }
    for (start, end) in ranges {
        let part = match sink.kind {
            SinkKind::Influx => fetch_influx(http, sink, query, *start, *end).await?,
            _ => fetch_vm(http, sink, query, *start, *end).await?,
        };
        for (device, ts) in part {
            out.entry(device).or_default().extend(ts);
        }
    }
    Ok(out)
}

/// Seconds with milliseconds, as VictoriaMetrics takes `start` and `end`.
fn vm_time(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

async fn fetch_vm(
    http: &reqwest::Client,
    sink: &Sink,
    query: &Query,
    start: i64,
    end: i64,
) -> Result<Samples> {
    let selector = format!(
        r#"{{__name__="{}_value",run="{}"}}"#,
        query.measurement, query.run_id
    );
    let body = http
        .get(format!("{}/api/v1/export", sink.url))
        .query(&[
            ("match[]", selector),
            ("start", vm_time(start)),
            // Explicit: the default end is "now", and skewed devices stamp the future.
            ("end", vm_time(end)),
        ])
        .send()
        .await
        .context("GET /api/v1/export")?
        .error_for_status()
        .context("GET /api/v1/export")?
        .text()
        .await
        .context("reading the export")?;
    let mut samples = parse_vm_export(&body)?;
    // The range is meant inclusive at both ends; keep exactly that whatever the server does.
    for ts in samples.values_mut() {
        ts.retain(|t| (start..=end).contains(t));
    }
    Ok(samples)
}

async fn fetch_influx(
    http: &reqwest::Client,
    sink: &Sink,
    query: &Query,
    start: i64,
    end: i64,
) -> Result<Samples> {
    let q = format!(
        r#"SELECT "value" FROM "{}" WHERE "run"='{}' AND time >= {start}ms AND time <= {end}ms GROUP BY "device""#,
        query.measurement, query.run_id,
    );
    let body = http
        .get(format!("{}/query", sink.url))
        .query(&[
            ("db", sink.database.as_str()),
            ("q", q.as_str()),
            ("epoch", "ms"),
        ])
        .send()
        .await
        .context("GET /query")?
        .error_for_status()
        .context("GET /query")?
        .text()
        .await
        .context("reading the query answer")?;
    parse_influx_points(&body)
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
pub fn parse_vm_export(body: &str) -> Result<Samples> {
    let mut out = Samples::new();
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

/// Parses the InfluxDB 1.x answer to a `SELECT ... GROUP BY "device"` query (epoch=ms) into
/// timestamps per device. InfluxDB keeps one point per series and timestamp, so repeats
/// cannot show here.
pub fn parse_influx_points(body: &str) -> Result<Samples> {
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
    let mut out = Samples::new();
    for result in response.results {
        if let Some(e) = result.error {
            bail!("InfluxDB: {e}");
        }
        for series in result.series {
            let device = series.tags.get("device").cloned().unwrap_or_default();
            let stamps = out.entry(device.clone()).or_default();
            for row in &series.values {
                let ts = row
                    .first()
                    .and_then(serde_json::Value::as_i64)
                    .with_context(|| format!("InfluxDB row {row:?} of {device:?} has no time"))?;
                stamps.push(ts);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn influx_points_parse() {
        let body = r#"{"results":[{"statement_id":0,"series":[
            {"name":"env","tags":{"device":"dev-00001"},"columns":["time","value"],"values":[[1000,1.5],[1001,2.5]]},
            {"name":"env","tags":{"device":"dev-00002"},"columns":["time","value"],"values":[[1000,7]]}
        ]}]}"#;
        let m = parse_influx_points(body).expect("parse");
        assert_eq!(m["dev-00001"], vec![1000, 1001]);
        assert_eq!(m["dev-00002"], vec![1000]);
        // No data yet: InfluxDB omits "series".
        let empty = parse_influx_points(r#"{"results":[{"statement_id":0}]}"#).expect("parse");
        assert!(empty.is_empty());
        assert!(parse_influx_points(r#"{"results":[{"error":"database not found: x"}]}"#).is_err());
        assert!(parse_influx_points(r#"{"error":"bad query"}"#).is_err());
    }

    #[test]
    fn vm_times_keep_milliseconds() {
        assert_eq!(vm_time(1_764_126_000_123), "1764126000.123");
        assert_eq!(vm_time(5), "0.005");
        assert_eq!(vm_time(-1), "-1.999");
    }
}
