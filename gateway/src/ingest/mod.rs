//! Ingest: MQTT messages in, decoded chunks onto the queue.
//!
//! [`Intake`] is the part every ingest mode shares: count the message, decode it, count each
//! rejection by reason, and push the accepted lines onto the bounded queue (waiting when full).

pub mod embedded;
pub mod external;
pub mod guard;
pub mod limit;
pub mod rejects;
pub mod tls;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::decode::{DecodeError, Decoder};
use crate::metrics::Metrics;
use crate::queue::{Chunk, QueueError, QueueTx};

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

/// Rejections logged per second at most; the counters keep the full count.
const LOG_BUDGET_PER_SEC: u32 = 20;

/// Where a chunk goes when the queue is full (`queue.when_full`).
pub enum Overflow {
    Block,
    Spill(Arc<crate::spill::Spill>),
    DropNewest,
}

pub struct Intake {
    decoder: Decoder,
    queue: QueueTx,
    metrics: Arc<Metrics>,
    rejects: Option<rejects::Rejects>,
    overflow: Overflow,
    limiter: Option<limit::RateLimiter>,
    log_window: Instant,
    logged: u32,
}

impl Intake {
    /// `rejects`, when given, keeps refused payloads in the dead-letter queue.
    pub fn new(
        decoder: Decoder,
        queue: QueueTx,
        metrics: Arc<Metrics>,
        rejects: Option<rejects::Rejects>,
        overflow: Overflow,
        limiter: Option<limit::RateLimiter>,
    ) -> Self {
        Self {
            decoder,
            queue,
            metrics,
            rejects,
            overflow,
            limiter,
            log_window: Instant::now(),
            logged: 0,
        }
    }

    /// Handles one message. `Err` only when the queue has closed (shutdown).
    ///
    /// `done`, in external mode, acknowledges the message to its broker: called once every
    /// reading of it is safe (at once when none was accepted).
    pub async fn accept(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        content_type: Option<&str>,
        done: Option<crate::ack::Done>,
    ) -> Result<(), QueueError> {
        let received = Instant::now();
        self.metrics.messages_received.inc();
        let Ok(topic) = std::str::from_utf8(topic) else {
            let e = DecodeError::BadTopic("topic is not UTF-8".into());
            self.rejected(&e, "<not UTF-8>", true);
            if let Some(done) = done {
                done();
            }
            return Ok(());
        };
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        // Line protocol is rarely more than twice the size of the payload it came from.
        let mut lines = Vec::with_capacity(payload.len().min(1 << 20) * 2);
        match self
            .decoder
            .decode(topic, payload, content_type, now_ns, &mut lines)
        {
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
                    let ack = done
                        .map(|d| crate::ack::Ack::new(outcome.accepted, self.metrics.clone(), d));
                    let chunk = Chunk {
                        lines,
                        readings: outcome.accepted,
                        received,
                        topic: topic.into(),
                        ack,
                    };
                    self.admit(chunk).await?;
                } else if let Some(done) = done {
                    done();
                }
            }
            Err(e) => {
                self.rejected(&e, topic, true);
                if let Some(done) = done {
                    done();
                }
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

    /// Applies the rate limit, then queues the chunk, or overflows it as `queue.when_full` says.
    async fn admit(&mut self, chunk: Chunk) -> Result<(), QueueError> {
        if let Some(limiter) = self.limiter.as_mut() {
            let device = self.decoder.device_of(&chunk.topic).unwrap_or("");
            if !limiter.admit(device, chunk.readings) {
                let topic = chunk.topic.clone();
                self.refuse(
                    "rate_limited",
                    chunk.readings,
                    &topic,
                    "the device is over limits.device_rate",
                );
                settle(&chunk);
                return Ok(());
            }
        }
        match &self.overflow {
            Overflow::Block => self.queue.push(chunk).await,
            Overflow::Spill(spill) => {
                // Behind anything already spilled, so that order is kept.
                if spill.is_active() {
                    spill_chunk(spill, chunk).await;
                    return Ok(());
                }
                match self.queue.try_push(chunk).await {
                    Err(QueueError::Full(chunk)) => {
                        spill_chunk(spill, chunk).await;
                        Ok(())
                    }
                    other => other,
                }
            }
            Overflow::DropNewest => match self.queue.try_push(chunk).await {
                Err(QueueError::Full(chunk)) => {
                    self.refuse(
                        "queue_full",
                        chunk.readings,
                        &chunk.topic,
                        "the queue is full (queue.when_full = \"drop_newest\")",
                    );
                    settle(&chunk);
                    Ok(())
                }
                other => other,
            },
        }
    }

    /// Refuses a decoded message whole for a reason of admission, not of its content.
    fn refuse(&mut self, reason: &'static str, readings: u32, topic: &str, why: &str) {
        self.metrics
            .readings_rejected
            .get_or_create(&crate::metrics::Reason { reason })
            .inc_by(u64::from(readings));
        self.metrics
            .messages_rejected
            .get_or_create(&crate::metrics::Reason { reason })
            .inc();
        if self.log_allowed() {
            let topic: String = topic.chars().take(128).collect();
            warn!(reason, %topic, readings, "refused: {why}");
        }
    }

    fn keep(
        &mut self,
        topic: &str,
        payload: &[u8],
        content_type: Option<&str>,
        reason: String,
        readings: u32,
    ) {
        if let Some(rejects) = self.rejects.as_mut() {
            let device = self.decoder.device_of(topic);
            rejects.keep(device, topic, payload, content_type, reason, readings);
        }
    }

    fn rejected(&mut self, e: &DecodeError, topic: &str, whole: bool) {
        self.metrics.reject(e.reason(), whole);
        if self.log_allowed() {
            let topic: String = topic.chars().take(128).collect();
            warn!(reason = e.reason(), %topic, whole_message = whole, "rejected: {e}");
        }
    }

    /// At most LOG_BUDGET_PER_SEC refusals are logged a second; the counters have them all.
    fn log_allowed(&mut self) -> bool {
        if self.log_window.elapsed().as_secs() >= 1 {
            if self.logged > LOG_BUDGET_PER_SEC {
                warn!(
                    suppressed = self.logged - LOG_BUDGET_PER_SEC,
                    "more refusals than logged; gateway_readings_rejected_total has them all"
                );
            }
            self.log_window = Instant::now();
            self.logged = 0;
        }
        self.logged += 1;
        self.logged <= LOG_BUDGET_PER_SEC
    }
}

/// A chunk refused with a reason is settled: its acknowledgement is due.
fn settle(chunk: &Chunk) {
    if let Some(ack) = &chunk.ack {
        ack.settle(chunk.readings);
    }
}

/// Spills a chunk; on disk it is safe, so its acknowledgement is due.
async fn spill_chunk(spill: &Arc<crate::spill::Spill>, mut chunk: Chunk) {
    let ack = chunk.ack.take();
    let readings = chunk.readings;
    spill.add(chunk).await;
    if let Some(ack) = ack {
        ack.settle(readings);
    }
}
