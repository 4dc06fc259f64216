//! Spill: when the queue is full, accepted chunks overflow to disk instead of making ingest
//! wait, and come back into the queue, in order, when there is room (`queue.when_full =
//! "spill"`, embedded mode's default: the embedded broker must be drained promptly, or it drops
//! the oldest part of its log).
//!
//! One disk log in the project: the spill buffer is the dead-letter queue's log
//! ([`crate::seglog`]) in its own directory, records of kind `spilled`, without the per-append
//! fsync (it survives a crash of the process, not of the machine; the in-memory queue survives
//! neither). Chunks gather in memory and go to disk as one record of up to [`RECORD_BYTES`], so
//! a burst of small messages costs one write per few thousand of them.
//!
//! Order: once anything is spilled, new chunks are spilled behind it until the spill is empty,
//! and the drainer moves records into the queue oldest first, so chunks enter the queue in the
//! order they were received.

// The chunk travels back with the error so that nothing is lost; this module goes away once
// the write-ahead log takes over its job.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::dlq::{self, Dlq, DlqError, Kind, Meta};
use crate::metrics::Metrics;
use crate::queue::{Chunk, QueueError, QueueTx};

/// Chunks gathered in memory before they go to disk as one record.
pub const RECORD_BYTES: usize = 4 << 20;

struct State {
    log: Dlq,
    /// Newest chunks, not yet on disk (behind everything on disk).
    buffer: Vec<Chunk>,
    buffer_bytes: usize,
}

pub struct Spill {
    state: Mutex<State>,
    /// Readings spilled and not yet back in the queue (disk, buffer, and in the drainer's
    /// hands): zero means ingest may use the queue directly again.
    readings: AtomicU64,
    metrics: Arc<Metrics>,
    wake: Notify,
}

