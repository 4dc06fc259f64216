//! The bounded queue between decoding and the sink writers, counted in readings and bytes.
//!
//! When it is full, [`QueueTx::push`] waits: ingest stops until the writers make room. Nothing
//! is dropped here. With the write-ahead log the queue is a window onto it: records that find
//! no room wait on disk ([`crate::wal`]) rather than in memory.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Semaphore};

use crate::metrics::Metrics;

/// The lines decoded from one MQTT message.
#[derive(Debug)]
pub struct Chunk {
    /// Line protocol, one line per reading, each ending in `\n`.
    pub lines: Vec<u8>,
    pub readings: u32,
    /// When the gateway took the message from the broker: the start of end-to-end lag.
    pub received: Instant,
    /// The message's topic, for dead-letter records.
    pub topic: Arc<str>,
    /// External mode: the broker's acknowledgement, due when these readings are safe.
    pub ack: Option<crate::ack::Ack>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No room right now (only from `try_push`): wait, or refuse it.
    #[error("queue full")]
    Full(Chunk),
    /// The consumer is gone (shutdown); the chunk comes back so the caller can account for it.
    #[error("queue closed")]
    Closed(Chunk),
}

struct Capacity {
    readings: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_readings: u32,
    max_bytes: u32,
}

/// Creates a queue holding at most `max_readings` readings and `max_bytes` bytes.
pub fn bounded(max_readings: usize, max_bytes: usize, metrics: Arc<Metrics>) -> (QueueTx, QueueRx) {
    // Semaphores count in u32; a queue bigger than 4 Gi readings or 4 GiB is not a bound.
    let max_readings = u32::try_from(max_readings).unwrap_or(u32::MAX);
    let max_bytes = u32::try_from(max_bytes).unwrap_or(u32::MAX);
    metrics.queue_capacity_readings.set(i64::from(max_readings));
    metrics.queue_capacity_bytes.set(i64::from(max_bytes));
    let capacity = Arc::new(Capacity {
        readings: Arc::new(Semaphore::new(max_readings as usize)),
        bytes: Arc::new(Semaphore::new(max_bytes as usize)),
        max_readings,
        max_bytes,
    });
    // Every chunk holds at least one reading permit, so a sender with permits always finds
    // room in the channel (which allocates as it fills, not up front).
    let (tx, rx) = mpsc::channel(max_readings.max(1) as usize);
    (
        QueueTx {
            tx,
            capacity: capacity.clone(),
            metrics: metrics.clone(),
        },
        QueueRx {
            rx,
            capacity,
            metrics,
        },
    )
}

#[derive(Clone)]
pub struct QueueTx {
    tx: mpsc::Sender<Chunk>,
    capacity: Arc<Capacity>,
    metrics: Arc<Metrics>,
}

impl QueueTx {
    /// Waits for room, then enqueues: newly accepted readings. A chunk bigger than the whole
    /// queue waits for an empty queue rather than forever.
    pub async fn push(&self, chunk: Chunk) -> Result<(), QueueError> {
        self.push_counted(chunk, true).await
    }

    /// Like [`Self::push`], for readings accepted earlier (read back from the write-ahead log).
    pub async fn push_drained(&self, chunk: Chunk) -> Result<(), QueueError> {
        self.push_counted(chunk, false).await
    }

    async fn push_counted(&self, chunk: Chunk, newly_accepted: bool) -> Result<(), QueueError> {
        let (readings, bytes) = self.capacity.cost(&chunk);
        let Ok(r) = self.capacity.readings.acquire_many(readings).await else {
            return Err(QueueError::Closed(chunk));
        };
        let Ok(b) = self.capacity.bytes.acquire_many(bytes).await else {
            return Err(QueueError::Closed(chunk));
        };
        self.send(chunk, r, b, newly_accepted).await
    }

    /// Enqueues newly accepted readings only if there is room now; a full queue hands the
    /// chunk back.
    pub async fn try_push(&self, chunk: Chunk) -> Result<(), QueueError> {
        let (readings, bytes) = self.capacity.cost(&chunk);
        let Ok(r) = self.capacity.readings.try_acquire_many(readings) else {
            return Err(QueueError::Full(chunk));
        };
        let Ok(b) = self.capacity.bytes.try_acquire_many(bytes) else {
            return Err(QueueError::Full(chunk));
        };
        self.send(chunk, r, b, true).await
    }

