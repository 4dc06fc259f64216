//! The write-ahead log: accepted messages on disk before they are acknowledged
//! (`ingest.ack = "durable"`).
//!
//! ```text
//! ingest ──append──▶ pending group ──committer: one record, one fdatasync──▶ acknowledgements
//!                                        │
//!                    queue (a window) ◀──┴── whole records, while the queue has room;
//!                      │                     else the feeder reads them back from disk, in order
//!                      └──▶ batch ──▶ sink / DLQ ──▶ record released (tombstone; segment removed)
//! ```
//!
//! # Design constraints
//!
//! - An acknowledgement leaves only after the fdatasync that covers its message: a power cut
//!   loses nothing that was acknowledged. Messages appended while a sync runs wait for the next
//!   one, so a sync (a fraction of a millisecond) carries every message of the last
//!   `wal.commit_interval`: group commit.
//! - One durable buffer. The in-memory queue is a window onto the log: a committed record goes
//!   into the queue whole if there is room, and otherwise stays on disk, where the feeder picks
//!   it up (and every record after it) as room appears, so records enter the queue in the order
//!   they were committed. A full queue never holds up acknowledgements; a full log
//!   (`wal.max_bytes` of records not yet released) makes appends wait, which stops the guard
//!   reading from devices: push back, never a drop.
//! - A record is released once every reading in it is written or parked in the dead-letter
//!   queue; what was not released is replayed at the next start, before anything new. Lines
//!   carry their timestamps (a reading without `ts` has its receive time in the line), so a
//!   record replayed is the same points in the sink.
//! - Records are the segment log's ([`crate::seglog`]) with kind `accepted`; releases are its
//!   tombstones, not synced (a tombstone lost in a power cut only writes its record again).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ack::{Ack, Done, Verdict};
use crate::metrics::Metrics;
use crate::queue::{Chunk, QueueError, QueueTx};
use crate::seglog::{self, parse_id, Kind, LogError, Meta, SegLog};

/// First bytes of a write-ahead log segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"GWWAL001";

/// Lines per chunk when a record read back from disk goes into the queue.
const FEED_CHUNK_LINES: usize = 1000;

/// `[wal]`, resolved.
#[derive(Debug, Clone)]
pub struct WalConfig {
    pub dir: PathBuf,
    /// Bytes of line protocol in records not yet released, at most; appends wait beyond it.
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// At most one fdatasync per this long (a lone message after a quiet spell is synced at
    /// once).
    pub commit_interval: Duration,
    /// A group this large is synced without waiting for the interval.
    pub commit_bytes: usize,
}

impl WalConfig {
    /// The settings of `[wal]`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let w = &config.wal;
        Self {
            dir: w.dir.clone(),
            max_bytes: w.max_bytes.as_u64(),
            segment_bytes: w.segment_bytes.as_u64(),
            commit_interval: w.commit_interval,
            commit_bytes: w.commit_bytes.as_u64() as usize,
        }
    }
}

/// Messages appended since the last commit.
#[derive(Default)]
struct Pending {
    chunks: Vec<Chunk>,
    dones: Vec<Done>,
    bytes: usize,
}

/// Where the queue's window stands: `behind` is the first record the queue has not had, once
/// a record did not fit (or at start, when the log holds records of an earlier run).
/// `decided` is the last record the committer has synced and placed (in the queue or left on
/// disk): a record after it is in the log but not yet the feeder's, or it could enter the
/// queue twice, once from the feeder and once from its commit.
#[derive(Default)]
struct Window {
    behind: Option<(u64, u64)>,
    decided: Option<(u64, u64)>,
}

pub struct Wal {
    /// For the release callbacks of records, which outlive no log.
    me: Weak<Wal>,
    log: Mutex<SegLog>,
    pending: Mutex<Pending>,
    /// Wakes the committer: something to commit or to release.
    work: Condvar,
    /// A group is being committed (taken from `pending`, not yet acknowledged).
    committing: AtomicBool,
    /// Wakes `close`: a commit ended.
    committed: Condvar,
    window: Mutex<Window>,
    /// Wakes the feeder: the window fell behind.
    feed: Notify,
    /// Ids of records whose readings are all settled, waiting for their tombstone.
    released: Mutex<Vec<String>>,
    /// Released records whose tombstones the disk refused: tried again with the next round
    /// of releases (not at once, which would spin while the disk keeps refusing).
    unreleased: Mutex<Vec<String>>,
    /// Line bytes in records not yet released (and in the pending group).
    used: AtomicU64,
    /// Wakes appends waiting for room.
    room: Notify,
    /// Taken at `close`, so that the queue closes once ingest and the feeder are gone too.
    queue: Mutex<Option<QueueTx>>,
    metrics: Arc<Metrics>,
    config: WalConfig,
    /// No more appends; commit what is pending now.
    closing: AtomicBool,
    /// The committer has committed the last group and ends once releases are done.
    finishing: AtomicBool,
    failpoints: failpoints::Wal,
}

