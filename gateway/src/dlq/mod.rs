//! Dead-letter queue: what could not be written, kept on disk for an operator to list, inspect,
//! replay or purge (CONTRACT §3). [`format`] documents the files; [`log::Dlq`] reads and writes
//! them; [`replay`] sends records back to the sink.

pub mod format;
pub mod log;
pub mod replay;
pub mod shared;

use serde::{Deserialize, Serialize};

pub use log::{Dlq, Entry, Options, Recovery, Stats};
pub use shared::SharedDlq;

/// Why a record is in the queue, and so what happens to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The sink could not be reached (or kept failing) for the whole retry budget. The running
    /// gateway writes these again by itself once the sink is healthy.
    RetriesExhausted,
    /// The sink said these points are bad (400, or 413 for a single line). They wait for an
    /// operator: resending unchanged lines cannot succeed.
    RejectedBySink,
    /// The sink refused the request itself (401, 403, 404): the gateway's configuration is
    /// wrong. They wait for an operator to fix it and replay.
    RefusedBySink,
    /// A payload the gateway could not decode, kept with its topic and the reason.
    RejectedInput,
    /// Not a dead letter: accepted lines waiting on disk for room in the queue. Only the spill
    /// buffer (`queue.spill_dir`) holds these; it shares this log's format and code.
    Spilled,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RetriesExhausted => "retries_exhausted",
            Kind::RejectedBySink => "rejected_by_sink",
            Kind::RefusedBySink => "refused_by_sink",
            Kind::RejectedInput => "rejected_input",
            Kind::Spilled => "spilled",
        }
    }

    pub const ALL: [Kind; 5] = [
        Kind::RetriesExhausted,
        Kind::RejectedBySink,
        Kind::RefusedBySink,
        Kind::RejectedInput,
        Kind::Spilled,
    ];

    /// Whether the record holds readings the gateway accepted (and so counts in the ledger).
    pub fn accepted(self) -> bool {
        self != Kind::RejectedInput
    }
}

/// A record's metadata (CONTRACT §3); the data travels beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub kind: Kind,
    /// The sink's status and body, or the decode error.
    pub reason: String,
    /// HTTP status of the last answer, when there was one.
    pub status: Option<u16>,
    pub attempts: u32,
    /// Unix milliseconds.
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
    /// Distinct source topics, at most [`MAX_TOPICS`] of them.
    pub topics: Vec<String>,
    /// Topics beyond the first [`MAX_TOPICS`].
    #[serde(default)]
    pub more_topics: u32,
    /// Readings in `data` (for rejected input: 1 per payload, whose readings were unreadable).
    pub readings: u32,
    /// The MQTT 5 content type a rejected payload came with, so a replay decodes it the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Topics named in one record; a batch from thousands of devices lists the first ones.
pub const MAX_TOPICS: usize = 64;

/// Sorted by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The queue has reached `dlq.max_bytes`: hold the data and push back upstream.
    #[error("dead-letter queue is full ({used} of {max} bytes, dlq.max_bytes)")]
    Full { used: u64, max: u64 },
    /// Another process writes this queue (a running gateway holds its lock).
    #[error("{dir}: another process holds the dead-letter queue's lock (is the gateway running? stop it first, or let it redrive by itself)")]
    Locked { dir: String },
    /// No record with this id.
    #[error("no dead-letter record {0}")]
    NotFound(String),
    /// A record or file is damaged beyond the torn tail recovery cuts.
    #[error("dead-letter record {id} is damaged: {detail}")]
    Corrupt { id: String, detail: String },
    /// The disk said no: check space and permissions of dlq.dir.
    #[error("dead-letter queue I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// The dead-letter queue's options from `[dlq]`: every append fsynced.
pub fn options(config: &crate::config::DlqConfig) -> Options {
    Options {
        max_bytes: config.max_bytes.as_u64(),
        segment_bytes: config.segment_bytes.as_u64(),
        sync: true,
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
