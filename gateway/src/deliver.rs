//! Delivery of batches: write, retry what is worth retrying, bisect what the sink rejects, and
//! park in the dead-letter queue what cannot be written — accounting for every reading.
//!
//! ```text
//! batch ─▶ write (retries: backoff + jitter, Retry-After) ─ok─▶ written
//!            │
//!            ├─ 400 / 422 / 413, several lines ─▶ split in halves, each half again
//!            ├─ 400 / 422 / 413, one line ──────▶ park: rejected_by_sink
//!            ├─ 401 / 403 / 404 ──────────▶ park: refused_by_sink (log loudly)
//!            └─ retries exhausted ────────▶ park: retries_exhausted, sink marked down:
//!                                            later batches park at once, redrive probes
//! ```
//!
//! Splitting re-sends lines InfluxDB may already have written (a 400 can be a partial write);
//! the same series and timestamp written twice is one point, so that is harmless.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{error, info, warn};

use crate::batch::Batch;
use crate::dlq::{self, DlqError, Kind, Meta, SharedDlq};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::retry::Backoff;
use crate::sink::{SinkError, Write};

/// Whether the sink is considered down, and since when; logged on changes only.
#[derive(Default)]
struct Health {
    down: AtomicBool,
    since: Mutex<Option<Instant>>,
}

/// How a deliverer treats failures.
#[derive(Debug, Clone)]
pub struct Policy {
    pub backoff: Backoff,
    pub max_attempts: u32,
    pub gzip: bool,
    pub when_dlq_full: WhenDlqFull,
    pub while_sink_down: WhileSinkDown,
    pub live_retries: LiveRetries,
}

/// What happens to lines the dead-letter queue cannot take (full, or the disk fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenDlqFull {
    /// Hold them and keep trying: the running gateway pushes back.
    Hold,
    /// Give up on them at once: a replay leaves the record where it was.
    GiveUp,
}

/// What live batches do while the sink is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhileSinkDown {
    /// Park without a write and leave probing to the redrive task.
    Park,
    /// Write as usual: with redrive off, live batches are the only probes.
    Write,
}

/// How long a live batch is retried while the sink is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveRetries {
    /// `sink.max_attempts`, then it is parked.
    MaxAttempts,
    /// For as long as it takes (external mode: the broker keeps the unacknowledged messages
    /// and holds the rest). Shutdown still stops the retries.
    Forever,
}

impl Policy {
    pub fn new(
        sink: &crate::config::SinkConfig,
        when_dlq_full: WhenDlqFull,
        while_sink_down: WhileSinkDown,
    ) -> Self {
        Self {
            backoff: Backoff {
                initial: sink.retry_initial,
                max: sink.retry_max,
            },
            max_attempts: sink.max_attempts,
            gzip: sink.gzip,
            when_dlq_full,
            while_sink_down,
            live_retries: LiveRetries::MaxAttempts,
        }
    }
}

pub struct Deliverer {
    sink: Arc<dyn Write>,
    metrics: Arc<Metrics>,
    dlq: Arc<SharedDlq>,
    policy: Policy,
    health: Health,
    /// Cleared by shutdown when its timeout has passed: retries and waits for DLQ room stop,
    /// and what is left is reported as not written.
    retrying: AtomicBool,
}

/// Where the lines of one batch ended up.
#[derive(Debug, Default, Clone, Copy)]
struct Placed {
    /// The sink turned out to be unreachable.
    down: bool,
    written: u32,
    parked: u32,
    /// Neither written nor parked: the DLQ could not take them and holding was not allowed
    /// (or shutdown ended the wait). They are still in flight.
    abandoned: u32,
}

/// What parking did with a batch.
enum Parked {
    Stored,
    /// While waiting for room, the sink took the batch after all.
    Written,
    Abandoned,
}

/// How a write ended, with the attempts it took.
struct Failure {
    error: SinkError,
    attempts: u32,
    first_failure_ms: i64,
}

/// What replaying a record did.
#[derive(Debug, PartialEq, Eq)]
pub enum Replayed {
    /// All its readings are in the sink.
    Written(u32),
    /// The sink rejected some lines: the rest were written, those parked as new records.
    Split { written: u32, parked: u32 },
    /// Nothing was written (the sink is unreachable or refuses); the record stays as it was.
    Left(String),
}