/// Sorted by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The log cannot be opened: fix wal.dir (permissions, space, another gateway on it).
    #[error("wal.dir: {0}")]
    Open(#[from] LogError),
    /// The committer thread could not start.
    #[error("cannot start the write-ahead log's committer: {0}")]
    Thread(std::io::Error),
}

/// Why an append was not taken; the message and its acknowledgement come back.
pub enum AppendError {
    /// The log is full and the caller asked not to wait (`queue.when_full = "drop_newest"`).
    Full(Chunk, Option<Done>),
    /// Shutdown: no more appends.
    Closed(Chunk, Option<Done>),
}

impl Wal {
    /// Opens the log (recovering what a crash left) and starts the committer thread, whose
    /// handle comes back to be joined after [`Self::finish`]. The caller runs [`Self::feed`],
    /// which first replays what an earlier run did not release.
    pub fn open(
        config: WalConfig,
        queue: QueueTx,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Self>, std::thread::JoinHandle<()>), WalError> {
        let options = seglog::Options {
            what: "write-ahead log",
            max_key: "wal.max_bytes",
            magic: SEGMENT_MAGIC,
            // The bound is on live bytes (`used`); the files may hold up to two segments
            // more, of records released but not yet removed with their segment.
            max_bytes: config
                .max_bytes
                .saturating_add(config.segment_bytes.saturating_mul(2)),
            segment_bytes: config.segment_bytes,
            sync: false,
            sync_deletes: false,
        };
        let (log, recovery) = SegLog::open(&config.dir, options, true)?;
        recovery.report("write-ahead log");
        let stats = log.stats();
        let live_bytes: u64 = log.entries().map(|e| e.data_len as u64).sum();
        let behind = log.entries().next().and_then(|e| parse_id(&e.id));
        // What an earlier run left is all the feeder's.
        let decided = log.entries().last().and_then(|e| parse_id(&e.id));
        if stats.accepted_readings > 0 {
            warn!(
                readings = stats.accepted_readings,
                records = stats.records,
                "the write-ahead log holds readings an earlier run did not finish; they go first"
            );
        }
        metrics
            .wal_inherited_readings
            .set(stats.accepted_readings as i64);
        metrics.wal_readings.set(stats.accepted_readings as i64);
        let wal = Arc::new_cyclic(|me| Self {
            me: me.clone(),
            log: Mutex::new(log),
            pending: Mutex::new(Pending::default()),
            work: Condvar::new(),
            committing: AtomicBool::new(false),
            committed: Condvar::new(),
            window: Mutex::new(Window { behind, decided }),
            feed: Notify::new(),
            released: Mutex::new(Vec::new()),
            unreleased: Mutex::new(Vec::new()),
            used: AtomicU64::new(live_bytes),
            room: Notify::new(),
            queue: Mutex::new(Some(queue)),
            metrics,
            config,
            closing: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            failpoints: failpoints::Wal::from_env(),
        });
        wal.refresh();
        let committer = {
            let wal = wal.clone();
            std::thread::Builder::new()
                .name("wal-committer".into())
                .spawn(move || wal.commit_loop())
                .map_err(WalError::Thread)?
        };
        Ok((wal, committer))
    }

