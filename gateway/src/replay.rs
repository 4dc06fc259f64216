//! The operator's commands on the dead-letter queue: `gateway dlq list | show | replay | purge`.
//!
//! `list` and `show` only read, so they work while the gateway runs. `replay` and `purge`
//! change the queue and need its lock: while a gateway holds it they refuse with a message
//! saying so (the running gateway redrives `retries_exhausted` records by itself; stop it to
//! replay or purge the others).

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::decode::{Decoder, TopicPattern};
use crate::deliver::{Deliverer, Policy, Replayed, WhenDlqFull, WhileSinkDown};
use crate::dlq::{Dlq, DlqError, Entry, Kind, Meta, Options, SharedDlq};
use crate::metrics::Metrics;
use crate::sink::Sink;

/// Which records a command works on.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Ids(Vec<String>),
}

/// Sorted by what the operator must do.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Dlq(#[from] DlqError),
    #[error("cannot reach the sink: {0}")]
    Sink(#[from] crate::sink::BuildError),
    #[error("mqtt.topic: {0}")]
    Topic(#[from] crate::decode::topic::PatternError),
    #[error("name the records to {0}, or pass --all")]
    NothingSelected(&'static str),
}

fn options(config: &Config) -> Options {
    crate::dlq::options(&config.dlq)
}

/// A record as `list` and `show` print it.
#[derive(Debug, Serialize)]
pub struct Listed {
    pub id: String,
    pub kind: Kind,
    pub readings: u32,
    pub attempts: u32,
    pub first_failure: String,
    pub last_failure: String,
    pub status: Option<u16>,
    pub reason: String,
    pub topics: Vec<String>,
    pub more_topics: u32,
    pub data_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

impl Listed {
    fn from_entry(e: &Entry) -> Self {
        let m = &e.meta;
        Self {
            id: e.id.clone(),
            kind: m.kind,
            readings: m.readings,
            attempts: m.attempts,
            first_failure: rfc3339(m.first_failure_ms),
            last_failure: rfc3339(m.last_failure_ms),
            status: m.status,
            reason: m.reason.clone(),
            topics: m.topics.clone(),
            more_topics: m.more_topics,
            data_bytes: e.data_len,
            content_type: m.content_type.clone(),
        }
    }
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Every live record, oldest first. Reads only: works while the gateway runs.
pub fn list(config: &Config) -> Result<Vec<Listed>, CommandError> {
    let (dlq, _) = Dlq::open(&config.dlq.dir, options(config), false)?;
    Ok(dlq.entries().map(Listed::from_entry).collect())
}

/// One record with its data.
#[derive(Debug, Serialize)]
pub struct Shown {
    #[serde(flatten)]
    pub record: Listed,
    /// The data as text when it is UTF-8 (line protocol always is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The data in hex otherwise (a binary payload kept as rejected input).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_hex: Option<String>,
}

pub fn show(config: &Config, id: &str) -> Result<Shown, CommandError> {
    let (dlq, _) = Dlq::open(&config.dlq.dir, options(config), false)?;
    let entry = dlq
        .get(id)
        .ok_or_else(|| DlqError::NotFound(id.to_owned()))?;
    let record = Listed::from_entry(entry);
    let (_, data) = dlq.read(id)?;
    let (text, hex) = match String::from_utf8(data) {
        Ok(s) => (Some(s), None),
        Err(e) => (
            None,
            Some(e.into_bytes().iter().map(|b| format!("{b:02x}")).collect()),
        ),
    };
    Ok(Shown {
        record,
        data: text,
        data_hex: hex,
    })
}

/// What `replay` did with one record.
#[derive(Debug, Serialize)]
pub struct ReplayLine {
    pub id: String,
    pub kind: Kind,
    pub readings: u32,
    /// "written", "split", "left", or "would replay" (dry run).
    pub outcome: &'static str,
    pub written: u32,
    pub parked_again: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Totals of a replay; `left` > 0 means some records stay.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub records: usize,
    pub written_readings: u64,
    pub parked_again_readings: u64,
    pub left: usize,
    pub lines: Vec<ReplayLine>,
}

/// Writes the selected records to the sink at most `rate` records a second. Idempotent: a
/// record written twice is the same points in the sink. What cannot be written stays.
pub async fn replay(
    config: &Config,
    selection: Selection,
    dry_run: bool,
    rate: u32,
) -> Result<ReplayReport, CommandError> {
    let (dlq, _) = Dlq::open(&config.dlq.dir, options(config), !dry_run)?;
    let selected = select(&dlq, &selection, "replay")?;
    let mut report = ReplayReport::default();
    if dry_run {
        for e in selected {
            report.records += 1;
            report.lines.push(ReplayLine {
                id: e.id.clone(),
                kind: e.meta.kind,
                readings: e.meta.readings,
                outcome: "would replay",
                written: 0,
                parked_again: 0,
                detail: None,
            });
        }
        return Ok(report);
    }
    let selected: Vec<(String, Meta)> = selected
        .into_iter()
        .map(|e| (e.id.clone(), e.meta.clone()))
        .collect();
    let metrics = Arc::new(Metrics::new());
    let shared = SharedDlq::new(dlq, metrics.clone());
    let s = &config.sink;
    // A replay never waits for room: what cannot be parked again stays where it is.
    let deliverer = Deliverer::new(
        Arc::new(Sink::new(s)?),
        metrics,
        shared.clone(),
        Policy::new(s, WhenDlqFull::GiveUp, WhileSinkDown::Write),
    );
    let mut decoder = Decoder::new(config.limits(), TopicPattern::parse(&config.mqtt.topic)?);
    let pace = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    for (id, meta) in selected {
        report.records += 1;
        let (_, data) = shared.read(id.clone()).await?;
        let mut line = ReplayLine {
            id: id.clone(),
            kind: meta.kind,
            readings: meta.readings,
            outcome: "left",
            written: 0,
            parked_again: 0,
            detail: None,
        };
        let lines = if meta.kind == Kind::RejectedInput {
            decode_again(&mut decoder, &meta, &data)
        } else {
            Ok(data)
        };
        match lines {
            Err(reason) => line.detail = Some(reason),
            Ok(lines) => match deliverer.replay(lines, &meta).await {
                Replayed::Written(n) => {
                    shared.delete(vec![id]).await?;
                    (line.outcome, line.written) = ("written", n);
                }
                Replayed::Split { written, parked } => {
                    shared.delete(vec![id]).await?;
                    (line.outcome, line.written, line.parked_again) = ("split", written, parked);
                }
                Replayed::Left(reason) => line.detail = Some(reason),
            },
        }
        report.written_readings += u64::from(line.written);
        report.parked_again_readings += u64::from(line.parked_again);
        if line.outcome == "left" {
            report.left += 1;
        }
        report.lines.push(line);
        tokio::time::sleep(pace).await;
    }
    Ok(report)
}

/// A rejected payload, decoded again with today's configuration.
fn decode_again(decoder: &mut Decoder, meta: &Meta, payload: &[u8]) -> Result<Vec<u8>, String> {
    let topic = meta.topics.first().map_or("", String::as_str);
    let mut lines = Vec::new();
    let now_ns = crate::dlq::now_ms().saturating_mul(1_000_000);
    let outcome = decoder
        .decode(
            topic,
            payload,
            meta.content_type.as_deref(),
            now_ns,
            &mut lines,
        )
        .map_err(|e| format!("still refused: {e}"))?;
    if !outcome.rejected.is_empty() {
        let reasons: Vec<String> = outcome.rejected.iter().map(|e| e.to_string()).collect();
        return Err(format!("still refused: {}", reasons.join("; ")));
    }
    Ok(lines)
}

/// What `purge` removed.
#[derive(Debug, Default, Serialize)]
pub struct PurgeReport {
    pub records: usize,
    pub readings: u64,
    pub ids: Vec<String>,
}

/// Deletes the selected records for good.
pub fn purge(config: &Config, selection: Selection) -> Result<PurgeReport, CommandError> {
    let (mut dlq, _) = Dlq::open(&config.dlq.dir, options(config), true)?;
    let selected = select(&dlq, &selection, "purge")?;
    let report = PurgeReport {
        records: selected.len(),
        readings: selected.iter().map(|e| u64::from(e.meta.readings)).sum(),
        ids: selected.iter().map(|e| e.id.clone()).collect(),
    };
    dlq.delete(&report.ids)?;
    Ok(report)
}

fn select<'d>(
    dlq: &'d Dlq,
    selection: &Selection,
    verb: &'static str,
) -> Result<Vec<&'d Entry>, CommandError> {
    match selection {
        Selection::All => Ok(dlq.entries().collect()),
        Selection::Ids(ids) if ids.is_empty() => Err(CommandError::NothingSelected(verb)),
        Selection::Ids(ids) => ids
            .iter()
            .map(|id| {
                dlq.get(id)
                    .ok_or_else(|| DlqError::NotFound(id.clone()).into())
            })
            .collect(),
    }
}