    /// Enqueues all of `chunks` if there is room for all of them now, or none of them: the
    /// write-ahead log moves whole records into the queue. Does not wait.
    pub fn try_push_all(&self, chunks: Vec<Chunk>) -> Result<(), Vec<Chunk>> {
        let (mut readings, mut bytes) = (0u32, 0u32);
        for chunk in &chunks {
            let (r, b) = self.capacity.cost(chunk);
            readings = readings.saturating_add(r);
            bytes = bytes.saturating_add(b);
        }
        // A record larger than the whole queue goes in piece by piece (from the log), not here.
        let c = &self.capacity;
        let Ok(r) = c.readings.try_acquire_many(readings) else {
            return Err(chunks);
        };
        let Ok(b) = c.bytes.try_acquire_many(bytes) else {
            return Err(chunks);
        };
        // The consumer gives back each chunk's cost when it takes it.
        r.forget();
        b.forget();
        let mut chunks = chunks.into_iter();
        while let Some(chunk) = chunks.next() {
            let (n, len) = (chunk.readings, chunk.lines.len());
            if let Err(e) = self.tx.try_send(chunk) {
                // Only when the consumer is gone (shutdown): the rest stays in the log.
                let mut back = vec![match e {
                    mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
                }];
                back.extend(chunks);
                return Err(back);
            }
            self.metrics.queue_readings.inc_by(i64::from(n));
            self.metrics.queue_bytes.inc_by(len as i64);
        }
        Ok(())
    }

    async fn send(
        &self,
        chunk: Chunk,
        r: tokio::sync::SemaphorePermit<'_>,
        b: tokio::sync::SemaphorePermit<'_>,
        newly_accepted: bool,
    ) -> Result<(), QueueError> {
        let (n, len) = (chunk.readings, chunk.lines.len());
        match self.tx.send(chunk).await {
            Ok(()) => {
                // The consumer gives the permits back when it takes the chunk.
                r.forget();
                b.forget();
                if newly_accepted {
                    self.metrics.readings_accepted.inc_by(u64::from(n));
                }
                self.metrics.queue_readings.inc_by(i64::from(n));
                self.metrics.queue_bytes.inc_by(len as i64);
                Ok(())
            }
            Err(mpsc::error::SendError(chunk)) => Err(QueueError::Closed(chunk)),
        }
    }
}

pub struct QueueRx {
    rx: mpsc::Receiver<Chunk>,
    capacity: Arc<Capacity>,
    metrics: Arc<Metrics>,
}

impl QueueRx {
    /// The next chunk, or `None` once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Chunk> {
        let chunk = self.rx.recv().await?;
        self.taken(&chunk);
        Some(chunk)
    }

    /// Takes nothing more; what the queue holds can still be received.
    pub fn close(&mut self) {
        self.rx.close();
    }

    fn taken(&self, chunk: &Chunk) {
        let (readings, bytes) = self.capacity.cost(chunk);
        self.capacity.readings.add_permits(readings as usize);
        self.capacity.bytes.add_permits(bytes as usize);
        // Leaving the queue and entering flight is one step of the ledger.
        self.metrics
            .queue_readings
            .dec_by(i64::from(chunk.readings));
        self.metrics.queue_bytes.dec_by(chunk.lines.len() as i64);
        self.metrics
            .readings_in_flight
            .inc_by(i64::from(chunk.readings));
    }
}

impl Capacity {
    fn cost(&self, chunk: &Chunk) -> (u32, u32) {
        let bytes = u32::try_from(chunk.lines.len()).unwrap_or(u32::MAX);
        (
            chunk.readings.clamp(1, self.max_readings),
            bytes.clamp(1, self.max_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chunk(readings: u32, bytes: usize) -> Chunk {
        Chunk {
            lines: vec![b'x'; bytes],
            readings,
            received: Instant::now(),
            topic: "telemetry/d/m".into(),
            ack: None,
        }
    }

    #[tokio::test]
    async fn push_waits_when_full_and_resumes_when_drained() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = bounded(10, 1000, metrics.clone());
        tx.push(chunk(6, 10)).await.expect("fits");
        tx.push(chunk(4, 10)).await.expect("fits");
        assert_eq!(metrics.queue_readings.get(), 10);
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.push(chunk(1, 1))).await;
        assert!(blocked.is_err(), "a full queue makes the producer wait");
        let first = rx.recv().await.expect("chunk");
        assert_eq!(first.readings, 6);
        tokio::time::timeout(Duration::from_secs(1), tx.push(chunk(1, 1)))
            .await
            .expect("room again")
            .expect("open");
        assert_eq!(metrics.queue_readings.get(), 5);
        assert_eq!(metrics.readings_in_flight.get(), 6);
        assert_eq!(metrics.readings_accepted.get(), 11);
    }

    #[tokio::test]
    async fn bytes_bound_too_and_oversized_chunks_still_pass_alone() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = bounded(1000, 100, metrics.clone());
        tx.push(chunk(1, 500))
            .await
            .expect("an oversized chunk enters an empty queue");
        let blocked = tokio::time::timeout(Duration::from_millis(50), tx.push(chunk(1, 1))).await;
        assert!(blocked.is_err(), "the byte bound holds");
        rx.recv().await.expect("chunk");
        tx.push(chunk(1, 1)).await.expect("room again");
    }

    #[tokio::test]
    async fn closed_queue_hands_the_chunk_back() {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = bounded(10, 100, metrics);
        drop(rx);
        match tx.push(chunk(3, 5)).await {
            Err(QueueError::Closed(c)) => assert_eq!(c.readings, 3),
            Err(QueueError::Full(_)) | Ok(()) => panic!("push into a closed queue must fail"),
        }
    }
}
