//! Delivery of one batch: write, retry what is worth retrying, split what is too large, and
//! account for every reading (written, or given up with the sink's reason).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::{error, warn};

use crate::batch::Batch;
use crate::metrics::{Class, Metrics, Outcome};
use crate::retry::Backoff;
use crate::sink::{Sink, SinkError};

pub struct Deliverer {
    sink: Sink,
    metrics: Arc<Metrics>,
    backoff: Backoff,
    max_attempts: u32,
    gzip: bool,
    /// Set to false by shutdown when its timeout has passed: retries stop and what is left is
    /// reported as not written.
    retrying: std::sync::atomic::AtomicBool,
}

impl Deliverer {
    pub fn new(
        sink: Sink,
        metrics: Arc<Metrics>,
        backoff: Backoff,
        max_attempts: u32,
        gzip: bool,
    ) -> Self {
        Self {
            sink,
            metrics,
            backoff,
            max_attempts,
            gzip,
            retrying: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn stop_retrying(&self) {
        self.retrying
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    pub async fn deliver(&self, batch: Batch) {
        self.metrics
            .batch_readings
            .observe(f64::from(batch.readings));
        // 413 splits a batch; the halves go through the same loop, depth-first.
        let mut pending = vec![batch];
        while let Some(batch) = pending.pop() {
            match self.write_with_retries(&batch).await {
                Ok(()) => self.written(&batch),
                Err(SinkError::TooLarge { body }) if batch.received.len() > 1 => {
                    warn!(readings = batch.readings, %body, "sink says the batch is too large; splitting it");
                    let (a, b) = split(batch);
                    pending.push(b);
                    pending.push(a);
                }
                Err(e) => self.given_up(&batch, &e),
            }
        }
    }

    async fn write_with_retries(&self, batch: &Batch) -> Result<(), SinkError> {
        let body = self.encode(&batch.body);
        let mut attempt = 0;
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
                .get_or_create(&Outcome { outcome })
                .inc();
            match result {
                Ok(()) => {
                    self.metrics.sink_up.set(1);
                    return Ok(());
                }
                Err(SinkError::Retryable {
                    retry_after,
                    status,
                    detail,
                }) if attempt < self.max_attempts
                    && self.retrying.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    self.metrics.sink_up.set(0);
                    let wait = self.backoff.delay(attempt, retry_after);
                    warn!(attempt, ?status, %detail, wait_ms = wait.as_millis() as u64, "write failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    // A 400 or 413 is the sink answering about the data: it is reachable.
                    let reachable =
                        matches!(e, SinkError::Rejected { .. } | SinkError::TooLarge { .. });
                    self.metrics.sink_up.set(i64::from(reachable));
                    return Err(e);
                }
            }
        }
    }

    fn encode(&self, lines: &[u8]) -> Bytes {
        if !self.gzip {
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

    fn written(&self, batch: &Batch) {
        let now = Instant::now();
        for (received, _) in &batch.received {
            self.metrics
                .end_to_end_lag
                .observe(now.duration_since(*received).as_secs_f64());
        }
        self.metrics
            .readings_in_flight
            .dec_by(i64::from(batch.readings));
        self.metrics
            .sink_readings_written
            .inc_by(u64::from(batch.readings));
    }

    fn given_up(&self, batch: &Batch, e: &SinkError) {
        let class = match e {
            SinkError::Retryable { .. } => "retries_exhausted",
            SinkError::Rejected { .. } | SinkError::TooLarge { .. } => "rejected",
            SinkError::Refused { .. } => "refused",
        };
        // The dead-letter queue is not built yet: the log line is where these readings go.
        error!(
            readings = batch.readings,
            class,
            error = %e,
            "readings NOT written: the sink did not take this batch"
        );
        self.metrics
            .readings_in_flight
            .dec_by(i64::from(batch.readings));
        self.metrics
            .sink_readings_failed
            .get_or_create(&Class { class })
            .inc_by(u64::from(batch.readings));
    }
}

/// Splits a batch in two at a message boundary.
fn split(batch: Batch) -> (Batch, Batch) {
    let half = batch.received.len() / 2;
    let (first_msgs, second_msgs) = batch.received.split_at(half);
    let first_readings: u32 = first_msgs.iter().map(|(_, n)| n).sum();
    // Lines end in '\n', so the cut is after the first_readings-th newline.
    let cut = batch
        .body
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(first_readings as usize - 1)
        .map_or(batch.body.len(), |(i, _)| i + 1);
    let a = Batch {
        body: batch.body[..cut].to_vec(),
        readings: first_readings,
        received: first_msgs.to_vec(),
    };
    let b = Batch {
        body: batch.body[cut..].to_vec(),
        readings: batch.readings - first_readings,
        received: second_msgs.to_vec(),
    };
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cuts_at_a_message_boundary() {
        let now = Instant::now();
        let batch = Batch {
            body: b"m a=1 1\nm a=2 2\nm a=3 3\n".to_vec(),
            readings: 3,
            received: vec![(now, 2), (now, 1)],
        };
        let (a, b) = split(batch);
        assert_eq!(a.body, b"m a=1 1\nm a=2 2\n");
        assert_eq!((a.readings, b.readings), (2, 1));
        assert_eq!(b.body, b"m a=3 3\n");
    }
}