/// What redriving a record found out about the sink.
#[derive(Debug, PartialEq, Eq)]
pub enum Redrive {
    /// The record is gone from the queue: written, or re-parked under its new kind.
    Done,
    /// The sink is still unreachable; the record was put back.
    SinkDown,
}

impl Deliverer {
    pub fn new(
        sink: Arc<dyn Write>,
        metrics: Arc<Metrics>,
        dlq: Arc<SharedDlq>,
        policy: Policy,
    ) -> Self {
        Self {
            sink,
            metrics,
            dlq,
            policy,
            health: Health::default(),
            retrying: AtomicBool::new(true),
        }
    }

    pub fn stop_retrying(&self) {
        self.retrying.store(false, Ordering::Relaxed);
    }

    fn retrying(&self) -> bool {
        self.retrying.load(Ordering::Relaxed)
    }

    pub fn sink_down(&self) -> bool {
        self.health.down.load(Ordering::Relaxed)
    }

    /// Delivers a batch from the queue (its readings are in flight).
    pub async fn deliver(&self, batch: Batch) {
        self.metrics
            .batch_readings
            .observe(f64::from(batch.readings));
        self.place(batch, self.policy.max_attempts, true, None)
            .await;
    }

    /// Writes one `retries_exhausted` record again: a single attempt per part, so that a sink
    /// that is still down costs one request. Everything ends written or parked again.
    pub async fn redrive(&self, id: String, readings: u32) -> Result<Redrive, DlqError> {
        if !self.dlq.begin_redrive(&id, readings) {
            // Retention is deleting it right now.
            return Ok(Redrive::Done);
        }
        let (meta, data) = match self.dlq.read(id.clone()).await {
            Ok(record) => record,
            Err(e) => {
                self.metrics.readings_in_flight.dec_by(i64::from(readings));
                self.dlq.end_redrive(&id, readings);
                return Err(e);
            }
        };
        let topic: Arc<str> = meta.topics.first().map_or("", String::as_str).into();
        let placed = self
            .place(Batch::from_lines(data, topic), 1, false, Some(&meta))
            .await;
        self.metrics
            .dlq_redriven_readings
            .inc_by(u64::from(placed.written));
        if placed.abandoned > 0 {
            // Only at shutdown: keep the record (parts of it may be written or parked twice,
            // which the sink's deduplication absorbs) rather than lose the rest.
            self.metrics
                .readings_in_flight
                .dec_by(i64::from(placed.abandoned));
            self.dlq.end_redrive(&id, readings);
            warn!(%id, "redrive interrupted; the record stays in the dead-letter queue");
            return Ok(Redrive::SinkDown);
        }
        self.dlq.drained(id, readings).await;
        Ok(if placed.down {
            Redrive::SinkDown
        } else {
            Redrive::Done
        })
    }

    /// Writes a record again for an operator (`gateway dlq replay`): the whole record with the
    /// usual retries; if the sink rejects some of its lines, the good ones are written and the
    /// bad ones parked anew. The caller deletes the record unless it was [`Replayed::Left`].
    pub async fn replay(&self, lines: Vec<u8>, meta: &Meta) -> Replayed {
        let topic: Arc<str> = meta.topics.first().map_or("", String::as_str).into();
        let batch = Batch::from_lines(lines, topic);
        let readings = batch.readings;
        self.metrics.readings_in_flight.inc_by(i64::from(readings));
        match self
            .write_with_retries(&batch, self.policy.max_attempts)
            .await
        {
            Ok(()) => {
                self.written(&batch, false);
                Replayed::Written(readings)
            }
            Err(f)
                if matches!(
                    f.error,
                    SinkError::Rejected { .. } | SinkError::TooLarge { .. }
                ) && readings > 1 =>
            {
                let placed = self
                    .place(batch, self.policy.max_attempts, false, Some(meta))
                    .await;
                if placed.abandoned > 0 {
                    self.metrics
                        .readings_in_flight
                        .dec_by(i64::from(placed.abandoned));
                    return Replayed::Left(format!(
                        "{} readings could be neither written nor parked again (is the dead-letter queue full?)",
                        placed.abandoned
                    ));
                }
                Replayed::Split {
                    written: placed.written,
                    parked: placed.parked,
                }
            }
            Err(f) => {
                self.metrics.readings_in_flight.dec_by(i64::from(readings));
                Replayed::Left(f.error.to_string())
            }
        }
    }

