//! Ingest: MQTT messages in, decoded chunks into the write-ahead log or onto the queue.
//!
//! [`Intake`] is the part every ingest mode shares: count the message, decode it, count each
//! rejection by reason, take the accepted lines in as `ingest.ack` says (the write-ahead log,
//! or the bounded queue), waiting when there is no room, and acknowledge the message when it
//! is safe.

pub mod embedded;
pub mod external;
pub mod guard;
pub mod limit;
pub mod rejects;
pub mod tls;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use crate::events::LogBudget;
use crate::events::{ReadingsRejected, Rejection};
use tokio::sync::OwnedSemaphorePermit;

use crate::ack::{Done, Verdict};
use crate::decode::{DecodeError, Decoder, Limits, TopicPattern};
use crate::metrics::Metrics;
use crate::queue::{Chunk, QueueError, QueueTx};
use crate::wal::{AppendError, Wal};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A listener address cannot be bound: change mqtt.listen / mqtt.listen_v5.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The embedded broker would not start or link; the message says why.
    #[error("embedded broker: {0}")]
    Broker(String),
    /// The TLS settings cannot be used: the message names the key.
    #[error("TLS: {0}")]
    Tls(String),
    /// The device credentials file cannot be used: the message names the file and line.
    #[error("auth.credentials_file: {0}")]
    Credentials(String),
    /// mqtt.url is not mqtt://host[:port].
    #[error("mqtt.url {0:?} must look like mqtt://host:1883")]
    Url(String),
}

/// What a message's acknowledgement waits for.
pub enum Safe {
    /// The write-ahead log's sync.
    Durable(Arc<Wal>),
    /// The sink's answer, or the dead-letter queue.
    Written,
    /// Nothing: acknowledged once queued.
    Received,
}

/// Shared by every connection (embedded mode) or the one intake task (external mode).
pub struct Intake {
    limits: Limits,
    pattern: TopicPattern,
    /// Decoders own scratch space; one per task decoding at a time, kept for reuse.
    decoders: Mutex<Vec<Decoder>>,
    queue: QueueTx,
    safe: Safe,
    /// Wait for room (`block`), or refuse (`drop_newest`).
    wait: bool,
    metrics: Arc<Metrics>,
    rejects: Option<Mutex<rejects::Rejects>>,
    limiter: Option<Mutex<limit::RateLimiter>>,
    log_budget: LogBudget,
}

