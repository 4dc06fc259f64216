//! The segment log: records appended to numbered segment files, each checked by its own
//! length and CRC, deleted by tombstones, recovered after a crash. Two stores share it: the
//! dead-letter queue ([`crate::dlq`]) and the write-ahead log ([`crate::wal`]). [`format`]
//! documents the files; [`log::SegLog`] reads and writes them.

pub mod format;
pub mod log;

use serde::{Deserialize, Serialize};

pub use log::{parse_id, Entry, Options, Recovery, SegLog, Stats};

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
    /// Not a dead letter: accepted lines in the write-ahead log (`wal.dir`), waiting to be
    /// written. Old spill buffers called them `spilled`.
    #[serde(alias = "spilled")]
    Accepted,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RetriesExhausted => "retries_exhausted",
            Kind::RejectedBySink => "rejected_by_sink",
            Kind::RefusedBySink => "refused_by_sink",
            Kind::RejectedInput => "rejected_input",
            Kind::Accepted => "accepted",
        }
    }

    pub const ALL: [Kind; 5] = [
        Kind::RetriesExhausted,
        Kind::RejectedBySink,
        Kind::RefusedBySink,
        Kind::RejectedInput,
        Kind::Accepted,
    ];

    /// Whether the record holds readings the gateway accepted (and so counts in the ledger).
    pub fn accepted(self) -> bool {
        self != Kind::RejectedInput
    }
}

/// A record's metadata (docs/contract.md §3); the data travels beside it.
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
    /// Readings in `data`; for rejected input, the readings refused (1 for a payload refused
    /// whole, whose readings could not be counted).
    pub readings: u32,
    /// The MQTT 5 content type a rejected payload came with, so a replay decodes it the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Topics named in one record; a batch from thousands of devices lists the first ones.
pub const MAX_TOPICS: usize = 64;

/// Sorted by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log has reached its size limit: hold the data and push back upstream.
    #[error("the {what} is full ({used} of {max} bytes, {key})")]
    Full {
        what: &'static str,
        key: &'static str,
        used: u64,
        max: u64,
    },
    /// Another process writes this log (a running gateway holds its lock).
    #[error("{dir}: another process holds the lock (is the gateway running? stop it first, or let it redrive by itself)")]
    Locked { dir: String },
    /// No record with this id.
    #[error("no record {0}")]
    NotFound(String),
    /// A record or file is damaged beyond the torn tail recovery cuts.
    #[error("record {id} is damaged: {detail}")]
    Corrupt { id: String, detail: String },
    /// The disk said no: check space and permissions of the directory.
    #[error("I/O on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The task doing the disk work panicked (a bug, not the disk): its message is in the
    /// log; the operation did not complete.
    #[error("the task working on the {what} panicked: {detail}")]
    Panicked { what: &'static str, detail: String },
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