    /// Writes, splits and parks until every line of `batch` is written or parked (or, when
    /// parking is not possible, abandoned and still in flight).
    async fn place(
        &self,
        batch: Batch,
        attempts: u32,
        live: bool,
        previous: Option<&Meta>,
    ) -> Placed {
        let mut pending = vec![batch];
        let mut placed = Placed::default();
        while let Some(batch) = pending.pop() {
            let (kind, status, reason, attempts_made, first_failure_ms) = if placed.down
                || (live && self.policy.while_sink_down == WhileSinkDown::Park && self.sink_down())
            {
                // Probing is the redrive task's job: do not spend a timeout per batch.
                let reason =
                    "sink unreachable; parked without a write while it is down".to_string();
                (Kind::RetriesExhausted, None, reason, 0, dlq::now_ms())
            } else {
                let attempts = if live && self.policy.live_retries == LiveRetries::Forever {
                    u32::MAX
                } else {
                    attempts
                };
                let f = match self.write_with_retries(&batch, attempts).await {
                    Ok(()) => {
                        self.written(&batch, live);
                        placed.written += batch.readings;
                        continue;
                    }
                    Err(f) => f,
                };
                let (kind, status, reason) = match f.error {
                    SinkError::Rejected { .. } | SinkError::TooLarge { .. }
                        if batch.readings > 1 =>
                    {
                        let half = batch.readings / 2;
                        let (a, b) = batch.split_at_line(half);
                        pending.push(b);
                        pending.push(a);
                        continue;
                    }
                    SinkError::Rejected { status, body } => (
                        Kind::RejectedBySink,
                        Some(status),
                        format!("{status}: {body}"),
                    ),
                    SinkError::TooLarge { body } => {
                        (Kind::RejectedBySink, Some(413), format!("413: {body}"))
                    }
                    SinkError::Refused { status, body } => {
                        error!(
                            status,
                            %body,
                            "the sink refuses the gateway's writes: check sink.url, the token or credentials, and the bucket or database; parking the batch"
                        );
                        (
                            Kind::RefusedBySink,
                            Some(status),
                            format!("{status}: {body}"),
                        )
                    }
                    SinkError::Retryable { status, detail, .. } => {
                        self.mark_down(&detail);
                        placed.down = true;
                        let reason = match status {
                            Some(s) => format!("{s}: {detail}"),
                            None => detail,
                        };
                        (Kind::RetriesExhausted, status, reason)
                    }
                };
                (kind, status, reason, f.attempts, f.first_failure_ms)
            };
            let readings = batch.readings;
            match self
                .park(
                    batch,
                    kind,
                    reason,
                    status,
                    attempts_made,
                    first_failure_ms,
                    previous,
                )
                .await
            {
                Parked::Stored => placed.parked += readings,
                Parked::Written => placed.written += readings,
                Parked::Abandoned => placed.abandoned += readings,
            }
        }
        placed
    }