impl Intake {
    /// `rejects`, when given, keeps refused payloads in the dead-letter queue.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        limits: Limits,
        pattern: TopicPattern,
        queue: QueueTx,
        safe: Safe,
        wait: bool,
        metrics: Arc<Metrics>,
        rejects: Option<rejects::Rejects>,
        limiter: Option<limit::RateLimiter>,
    ) -> Self {
        Self {
            limits,
            pattern,
            decoders: Mutex::new(Vec::new()),
            queue,
            safe,
            wait,
            metrics,
            rejects: rejects.map(Mutex::new),
            limiter: limiter.map(Mutex::new),
            log_budget: LogBudget::default(),
        }
    }

    /// Whether `topic` is the gateway's to decode: it fits the pattern's levels, or starts with
    /// the pattern's first literal level (so that a malformed telemetry topic is refused with
    /// a reason instead of going elsewhere).
    pub fn is_telemetry(&self, topic: &str) -> bool {
        self.pattern.claims(topic)
    }

    /// Handles one message. `Err` only when the pipeline has closed (shutdown): the message
    /// was not taken, and `done` is dropped unanswered.
    ///
    /// The future may be dropped at any await (it waits only for room): the message is then
    /// not taken, nothing of it is counted as accepted, and `done` is dropped unanswered.
    ///
    /// `done`, when given, acknowledges the message: called once it is safe as `ingest.ack`
    /// says, or at once when it was refused whole.
    pub async fn accept(
        &self,
        topic: &[u8],
        payload: &[u8],
        content_type: Option<&str>,
        done: Option<Done>,
    ) -> Result<(), QueueError> {
        let received = Instant::now();
        self.metrics.messages_received.inc();
        let Ok(topic) = std::str::from_utf8(topic) else {
            let e = DecodeError::BadTopic("topic is not UTF-8".into());
            self.rejected(&e, "<not UTF-8>", true);
            answer(done, Verdict::Refused(e.reason()));
            return Ok(());
        };
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        // Line protocol is rarely more than twice the size of the payload it came from.
        let mut lines = Vec::with_capacity(payload.len().min(1 << 20) * 2);
        let decoded = {
            let mut decoder = self.decoder();
            let decoded = decoder.decode(topic, payload, content_type, now_ns, &mut lines);
            self.lock(&self.decoders).push(decoder);
            decoded
        };
        match decoded {
            Ok(outcome) => {
                for e in &outcome.rejected {
                    self.rejected(e, topic, false);
                }
                if !outcome.rejected.is_empty() {
                    let reasons: Vec<String> = outcome
                        .rejected
                        .iter()
                        .take(8)
                        .map(|e| format!("{}: {e}", e.reason()))
                        .collect();
                    let n = outcome.rejected.len() as u32;
                    self.keep(topic, payload, content_type, reasons.join("; "), n);
                }
                if outcome.accepted > 0 {
                    // The queue counts line bytes against queue.max_bytes: a reservation far
                    // beyond them would be memory the bound does not see.
                    if lines.capacity() > lines.len() + lines.len() / 2 {
                        lines.shrink_to_fit();
                    }
                    let chunk = Chunk {
                        lines,
                        readings: outcome.accepted,
                        received,
                        topic: topic.into(),
                        ack: None,
                    };
                    return self.admit(chunk, done).await;
                }
                let reason = outcome
                    .rejected
                    .first()
                    .map_or(Rejection::EmptyPayload, DecodeError::reason);
                answer(done, Verdict::Refused(reason));
            }
            Err(e) => {
                self.rejected(&e, topic, true);
                answer(done, Verdict::Refused(e.reason()));
                self.keep(
                    topic,
                    payload,
                    content_type,
                    format!("{}: {e}", e.reason()),
                    1,
                );
            }
        }
        Ok(())
    }

    fn decoder(&self) -> Decoder {
        self.lock(&self.decoders)
            .pop()
            .unwrap_or_else(|| Decoder::new(self.limits.clone(), self.pattern.clone()))
    }

    fn lock<'a, T>(&self, m: &'a Mutex<T>) -> MutexGuard<'a, T> {
        // Each guarded value is consistent between calls; a panic cannot leave it half-changed.
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the rate limit, then takes the chunk in as `ingest.ack` says, waiting for room
    /// or refusing it as `queue.when_full` says.
    async fn admit(&self, mut chunk: Chunk, done: Option<Done>) -> Result<(), QueueError> {
        if let Some(limiter) = &self.limiter {
            let device = self.pattern.device_of(&chunk.topic).unwrap_or("");
            let admitted = self.lock(limiter).admit(device, chunk.readings);
            if !admitted {
                self.refuse(
                    Rejection::RateLimited,
                    chunk.readings,
                    &chunk.topic,
                    "the device is over limits.device_rate",
                );
                answer(done, Verdict::Refused(Rejection::RateLimited));
                return Ok(());
            }
        }
        let (readings, topic) = (chunk.readings, chunk.topic.clone());
        let refused = match &self.safe {
            Safe::Durable(wal) => match wal.append(chunk, done, self.wait).await {
                Ok(()) => return Ok(()),
                Err(AppendError::Full(_, done)) => done,
                Err(AppendError::Closed(chunk, _)) => return Err(QueueError::Closed(chunk)),
            },
            Safe::Written => {
                // Shared with the chunk's acknowledgement, and taken back if the chunk is refused.
                let done = done.map(|d| Arc::new(Mutex::new(Some(d))));
                if let Some(done) = &done {
                    let done = done.clone();
                    chunk.ack = Some(crate::ack::Ack::new(readings, move || {
                        answer(take(&done), Verdict::Accepted);
                    }));
                }
                match self.enqueue(chunk).await {
                    Ok(()) => return Ok(()),
                    Err(QueueError::Full(_)) => done.and_then(|d| take(&d)),
                    Err(closed) => return Err(closed),
                }
            }
            Safe::Received => match self.enqueue(chunk).await {
                Ok(()) => {
                    answer(done, Verdict::Accepted);
                    return Ok(());
                }
                Err(QueueError::Full(_)) => done,
                Err(closed) => return Err(closed),
            },
        };
        self.refuse(
            Rejection::QueueFull,
            readings,
            &topic,
            "no room (queue.when_full = \"drop_newest\")",
        );
        answer(refused, Verdict::Refused(Rejection::QueueFull));
        Ok(())
    }

    async fn enqueue(&self, chunk: Chunk) -> Result<(), QueueError> {
        if self.wait {
            self.queue.push(chunk).await
        } else {
            self.queue.try_push(chunk).await
        }
    }

    /// Refuses a decoded message whole for a reason of admission, not of its content.
    fn refuse(&self, reason: Rejection, readings: u32, topic: &str, why: &str) {
        ReadingsRejected {
            reason,
            readings,
            whole: true,
            topic,
            why,
        }
        .emit(&self.metrics, &self.log_budget);
    }

    fn keep(
        &self,
        topic: &str,
        payload: &[u8],
        content_type: Option<&str>,
        reason: String,
        readings: u32,
    ) {
        if let Some(rejects) = &self.rejects {
            let device = self.pattern.device_of(topic);
            self.lock(rejects)
                .keep(device, topic, payload, content_type, reason, readings);
        }
    }

    fn rejected(&self, e: &DecodeError, topic: &str, whole: bool) {
        ReadingsRejected {
            reason: e.reason(),
            readings: 1,
            whole,
            topic,
            why: &e.to_string(),
        }
        .emit(&self.metrics, &self.log_budget);
    }
}

/// A message's place in its connection's window of messages not yet acknowledged, from its
/// receipt until its acknowledgement is on the wire (or the message is given up, and sent
/// again by its sender): counted in `gateway_unacked_messages` meanwhile.
pub struct Unacked {
    _slot: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Unacked {
    pub fn new(slot: OwnedSemaphorePermit, metrics: Arc<Metrics>) -> Self {
        metrics.unacked_messages.inc();
        Self {
            _slot: slot,
            metrics,
        }
    }
}

impl Drop for Unacked {
    fn drop(&mut self) {
        self.metrics.unacked_messages.dec();
    }
}

fn take(done: &Mutex<Option<Done>>) -> Option<Done> {
    done.lock().unwrap_or_else(|p| p.into_inner()).take()
}

fn answer(done: Option<Done>, verdict: Verdict) {
    if let Some(done) = done {
        done(verdict);
    }
}