impl Spill {
    /// Opens the spill directory; records left by a previous run are drained first.
    pub fn open(
        dir: &std::path::Path,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, DlqError> {
        let options = dlq::Options {
            what: "spill buffer",
            max_key: "queue.spill_max_bytes",
            sync: false,
            sync_deletes: false,
            ..dlq::options_for(max_bytes, (64 << 20).min(max_bytes))
        };
        let (log, recovery) = Dlq::open(dir, options, true)?;
        for damage in &recovery.damaged {
            error!(%damage, "spill buffer damage");
        }
        let inherited = log.stats().accepted_readings;
        if inherited > 0 {
            warn!(
                readings = inherited,
                "the spill buffer holds readings from a previous run; they go first"
            );
        }
        metrics.spill_inherited_readings.set(inherited as i64);
        let spill = Arc::new(Self {
            state: Mutex::new(State {
                log,
                buffer: Vec::new(),
                buffer_bytes: 0,
            }),
            readings: AtomicU64::new(inherited),
            metrics,
            wake: Notify::new(),
        });
        spill.refresh();
        Ok(spill)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change to the state completes before the lock is released or fails whole.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// True while anything spilled has not yet gone back into the queue.
    pub fn is_active(&self) -> bool {
        self.readings.load(Ordering::Acquire) > 0
    }

    /// Spills an accepted chunk behind everything spilled before it. Waits while the spill is
    /// at its size limit (push back: ingest stops reading the broker).
    pub async fn add(self: &Arc<Self>, chunk: Chunk) {
        let n = chunk.readings;
        self.readings.fetch_add(u64::from(n), Ordering::AcqRel);
        self.metrics.readings_accepted.inc_by(u64::from(n));
        self.metrics.spill_readings_total.inc_by(u64::from(n));
        let mut pending = Some(chunk);
        let mut warned = false;
        loop {
            let this = self.clone();
            let chunk = pending.take();
            let result = tokio::task::spawn_blocking(move || this.buffer_chunk(chunk)).await;
            match result {
                Ok(Ok(())) => break,
                Ok(Err((chunk, e))) => {
                    if !warned {
                        error!(error = %e, "the spill buffer is full or failing; ingest waits for the drainer");
                        warned = true;
                    }
                    pending = chunk;
                    self.wake.notify_one();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    error!(error = %e, "spill task failed");
                    break;
                }
            }
        }
        self.refresh();
        self.wake.notify_one();
    }

    /// Puts `chunk` in the buffer and, when the buffer is large, writes it as one record. On
    /// a failed write everything stays in memory (and the caller waits).
    #[allow(clippy::type_complexity)]
    fn buffer_chunk(&self, chunk: Option<Chunk>) -> Result<(), (Option<Chunk>, DlqError)> {
        let mut state = self.lock();
        if let Some(chunk) = chunk {
            // Each chunk's size counts once it is buffered; the cap is on disk bytes.
            state.buffer_bytes += chunk.lines.len();
            state.buffer.push(chunk);
        }
        if state.buffer_bytes < RECORD_BYTES {
            return Ok(());
        }
        let (meta, data) = record(&state.buffer);
        match state.log.append(&meta, &data) {
            Ok(_) => {
                state.buffer.clear();
                state.buffer_bytes = 0;
                Ok(())
            }
            // The chunks stay buffered; only a full disk keeps the buffer from shrinking.
            Err(e) if state.buffer_bytes < RECORD_BYTES * 2 => {
                warn!(error = %e, "spill write deferred");
                Ok(())
            }
            Err(e) => Err((None, e)),
        }
    }

    /// What the drainer takes next: the oldest record on disk, else the whole buffer.
    fn take(&self) -> Result<Option<Taken>, DlqError> {
        let mut state = self.lock();
        if let Some(entry) = state.log.entries().next() {
            let id = entry.id.clone();
            let (meta, data) = state.log.read(&id)?;
            let age = Duration::from_millis(
                u64::try_from(dlq::now_ms() - meta.first_failure_ms).unwrap_or(0),
            );
            let received = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            let topic: Arc<str> = meta.topics.first().map_or("", String::as_str).into();
            // Back in pieces of the size messages have, so that batches keep their size.
            let chunks = split_lines(data, DRAIN_CHUNK_LINES)
                .into_iter()
                .map(|(lines, readings)| Chunk {
                    lines,
                    readings,
                    received,
                    topic: topic.clone(),
                    // Acknowledged when they were spilled.
                    ack: None,
                })
                .collect();
            return Ok(Some((Some(id), chunks)));
        }
        if state.buffer.is_empty() {
            return Ok(None);
        }
        state.buffer_bytes = 0;
        Ok(Some((None, std::mem::take(&mut state.buffer).into())))
    }

    /// Writes the buffer (and `held`, older chunks taken from it) to disk, so that a restart
    /// drains them: called at shutdown.
    pub fn persist(&self, held: Vec<Chunk>) {
        let mut state = self.lock();
        let mut chunks = held;
        chunks.append(&mut state.buffer);
        state.buffer_bytes = 0;
        if chunks.is_empty() {
            return;
        }
        let (meta, data) = record(&chunks);
        // The buffer's chunks are newer than everything on disk, and `held` is older than the
        // buffer: appending them as one record keeps their order behind what is on disk, since
        // the drainer took `held` only after the disk was empty.
        if let Err(e) = state.log.append(&meta, &data) {
            error!(error = %e, readings = meta.readings, "cannot keep spilled readings at shutdown: they are lost");
        }
    }

    fn refresh(&self) {
        let state = self.lock();
        let buffered: usize = state.buffer_bytes;
        self.metrics
            .spill_bytes
            .set((state.log.stats().disk_bytes as usize + buffered) as i64);
        self.metrics
            .spill_readings
            .set(self.readings.load(Ordering::Acquire) as i64);
    }
}

/// Lines per chunk when a spilled record goes back into the queue.
const DRAIN_CHUNK_LINES: usize = 1000;

/// Cuts line protocol into pieces of at most `max` lines: (bytes, lines).
fn split_lines(data: Vec<u8>, max: usize) -> Vec<(Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut count = 0;
    for (i, b) in data.iter().enumerate() {
        if *b == b'\n' {
            count += 1;
            if count == max {
                out.push((data[start..=i].to_vec(), count as u32));
                start = i + 1;
                count = 0;
            }
        }
    }
    if start < data.len() {
        out.push((data[start..].to_vec(), count as u32));
    }
    out
}

/// Chunks the drainer holds, and the id of the disk record they came from (`None`: from the
/// in-memory buffer).
type Taken = (Option<String>, VecDeque<Chunk>);

/// One record for a run of chunks: their lines, readings, first topics and oldest receive time.
fn record(chunks: &[Chunk]) -> (Meta, Vec<u8>) {
    let mut data = Vec::with_capacity(chunks.iter().map(|c| c.lines.len()).sum());
    let mut topics: Vec<String> = Vec::new();
    let mut more_topics = 0u32;
    let mut readings = 0u32;
    let oldest = chunks
        .iter()
        .map(|c| c.received)
        .min()
        .unwrap_or_else(Instant::now);
    for c in chunks {
        data.extend_from_slice(&c.lines);
        readings += c.readings;
        if !topics.iter().any(|t| **t == *c.topic) {
            if topics.len() < dlq::MAX_TOPICS {
                topics.push(c.topic.to_string());
            } else {
                more_topics += 1;
            }
        }
    }
    let received_ms = dlq::now_ms() - oldest.elapsed().as_millis() as i64;
    let meta = Meta {
        kind: Kind::Accepted,
        reason: "queue full".into(),
        status: None,
        attempts: 0,
        first_failure_ms: received_ms,
        last_failure_ms: received_ms,
        topics,
        more_topics,
        readings,
        content_type: None,
    };
    (meta, data)
}

/// Moves spilled chunks back into the queue, oldest first, as room appears.
pub async fn drain(spill: Arc<Spill>, queue: QueueTx, stop: CancellationToken) {
    let mut drained_since_log = 0u64;
    loop {
        let next = {
            let s = spill.clone();
            match tokio::task::spawn_blocking(move || s.take()).await {
                Ok(Ok(next)) => next,
                Ok(Err(e)) => {
                    error!(error = %e, "cannot read the spill buffer; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "spill drainer failed");
                    return;
                }
            }
        };
        let Some((id, chunks)) = next else {
            if drained_since_log > 0 {
                info!(
                    readings = drained_since_log,
                    "the spill buffer is empty again"
                );
                drained_since_log = 0;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = spill.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            continue;
        };
        let mut chunks = chunks;
        while let Some(mut chunk) = chunks.pop_front() {
            let n = chunk.readings;
            loop {
                match queue.try_push_drained(chunk).await {
                    Ok(()) => break,
                    Err(QueueError::Full(back)) => chunk = back,
                    Err(QueueError::Closed(back)) => chunk = back,
                }
                if stop.is_cancelled() {
                    // Shutdown: what came from the buffer goes to disk; a disk record stays.
                    if id.is_none() {
                        chunks.push_front(chunk);
                        spill.persist(chunks.into());
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            spill.readings.fetch_sub(u64::from(n), Ordering::AcqRel);
            spill.metrics.spill_drained_readings.inc_by(u64::from(n));
            drained_since_log += u64::from(n);
        }
        if let Some(id) = id {
            let s = spill.clone();
            let deleted = tokio::task::spawn_blocking(move || s.lock().log.delete(&[id])).await;
            if !matches!(deleted, Ok(Ok(()))) {
                error!(
                    "cannot delete a drained spill record; it may be drained twice after a restart"
                );
            }
        }
        spill.refresh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_records_come_back_in_message_sized_pieces() {
        let data = b"a 1\nb 2\nc 3\nd 4\ne 5\n".to_vec();
        let pieces = split_lines(data, 2);
        let counts: Vec<u32> = pieces.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(pieces[2].0, b"e 5\n");
        assert!(split_lines(Vec::new(), 2).is_empty());
    }
}