    async fn write_with_retries(&self, batch: &Batch, max_attempts: u32) -> Result<(), Failure> {
        let body = self.encode(&batch.body);
        let mut attempt = 0;
        let mut first_failure_ms = None;
        loop {
            attempt += 1;
            if attempt > 1 {
                self.metrics.sink_retries.inc();
            }
            let started = Instant::now();
            let result = self.sink.write(body.clone()).await;
            self.metrics
                .sink_request_duration
                .observe(started.elapsed().as_secs_f64());
            let outcome = match &result {
                Ok(()) => "ok",
                Err(e) => e.outcome(),
            };
            self.metrics
                .sink_requests
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            let error = match result {
                Ok(()) => {
                    self.mark_up();
                    return Ok(());
                }
                Err(e) => e,
            };
            let first = *first_failure_ms.get_or_insert_with(dlq::now_ms);
            match error {
                SinkError::Retryable {
                    retry_after,
                    status,
                    detail,
                } if attempt < max_attempts && self.retrying() => {
                    if attempt == self.policy.max_attempts {
                        // Still retrying (external mode): say once that the sink is down.
                        self.mark_down(&detail);
                    }
                    let wait = self.policy.backoff.delay(attempt, retry_after);
                    warn!(attempt, ?status, %detail, wait_ms = wait.as_millis() as u64, "write failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                error => {
                    // A 400, 422 or 413 is the sink answering about the data: it is reachable.
                    let reachable = matches!(
                        error,
                        SinkError::Rejected { .. } | SinkError::TooLarge { .. }
                    );
                    self.metrics.sink_up.set(i64::from(reachable));
                    return Err(Failure {
                        error,
                        attempts: attempt,
                        first_failure_ms: first,
                    });
                }
            }
        }
    }

    /// Parks lines in the dead-letter queue. When the queue is full or the disk fails, holds
    /// them and keeps trying (writing to the sink again first): the writer stays busy, the
    /// batcher and then ingest wait — push back, never a silent drop.
    #[allow(clippy::too_many_arguments)]
    async fn park(
        &self,
        batch: Batch,
        kind: Kind,
        reason: String,
        status: Option<u16>,
        attempts: u32,
        first_failure_ms: i64,
        previous: Option<&Meta>,
    ) -> Parked {
        // A record written again keeps the topics it was parked with (lines do not carry them).
        let (topics, more_topics) = match previous {
            Some(m) => (m.topics.clone(), m.more_topics),
            None => batch.topics(dlq::MAX_TOPICS),
        };
        let meta = Meta {
            kind,
            reason,
            status,
            attempts: attempts + previous.map_or(0, |m| m.attempts),
            first_failure_ms: previous.map_or(first_failure_ms, |m| {
                m.first_failure_ms.min(first_failure_ms)
            }),
            last_failure_ms: dlq::now_ms(),
            topics,
            more_topics,
            readings: batch.readings,
            content_type: None,
        };
        let mut held_since: Option<Instant> = None;
        loop {
            match self.dlq.append(meta.clone(), batch.body.clone()).await {
                Ok(id) => {
                    if held_since.is_some() {
                        self.metrics.dlq_full.set(0);
                        info!("the dead-letter queue takes records again");
                    }
                    warn!(id, kind = kind.as_str(), readings = batch.readings, reason = %meta.reason, "parked in the dead-letter queue");
                    self.metrics
                        .readings_in_flight
                        .dec_by(i64::from(batch.readings));
                    // Durable on disk: safe to acknowledge.
                    for origin in &batch.origins {
                        origin.settle();
                    }
                    return Parked::Stored;
                }
                Err(e) if self.policy.when_dlq_full == WhenDlqFull::GiveUp => {
                    error!(error = %e, readings = batch.readings, "cannot park these lines again");
                    return Parked::Abandoned;
                }
                Err(e) => {
                    if held_since.is_none() {
                        error!(error = %e, readings = batch.readings, "cannot park: holding the batch and pushing back until there is room");
                        self.metrics.dlq_full.set(1);
                    }
                    let since = *held_since.get_or_insert_with(Instant::now);
                    if !self.retrying() {
                        error!(readings = batch.readings, held_for = ?since.elapsed(), "shutting down with a batch neither written nor parked");
                        return Parked::Abandoned;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    // The sink may be back: a write frees the batch as well as room would.
                    if kind == Kind::RetriesExhausted
                        && self.sink.write(self.encode(&batch.body)).await.is_ok()
                    {
                        self.mark_up();
                        self.metrics.dlq_full.set(0);
                        self.written(&batch, previous.is_none());
                        return Parked::Written;
                    }
                }
            }
        }
    }

    fn mark_down(&self, detail: &str) {
        self.metrics.sink_up.set(0);
        if !self.health.down.swap(true, Ordering::Relaxed) {
            *self.health.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            error!(%detail, "the sink is down: batches go to the dead-letter queue and are written again once it answers");
        }
    }

    fn mark_up(&self) {
        self.metrics.sink_up.set(1);
        if self.health.down.swap(false, Ordering::Relaxed) {
            let since = self
                .health
                .since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            info!(down_for = ?since.map(|s| s.elapsed()), "the sink is back");
        }
    }

    fn encode(&self, lines: &[u8]) -> Bytes {
        if !self.policy.gzip {
            return Bytes::copy_from_slice(lines);
        }
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(
            Vec::with_capacity(lines.len() / 4),
            flate2::Compression::fast(),
        );
        // Invariant: gzip into a Vec<u8> cannot fail (its writes are infallible), and an empty
        // body here would lose the batch silently, so this is not papered over.
        #[allow(clippy::expect_used)]
        {
            encoder
                .write_all(lines)
                .expect("gzip into a Vec cannot fail");
            Bytes::from(encoder.finish().expect("gzip into a Vec cannot fail"))
        }
    }

    /// Counts a written batch; `observe_lag` for live batches (a redriven record's receive
    /// times are not kept, and its lag would read as zero).
    fn written(&self, batch: &Batch, observe_lag: bool) {
        let now = Instant::now();
        for origin in &batch.origins {
            if observe_lag {
                let lag = now.duration_since(origin.received).as_secs_f64();
                self.metrics.end_to_end_lag.observe(lag);
                self.metrics.lag_window.observe(lag);
            }
            origin.settle();
        }
        self.metrics
            .readings_in_flight
            .dec_by(i64::from(batch.readings));
        self.metrics
            .sink_readings_written
            .inc_by(u64::from(batch.readings));
    }
}

/// Delivery in-process against a scripted sink: retry classes, Retry-After, bisection,
/// parking by kind, sink-down detection and redrive, in milliseconds.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sink::fake::{self, Scripted};

    pub(crate) struct Rig {
        pub deliverer: Arc<Deliverer>,
        pub sink: Arc<Scripted>,
        pub dlq: Arc<SharedDlq>,
        pub metrics: Arc<Metrics>,
        _dir: tempfile::TempDir,
    }

    /// A deliverer over `sink` with three attempts and millisecond backoff.
    pub(crate) fn rig(sink: Scripted) -> Rig {
        let dir = tempfile::tempdir().expect("tmp");
        let (queue, _) =
            dlq::Dlq::open(dir.path(), dlq::options_for(1 << 20, 1 << 16), true).expect("dlq");
        let metrics = Arc::new(Metrics::new());
        let dlq = SharedDlq::new(queue, metrics.clone());
        let policy = Policy {
            backoff: crate::retry::Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(10),
            },
            max_attempts: 3,
            gzip: false,
            when_dlq_full: WhenDlqFull::GiveUp,
            while_sink_down: WhileSinkDown::Park,
            live_retries: LiveRetries::MaxAttempts,
        };
        let sink = Arc::new(sink);
        Rig {
            deliverer: Arc::new(Deliverer::new(
                sink.clone(),
                metrics.clone(),
                dlq.clone(),
                policy,
            )),
            sink,
            dlq,
            metrics,
            _dir: dir,
        }
    }

