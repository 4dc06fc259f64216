//! Batcher: chunks from the queue → batches for the sink, sent when full or when the first
//! reading has lingered long enough, with a bounded number of writes in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::deliver::Deliverer;
use crate::queue::{Chunk, QueueRx};

#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_readings: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    pub max_in_flight: usize,
}

/// A batch: whole chunks, so that every reading keeps its receive time for the lag metric.
#[derive(Debug, Default)]
pub struct Batch {
    pub body: Vec<u8>,
    pub readings: u32,
    /// (receive time, readings) per message, in order.
    pub received: Vec<(Instant, u32)>,
}

impl Batch {
    fn add(&mut self, chunk: Chunk) {
        self.body.extend_from_slice(&chunk.lines);
        self.readings += chunk.readings;
        self.received.push((chunk.received, chunk.readings));
    }

    fn fits(&self, chunk: &Chunk, limits: &BatchLimits) -> bool {
        self.readings == 0
            || (self.readings as usize + chunk.readings as usize <= limits.max_readings
                && self.body.len() + chunk.lines.len() <= limits.max_bytes)
    }

    fn full(&self, limits: &BatchLimits) -> bool {
        self.readings as usize >= limits.max_readings || self.body.len() >= limits.max_bytes
    }
}

/// Runs until the queue is closed and drained, then waits for every write in flight.
pub async fn run(mut rx: QueueRx, limits: BatchLimits, deliverer: Arc<Deliverer>) {
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    let mut writes = JoinSet::new();
    let mut carry: Option<Chunk> = None;
    loop {
        let first = match carry.take() {
            Some(chunk) => chunk,
            None => match rx.recv().await {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let deadline =
            tokio::time::Instant::from_std(first.received.max(Instant::now())) + limits.linger;
        let mut batch = Batch::default();
        batch.add(first);
        let mut closed = false;
        while !batch.full(&limits) {
            tokio::select! {
                biased;
                next = rx.recv() => match next {
                    Some(chunk) if batch.fits(&chunk, &limits) => batch.add(chunk),
                    Some(chunk) => {
                        carry = Some(chunk);
                        break;
                    }
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Waiting for a free writer is the backpressure: the queue fills behind us.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let deliverer = deliverer.clone();
        writes.spawn(async move {
            deliverer.deliver(batch).await;
            drop(permit);
        });
        // Reap finished writes so the set does not grow.
        while writes.try_join_next().is_some() {}
        if closed {
            break;
        }
    }
    while writes.join_next().await.is_some() {}
}
