//! Dead-letter queue: what could not be written, kept on disk for an operator to list, inspect,
//! replay or purge (docs/contract.md §3). Its files are a [`crate::seglog`]; [`shared`] is how the running
//! gateway uses them; [`crate::replay`] holds the operator's commands on them.

pub mod shared;

pub use crate::seglog::{
    now_ms, Entry, Kind, LogError as DlqError, Meta, Options, Recovery, SegLog as Dlq, Stats,
    MAX_TOPICS,
};
pub use shared::SharedDlq;

/// First bytes of a dead-letter segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"GWDLQ001";

/// The dead-letter queue's options from `[dlq]`.
pub fn options(config: &crate::config::DlqConfig) -> Options {
    options_for(config.max_bytes.as_u64(), config.segment_bytes.as_u64())
}

/// Every append and every delete fsynced: parking is the failure path, rare enough to pay an
/// fsync per record, and a deleted record must not come back.
pub fn options_for(max_bytes: u64, segment_bytes: u64) -> Options {
    Options {
        what: "dead-letter queue",
        max_key: "dlq.max_bytes",
        magic: SEGMENT_MAGIC,
        max_bytes,
        segment_bytes,
        sync: true,
        sync_deletes: true,
    }
}