    pub(crate) fn lines(n: u32, tag: &str) -> Vec<String> {
        (0..n).map(|i| format!("m,d={tag} v={i} {i}")).collect()
    }

    fn batch(lines: &[String]) -> Batch {
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        Batch::from_lines(body.into_bytes(), "telemetry/d/m".into())
    }

    impl Rig {
        pub(crate) async fn deliver(&self, lines: &[String]) {
            self.metrics.readings_in_flight.inc_by(lines.len() as i64);
            self.deliverer.deliver(batch(lines)).await;
        }

        pub(crate) fn parked(&self, kind: Kind) -> Vec<(String, u32)> {
            self.dlq.oldest(kind, 1000)
        }

        fn requests(&self, outcome: &'static str) -> u64 {
            self.metrics
                .sink_requests
                .get_or_create(&OutcomeLabel { outcome })
                .get()
        }
    }

    #[tokio::test]
    async fn unavailable_and_unreachable_are_retried_then_written() {
        let r = rig(Scripted::new(vec![
            Err(fake::unavailable(None)),
            Err(fake::unreachable()),
        ]));
        let l = lines(2, "a");
        r.deliver(&l).await;
        assert_eq!(r.sink.written(), l);
        assert_eq!(
            (
                r.requests("server_error"),
                r.requests("unreachable"),
                r.requests("ok")
            ),
            (1, 1, 1)
        );
        assert_eq!(r.metrics.sink_retries.get(), 2);
        assert_eq!(r.metrics.sink_readings_written.get(), 2);
        assert_eq!(r.metrics.readings_in_flight.get(), 0);
        assert_eq!(r.metrics.sink_up.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_for_even_above_the_backoff() {
        let r = rig(Scripted::new(vec![Err(fake::unavailable(Some(
            Duration::from_secs(30),
        )))]));
        let started = tokio::time::Instant::now();
        r.deliver(&lines(1, "a")).await;
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert_eq!(r.sink.written().len(), 1);
    }

    #[tokio::test]
    async fn a_rejected_batch_is_bisected_and_only_the_bad_line_parked() {
        let r = rig(Scripted::with_rule(vec![], |body| {
            if body.contains("bad") {
                Err(SinkError::from_status(
                    400,
                    "field type conflict".into(),
                    None,
                ))
            } else {
                Ok(())
            }
        }));
        let mut l = lines(8, "a");
        l[5] = "m,d=a v=\"bad\" 5".to_owned();
        r.deliver(&l).await;
        let good: Vec<String> = l.iter().filter(|x| !x.contains("bad")).cloned().collect();
        assert_eq!(r.sink.written(), good, "every good line, in order");
        let parked = r.parked(Kind::RejectedBySink);
        assert_eq!(parked.len(), 1);
        let (meta, data) = r.dlq.read(parked[0].0.clone()).await.expect("read");
        assert_eq!(data, format!("{}\n", l[5]).into_bytes());
        assert_eq!((meta.status, meta.readings), (Some(400), 1));
        assert_eq!(r.metrics.sink_up.get(), 1, "a 400 is the sink answering");
        assert_eq!(r.metrics.readings_in_flight.get(), 0);
    }

    #[tokio::test]
    async fn too_large_is_split_until_it_fits() {
        let r = rig(Scripted::with_rule(vec![], |body| {
            if body.lines().count() > 2 {
                Err(SinkError::from_status(413, "too large".into(), None))
            } else {
                Ok(())
            }
        }));
        let l = lines(7, "a");
        r.deliver(&l).await;
        assert_eq!(r.sink.written(), l);
        assert!(r.sink.bodies().iter().all(|b| b.lines().count() <= 2));
        assert!(r.parked(Kind::RejectedBySink).is_empty());
    }

    #[tokio::test]
    async fn a_refusal_is_parked_at_once_as_refused_by_sink() {
        let r = rig(Scripted::with_rule(vec![], |_| {
            Err(SinkError::from_status(401, "unauthorized".into(), None))
        }));
        r.deliver(&lines(4, "a")).await;
        assert_eq!(r.sink.requests(), 1, "not retried");
        let parked: Vec<u32> = r
            .parked(Kind::RefusedBySink)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(parked, [4]);
        assert_eq!(r.metrics.sink_up.get(), 0);
    }

    #[tokio::test]
    async fn exhausted_retries_park_and_mark_the_sink_down_so_later_batches_park_without_a_write() {
        let r = rig(Scripted::with_rule(vec![], |_| Err(fake::unreachable())));
        r.deliver(&lines(3, "a")).await;
        assert_eq!(r.sink.requests(), 3, "max_attempts");
        assert!(r.deliverer.sink_down());
        assert_eq!(r.metrics.sink_up.get(), 0);
        r.deliver(&lines(2, "b")).await;
        assert_eq!(r.sink.requests(), 3, "parked without a write while down");
        let parked: Vec<u32> = r
            .parked(Kind::RetriesExhausted)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(parked, [3, 2]);
        assert_eq!(r.metrics.readings_in_flight.get(), 0);
    }

    #[tokio::test]
    async fn redrive_writes_a_record_again_and_deletes_it_or_puts_it_back_while_down() {
        let r = rig(Scripted::new(vec![
            Err(fake::unreachable()),
            Err(fake::unreachable()),
            Err(fake::unreachable()),
            // The first redrive: still down.
            Err(fake::unreachable()),
        ]));
        let l = lines(3, "a");
        r.deliver(&l).await;
        let (id, readings) = r.parked(Kind::RetriesExhausted)[0].clone();
        let down = r
            .deliverer
            .redrive(id.clone(), readings)
            .await
            .expect("redrive");
        assert_eq!(down, Redrive::SinkDown);
        // Parked again, as a record of its own.
        let again = r.parked(Kind::RetriesExhausted);
        assert_eq!(again.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [3]);
        let (id, readings) = again[0].clone();
        let done = r.deliverer.redrive(id, readings).await.expect("redrive");
        assert_eq!(done, Redrive::Done);
        assert!(r.parked(Kind::RetriesExhausted).is_empty());
        assert_eq!(r.sink.written(), l);
        assert_eq!(r.metrics.dlq_redriven_readings.get(), 3);
        assert!(!r.deliverer.sink_down());
        assert_eq!(r.metrics.readings_in_flight.get(), 0);
    }
}