    fn lock_log(&self) -> MutexGuard<'_, SegLog> {
        // The log's index changes only after its disk write succeeded: a panic mid-call
        // leaves it as it was.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_window(&self) -> MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an accepted message; `done` is called once it is on disk (or, should the log
    /// close first, never: the device sends it again). Waits while the log is full, unless
    /// `wait` is false.
    pub async fn append(
        &self,
        chunk: Chunk,
        done: Option<Done>,
        wait: bool,
    ) -> Result<(), AppendError> {
        let cost = chunk.lines.len() as u64;
        let mut waited = false;
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Err(AppendError::Closed(chunk, done));
            }
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.reserve(cost) {
                break;
            }
            if !wait {
                return Err(AppendError::Full(chunk, done));
            }
            if !waited {
                waited = true;
                self.metrics.wal_full.set(1);
                self.metrics.ingest_paused.inc();
            }
            notified.await;
        }
        let n = u64::from(chunk.readings);
        self.metrics.readings_accepted.inc_by(n);
        self.metrics.wal_readings.inc_by(n as i64);
        let mut p = self.lock_pending();
        let first = p.chunks.is_empty();
        p.bytes += chunk.lines.len();
        p.chunks.push(chunk);
        if let Some(done) = done {
            p.dones.push(done);
        }
        let full = p.bytes >= self.config.commit_bytes;
        drop(p);
        if first || full {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Takes room for `cost` bytes if there is some. A message larger than the whole log
    /// goes in when the log is empty, so that it is never refused for size alone.
    fn reserve(&self, cost: u64) -> bool {
        let max = self.config.max_bytes;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used + cost <= max).then_some(used + cost)
            })
            .is_ok()
    }

    /// No more appends: the committer syncs what is pending now and acknowledges it. Returns
    /// once it has.
    pub async fn close(self: &Arc<Self>) {
        self.closing.store(true, Ordering::Release);
        self.work.notify_one();
        self.room.notify_waiters();
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut p = this.lock_pending();
            while !p.chunks.is_empty() || this.committing.load(Ordering::Acquire) {
                p = this
                    .committed
                    .wait_timeout(p, Duration::from_millis(10))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        })
        .await;
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Ends the committer once it has written the tombstones of what is released by now.
    pub fn finish(&self) {
        self.finishing.store(true, Ordering::Release);
        self.work.notify_one();
    }

    /// Settles a record: its tombstone goes out with the committer's next round.
    fn release(&self, id: String) {
        self.released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id);
        self.work.notify_one();
    }

    fn commit_loop(self: Arc<Self>) {
        let interval = self.config.commit_interval;
        let mut last_commit: Option<Instant> = None;
        loop {
            let group = {
                let mut p = self.lock_pending();
                loop {
                    let now = Instant::now();
                    let closing = self.closing.load(Ordering::Acquire);
                    let next = last_commit.map(|t| t + interval);
                    if !p.chunks.is_empty()
                        && (closing
                            || p.bytes >= self.config.commit_bytes
                            || next.is_none_or(|t| now >= t))
                    {
                        self.committing.store(true, Ordering::Release);
                        break Some(std::mem::take(&mut *p));
                    }
                    if self.has_releases() {
                        break None;
                    }
                    if p.chunks.is_empty() && self.finishing.load(Ordering::Acquire) {
                        drop(p);
                        self.apply_releases();
                        return;
                    }
                    let wait = match next {
                        Some(t) if !p.chunks.is_empty() => t.saturating_duration_since(now),
                        _ => Duration::from_millis(100),
                    };
                    p = self
                        .work
                        .wait_timeout(p, wait)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
            };
            self.apply_releases();
            if let Some(group) = group {
                last_commit = Some(Instant::now());
                self.commit(group);
                self.committing.store(false, Ordering::Release);
                self.committed.notify_all();
            }
        }
    }

    fn has_releases(&self) -> bool {
        !self
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Writes the tombstones of released records and gives their room back.
    fn apply_releases(&self) {
        let mut ids = std::mem::take(&mut *self.released.lock().unwrap_or_else(|p| p.into_inner()));
        // At finish, also when nothing new is released.
        if ids.is_empty() && !self.finishing.load(Ordering::Acquire) {
            return;
        }
        ids.extend(std::mem::take(
            &mut *self.unreleased.lock().unwrap_or_else(|p| p.into_inner()),
        ));
        if ids.is_empty() {
            return;
        }
        // Each record's room is given back once, and one already gone does not keep the
        // others of this round (the log refuses a delete naming an unknown record).
        ids.sort_unstable();
        ids.dedup();
        let mut log = self.lock_log();
        let released = ids.len();
        ids.retain(|id| log.get(id).is_some());
        if ids.len() < released {
            // A record settled twice: its readings went into the queue twice.
            error!(
                records = released - ids.len(),
                "write-ahead log records released a second time"
            );
        }
        let freed: u64 = ids
            .iter()
            .filter_map(|id| log.get(id))
            .map(|e| e.data_len as u64)
            .sum();
        if let Err(e) = log.delete(&ids) {
            // The records stay live and keep their room; the feeder is past them, so they are
            // not read again in this run. A restart before a later try succeeds writes them
            // again (the same points, which the sink stores once).
            error!(error = %e, records = ids.len(), "cannot release write-ahead log records; trying again with the next ones");
            self.unreleased
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ids);
            return;
        }
        drop(log);
        self.used.fetch_sub(freed, Ordering::AcqRel);
        self.metrics.wal_full.set(0);
        self.room.notify_waiters();
        self.refresh();
    }

    /// Writes one group as one record, syncs it, then lets its messages go: into the queue
    /// (or left on disk for the feeder) and acknowledged.
    fn commit(&self, group: Pending) {
        let Pending {
            mut chunks, dones, ..
        } = group;
        let (meta, data) = record(&chunks);
        let readings = meta.readings;
        let mut dones = Some(dones);
        let started = Instant::now();
        let id = loop {
            match self.lock_log().append(&meta, &data) {
                Ok(id) => break id,
                Err(e) if self.finishing.load(Ordering::Acquire) => {
                    error!(error = %e, readings, "cannot write to the write-ahead log at shutdown; these messages were never acknowledged, and their devices send them again");
                    return;
                }
                Err(e) => {
                    // Nothing is acknowledged until the disk takes it: devices wait, and
                    // appends stop once the log's room is gone.
                    error!(error = %e, readings, "cannot write to the write-ahead log; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        self.failpoints.before_sync();
        if self.failpoints.ack_before_sync {
            // Test failpoint: the bug the power-cut test must catch.
            for done in dones.take().into_iter().flatten() {
                done(Verdict::Accepted);
            }
        }
        // The feeder leaves this record alone until it is placed (`Window::decided`): it is
        // in the log since the append, and a thread preempted before the sync gave the
        // feeder time to feed it whole before its commit put it in the queue again.
        let mut log = loop {
            let mut log = self.lock_log();
            if self.failpoints.power_cut_now() {
                // Test failpoint: a power cut at the moment of the sync. Whatever this
                // process sent before it (acknowledgements included) reaches its peer.
                std::thread::sleep(Duration::from_millis(500));
                log.discard_unsynced();
                error!("failpoint wal_power_cut: everything after the last sync is gone");
                std::process::abort();
            }
            match log.sync() {
                Ok(()) => break log,
                Err(e) => {
                    drop(log);
                    if self.finishing.load(Ordering::Acquire) {
                        // On disk or not, it was never acknowledged; the next start replays
                        // it if it is there.
                        error!(error = %e, readings, "cannot sync the write-ahead log at shutdown; these messages were never acknowledged");
                        return;
                    }
                    error!(error = %e, readings, "cannot sync the write-ahead log; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        };
        self.metrics
            .wal_sync_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.wal_syncs.inc();
        self.metrics.wal_bytes_written.inc_by(data.len() as u64);
        let ack = self.record_ack(&id, readings);
        for chunk in &mut chunks {
            chunk.ack = Some(ack.clone());
        }
        drop(ack);
        self.enter_window(&mut log, parse_id(&id), chunks, readings);
        self.set_gauges(&log);
        drop(log);
        for done in dones.into_iter().flatten() {
            done(Verdict::Accepted);
        }
    }

    /// Released once every reading of the record is settled.
    fn record_ack(&self, id: &str, readings: u32) -> Ack {
        let id = id.to_owned();
        let wal = self.me.clone();
        Ack::new(readings, move || {
            if let Some(wal) = wal.upgrade() {
                wal.release(id);
            }
        })
    }

    /// Puts a committed record into the queue, whole, if the window is not behind and there
    /// is room; otherwise the record waits on disk for the feeder.
    fn enter_window(
        &self,
        _log: &mut MutexGuard<'_, SegLog>,
        key: Option<(u64, u64)>,
        chunks: Vec<Chunk>,
        readings: u32,
    ) {
        let mut w = self.lock_window();
        w.decided = key;
        if w.behind.is_some() {
            // The feeder may be waiting for this record.
            drop(w);
            self.feed.notify_one();
            return;
        }
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some(queue) = queue.as_ref() else {
            // Closed: it stays on disk for the next start.
            return;
        };
        match queue.try_push_all(chunks) {
            Ok(()) => {
                self.metrics.wal_readings.dec_by(i64::from(readings));
            }
            Err(_) => {
                w.behind = key;
                drop(w);
                self.feed.notify_one();
            }
        }
    }

    /// Moves records the queue has not had into it, oldest first, as room appears: what an
    /// earlier run left, and what did not fit when it was committed. Runs until `stop`.
    pub async fn feed(self: Arc<Self>, queue: QueueTx, stop: CancellationToken) {
        let mut fed_since_log = 0u64;
        loop {
            let next = {
                // Locks in the committer's order: the log, then the window.
                let log = self.lock_log();
                let mut w = self.lock_window();
                match w.behind {
                    None => None,
                    Some(cursor) => match log.entries_from(cursor).next() {
                        None => {
                            w.behind = None;
                            None
                        }
                        // Appended, not yet synced and placed: the committer wakes the feeder
                        // once it is.
                        Some(e) if parse_id(&e.id) > w.decided => None,
                        Some(e) => Some(e.id.clone()),
                    },
                }
            };
            let Some(id) = next else {
                if fed_since_log > 0 && self.lock_window().behind.is_none() {
                    info!(
                        readings = fed_since_log,
                        "caught up: the queue holds everything the write-ahead log had waiting"
                    );
                    fed_since_log = 0;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = self.feed.notified() => {}
                }
                continue;
            };
            let read = {
                let this = self.clone();
                let id = id.clone();
                tokio::task::spawn_blocking(move || this.lock_log().read(&id)).await
            };
            let (meta, data) = match read {
                Ok(Ok(record)) => record,
                Ok(Err(e)) => {
                    // Damaged since it was written: recovery will report it at the next start.
                    error!(error = %e, %id, "cannot read a write-ahead log record back; skipping it");
                    self.skip(&id);
                    continue;
                }
                Err(e) => {
                    error!(error = %e, "write-ahead log feeder failed");
                    return;
                }
            };
            let ack = self.record_ack(&id, meta.readings);
            let received = instant_of(meta.first_failure_ms);
            let topic: Arc<str> = meta.topics.first().map_or("", String::as_str).into();
            let mut pieces: VecDeque<Chunk> = split_lines(data, FEED_CHUNK_LINES)
                .into_iter()
                .map(|(lines, readings)| Chunk {
                    lines,
                    readings,
                    received,
                    topic: topic.clone(),
                    ack: Some(ack.clone()),
                })
                .collect();
            drop(ack);
            while let Some(chunk) = pieces.pop_front() {
                let n = chunk.readings;
                let pushed = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = queue.push_drained(chunk) => r,
                };
                match pushed {
                    Ok(()) => {
                        self.metrics.wal_readings.dec_by(i64::from(n));
                        self.metrics.wal_fed_readings.inc_by(u64::from(n));
                        fed_since_log += u64::from(n);
                    }
                    // The queue is gone (shutdown): the record stays for the next start.
                    Err(QueueError::Closed(_) | QueueError::Full(_)) => return,
                }
            }
            self.skip(&id);
            self.refresh();
        }
    }

    /// Moves the window past record `id`.
    fn skip(&self, id: &str) {
        if let Some((seq, offset)) = parse_id(id) {
            let mut w = self.lock_window();
            if w.behind.is_some() {
                w.behind = Some((seq, offset + 1));
            }
        }
    }

    fn refresh(&self) {
        self.set_gauges(&self.lock_log());
    }

    /// Runs with every commit and release: cheap counts only, never a walk over the records.
    fn set_gauges(&self, log: &SegLog) {
        self.metrics.wal_bytes.set(log.disk_bytes() as i64);
        self.metrics.wal_records.set(log.len() as i64);
    }
}

/// A monotonic instant for a wall-clock time in the past (for the lag of replayed readings).
fn instant_of(unix_ms: i64) -> Instant {
    let age = Duration::from_millis(u64::try_from(seglog::now_ms() - unix_ms).unwrap_or(0));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// Cuts line protocol into pieces of at most `max` lines: (bytes, lines).
fn split_lines(mut data: Vec<u8>, max: usize) -> Vec<(Vec<u8>, u32)> {
    // Where each piece starts, and how many lines it has.
    let mut cuts = vec![(0usize, 0u32)];
    for end in memchr::memchr_iter(b'\n', &data) {
        let last = cuts.len() - 1;
        cuts[last].1 += 1;
        if cuts[last].1 as usize == max && end + 1 < data.len() {
            cuts.push((end + 1, 0));
        }
    }
    if data.is_empty() {
        return Vec::new();
    }
    // Split from the back so that each piece is copied once and the first is `data` itself,
    // shrunk so that the queue's byte count stays what the pieces hold.
    let mut pieces: Vec<(Vec<u8>, u32)> = cuts
        .iter()
        .skip(1)
        .rev()
        .map(|&(at, lines)| (data.split_off(at), lines))
        .collect();
    data.shrink_to_fit();
    pieces.push((data, cuts[0].1));
    pieces.reverse();
    pieces
}

/// One record for a group of messages: their lines, readings, first topics and receive times.
fn record(chunks: &[Chunk]) -> (Meta, Vec<u8>) {
    let mut data = Vec::with_capacity(chunks.iter().map(|c| c.lines.len()).sum());
    let mut topics: Vec<String> = Vec::new();
    let mut more_topics = 0u32;
    let mut readings = 0u32;
    for c in chunks {
        data.extend_from_slice(&c.lines);
        readings += c.readings;
        if !topics.iter().any(|t| **t == *c.topic) {
            if topics.len() < seglog::MAX_TOPICS {
                topics.push(c.topic.to_string());
            } else {
                more_topics += 1;
            }
        }
    }
    let now = Instant::now();
    let ms = |at: Option<Instant>| {
        seglog::now_ms() - at.map_or(0, |t| now.duration_since(t).as_millis() as i64)
    };
    let meta = Meta {
        kind: Kind::Accepted,
        reason: String::new(),
        status: None,
        attempts: 0,
        // The receive times of the oldest and newest message.
        first_failure_ms: ms(chunks.iter().map(|c| c.received).min()),
        last_failure_ms: ms(chunks.iter().map(|c| c.received).max()),
        topics,
        more_topics,
        readings,
        content_type: None,
    };
    (meta, data)
}

mod failpoints {
    /// Test failpoints (raft-engine style), from `FAILPOINTS` in builds with the
    /// `failpoints` feature; inert otherwise.
    #[derive(Default)]
    pub struct Wal {
        /// `wal_power_cut=N`: at the N-th sync, drop what was written since the last one and
        /// abort, as a power cut would.
        power_cut_at: Option<u64>,
        syncs: std::sync::atomic::AtomicU64,
        /// `wal_ack_before_sync`: acknowledge a group before its sync (a deliberate bug).
        pub ack_before_sync: bool,
        /// Unit tests: the committer stops this many microseconds between a record's append
        /// and its sync, as a thread preempted there on a loaded machine would.
        #[cfg(test)]
        pub stall_before_sync_us: std::sync::atomic::AtomicU64,
    }

    impl Wal {
        #[cfg(feature = "failpoints")]
        pub fn from_env() -> Self {
            let spec = std::env::var("FAILPOINTS").unwrap_or_default();
            let mut fp = Self::default();
            for item in spec.split(',').map(str::trim) {
                match item.split_once('=') {
                    Some(("wal_power_cut", n)) => fp.power_cut_at = n.parse().ok(),
                    _ if item == "wal_ack_before_sync" => fp.ack_before_sync = true,
                    _ => {}
                }
            }
            if !spec.is_empty() {
                tracing::warn!(%spec, "test failpoints armed");
            }
            fp
        }

        #[cfg(not(feature = "failpoints"))]
        pub fn from_env() -> Self {
            Self::default()
        }

        pub fn before_sync(&self) {
            #[cfg(test)]
            {
                let us = self
                    .stall_before_sync_us
                    .load(std::sync::atomic::Ordering::Relaxed);
                if us > 0 {
                    std::thread::sleep(std::time::Duration::from_micros(us));
                }
            }
        }

        pub fn power_cut_now(&self) -> bool {
            let n = self
                .syncs
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            self.power_cut_at == Some(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{bounded, QueueRx};
    use std::sync::atomic::AtomicU32;

    fn config(dir: &std::path::Path, max_bytes: u64) -> WalConfig {
        WalConfig {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: 64 * 1024,
            commit_interval: Duration::from_millis(2),
            commit_bytes: 1 << 20,
        }
    }

    fn chunk(i: u32) -> Chunk {
        Chunk {
            lines: format!("m,device=d v={i} {i}\n").into_bytes(),
            readings: 1,
            received: Instant::now(),
            topic: "telemetry/d/m".into(),
            ack: None,
        }
    }

    struct Running {
        wal: Arc<Wal>,
        committer: std::thread::JoinHandle<()>,
        feeder: tokio::task::JoinHandle<()>,
        rx: QueueRx,
        stop: CancellationToken,
        metrics: Arc<Metrics>,
        acked: Arc<AtomicU32>,
    }

    fn start(dir: &std::path::Path, max_bytes: u64, queue_readings: usize) -> Running {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = bounded(queue_readings, 1 << 20, metrics.clone());
        let (wal, committer) =
            Wal::open(config(dir, max_bytes), tx.clone(), metrics.clone()).expect("open");
        let stop = CancellationToken::new();
        let feeder = tokio::spawn(wal.clone().feed(tx, stop.clone()));
        Running {
            wal,
            committer,
            feeder,
            rx,
            stop,
            metrics,
            acked: Arc::new(AtomicU32::new(0)),
        }
    }

    impl Running {
        async fn append(&self, i: u32) {
            let acked = self.acked.clone();
            let done: Done = Box::new(move |v| {
                assert_eq!(v, Verdict::Accepted);
                acked.fetch_add(1, Ordering::SeqCst);
            });
            assert!(self.wal.append(chunk(i), Some(done), true).await.is_ok());
        }

        async fn wait_acked(&self, n: u32) {
            for _ in 0..500 {
                if self.acked.load(Ordering::SeqCst) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("{} of {n} acknowledged", self.acked.load(Ordering::SeqCst));
        }

        /// Takes `n` readings from the queue, settling each, and returns their lines.
        async fn take(&mut self, n: u32, settle: bool) -> String {
            let mut lines = String::new();
            let mut got = 0;
            while got < n {
                let c = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                    .await
                    .expect("a chunk in time")
                    .expect("open");
                got += c.readings;
                lines.push_str(std::str::from_utf8(&c.lines).expect("utf-8"));
                if settle {
                    c.ack.as_ref().expect("a record's ack").settle(c.readings);
                }
                self.metrics
                    .readings_in_flight
                    .dec_by(i64::from(c.readings));
            }
            lines
        }

        async fn stop(self) -> Arc<Metrics> {
            self.stop.cancel();
            // The feeder holds the log (and its lock) until it has seen the stop.
            self.feeder.await.expect("feeder");
            self.wal.close().await;
            self.wal.finish();
            drop(self.wal);
            self.committer.join().expect("committer");
            self.metrics
        }
    }

    fn expected(range: std::ops::Range<u32>) -> String {
        range.map(|i| format!("m,device=d v={i} {i}\n")).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_after_the_sync_and_released_once_written() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut r = start(dir.path(), 1 << 20, 1000);
        for i in 0..100 {
            r.append(i).await;
        }
        r.wait_acked(100).await;
        assert!(r.metrics.wal_syncs.get() >= 1);
        assert!(
            r.metrics.wal_syncs.get() < 100,
            "messages appended together share a sync"
        );
        assert_eq!(r.take(100, true).await, expected(0..100));
        // Releases are applied by the committer; wait for the gauge.
        for _ in 0..200 {
            if r.metrics.wal_records.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(r.metrics.wal_records.get(), 0, "every record released");
        let m = r.stop().await;
        assert_eq!(m.wal_readings.get(), 0);
        let options = seglog::Options {
            magic: SEGMENT_MAGIC,
            ..crate::dlq::options_for(1 << 30, 1 << 20)
        };
        let (log, recovery) = SegLog::open(dir.path(), options, false).expect("open");
        assert!(recovery.damaged.is_empty(), "{recovery:?}");
        assert_eq!(log.entries().count(), 0, "nothing to replay");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_was_not_released_is_replayed_first_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut r = start(dir.path(), 1 << 20, 1000);
        for i in 0..50 {
            r.append(i).await;
        }
        r.wait_acked(50).await;
        // The first 20 are written; the rest were in memory when the process went away.
        let first = r.take(20, true).await;
        assert_eq!(first, expected(0..20));
        let _ = r.take(30, false).await;
        r.stop().await;

        let mut r = start(dir.path(), 1 << 20, 1000);
        let inherited = r.metrics.wal_inherited_readings.get();
        assert!(
            (30..=50).contains(&inherited),
            "at least the 30 unwritten readings come back: {inherited}"
        );
        r.append(50).await;
        let replayed = r.take(inherited as u32 + 1, true).await;
        assert!(
            replayed.ends_with(&expected(20..51)),
            "the unwritten readings in order, then the new one: {replayed}"
        );
        r.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_leaves_records_on_disk_and_they_come_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        // The queue holds 5 readings: most records wait on disk, acknowledged all the same.
        let mut r = start(dir.path(), 1 << 20, 5);
        for i in 0..200 {
            r.append(i).await;
        }
        r.wait_acked(200).await;
        assert_eq!(r.take(200, true).await, expected(0..200));
        let m = r.stop().await;
        assert!(m.wal_fed_readings.get() > 0, "some came from disk");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_log_makes_appends_wait_until_records_are_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let line = chunk(0).lines.len() as u64;
        let mut r = start(dir.path(), line * 10, 1000);
        for i in 0..10 {
            r.append(i).await;
        }
        let wal = r.wal.clone();
        let blocked = tokio::spawn(async move { wal.append(chunk(10), None, true).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!blocked.is_finished(), "the log is full: the append waits");
        assert_eq!(r.metrics.wal_full.get(), 1);
        assert!(matches!(
            r.wal.append(chunk(11), None, false).await,
            Err(AppendError::Full(..))
        ));
        let _ = r.take(10, true).await;
        assert!(blocked.await.expect("joined"), "room again once released");
        let _ = r.take(1, true).await;
        r.stop().await;
    }

    /// The disk refuses a release's tombstones: the records stay on disk and keep their room,
    /// nothing enters the queue again, and the next round of releases takes them along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_release_is_tried_again_and_nothing_is_read_twice() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut r = start(dir.path(), 1 << 20, 1000);
        for i in 0..10 {
            r.append(i).await;
        }
        r.wait_acked(10).await;
        let records = r.metrics.wal_records.get();
        assert!(records > 0);
        // Every delete fails until every record has been refused (the releases may come in
        // more than one round).
        r.wal.lock_log().fail_next_deletes(u64::MAX);
        assert_eq!(r.take(10, true).await, expected(0..10));
        let refused = || r.wal.unreleased.lock().map_or(0, |u| u.len()) as i64;
        for _ in 0..200 {
            if refused() == records {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(refused(), records, "every release refused");
        r.wal.lock_log().fail_next_deletes(0);
        assert_eq!(r.metrics.wal_records.get(), records, "still on disk");
        let used = r.wal.used.load(Ordering::Acquire);
        assert!(used > 0, "their room is not given back");
        r.append(10).await;
        r.wait_acked(11).await;
        // Only the new reading comes: the refused records are not fed again.
        assert_eq!(r.take(1, true).await, expected(10..11));
        for _ in 0..200 {
            if r.metrics.wal_records.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            r.metrics.wal_records.get(),
            0,
            "released with the next round"
        );
        assert_eq!(r.wal.used.load(Ordering::Acquire), 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), r.rx.recv())
                .await
                .is_err(),
            "nothing more in the queue"
        );
        r.stop().await;
    }

    /// The feeder and the committer race for a record that is appended but not yet synced:
    /// the feeder must leave it to the committer's decision, or the record enters the queue
    /// twice (its readings written twice, the log's room given back twice).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_record_enters_the_queue_once_while_the_window_moves() {
        let dir = tempfile::tempdir().expect("tmp");
        let total = 3000u32;
        // A queue of 3 readings: the window falls behind and catches up all the time.
        let mut r = start(dir.path(), 1 << 20, 3);
        r.wal
            .failpoints
            .stall_before_sync_us
            .store(1000, Ordering::Relaxed);
        let wal = r.wal.clone();
        let producer = tokio::spawn(async move {
            for i in 0..total {
                assert!(wal.append(chunk(i), None, true).await.is_ok());
                if i % 10 == 0 {
                    // Groups of about ten messages, one commit each.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        });
        let mut seen = vec![0u32; total as usize];
        let mut got = 0;
        while got < total {
            let c = tokio::time::timeout(Duration::from_secs(10), r.rx.recv())
                .await
                .expect("a chunk in time")
                .expect("open");
            for line in std::str::from_utf8(&c.lines).expect("utf-8").lines() {
                let i: usize = line
                    .rsplit(' ')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .expect("ts");
                seen[i] += 1;
            }
            got += c.readings;
            c.ack.as_ref().expect("a record's ack").settle(c.readings);
            r.metrics.readings_in_flight.dec_by(i64::from(c.readings));
            // A consumer a little slower than the appends, unlike `take`: without it the
            // window seldom falls behind, and this test passes with the race left in.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        producer.await.expect("producer");
        let twice: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] != 1).collect();
        assert!(
            twice.is_empty(),
            "readings not seen exactly once: {twice:?}"
        );
        for _ in 0..400 {
            if r.wal.used.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(r.wal.used.load(Ordering::Acquire), 0, "all room given back");
        let m = r.stop().await;
        assert_eq!(m.wal_readings.get(), 0);
    }

    #[test]
    fn records_come_back_in_message_sized_pieces() {
        let data = b"a 1\nb 2\nc 3\nd 4\ne 5\n".to_vec();
        let pieces = split_lines(data, 2);
        let counts: Vec<u32> = pieces.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, vec![2, 2, 1]);
        assert_eq!(pieces[2].0, b"e 5\n");
        assert!(split_lines(Vec::new(), 2).is_empty());
        let whole: Vec<u8> = pieces.into_iter().flat_map(|(lines, _)| lines).collect();
        assert_eq!(whole, b"a 1\nb 2\nc 3\nd 4\ne 5\n");
        let pieces = split_lines(b"a 1\nb 2\nc".to_vec(), 2);
        assert_eq!(
            pieces,
            vec![(b"a 1\nb 2\n".to_vec(), 2), (b"c".to_vec(), 0)]
        );
        let pieces = split_lines(b"a 1\nb 2\n".to_vec(), 5);
        assert_eq!(pieces, vec![(b"a 1\nb 2\n".to_vec(), 2)]);
    }
}
