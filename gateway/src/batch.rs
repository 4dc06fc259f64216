//! Batcher: chunks from the queue → batches for the sink, sent when full or when the first
//! reading has lingered long enough, with a bounded number of writes in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::queue::{Chunk, QueueRx};

#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_readings: usize,
    pub max_bytes: usize,
    pub linger: Duration,
    pub max_in_flight: usize,
}

/// Where some of a batch's lines came from: one MQTT message (or part of one after a split).
#[derive(Debug, Clone)]
pub struct Origin {
    pub received: Instant,
    pub readings: u32,
    pub topic: Arc<str>,
    pub ack: Option<crate::ack::Ack>,
}

impl Origin {
    /// These readings are safe (written, parked or refused): settle their acknowledgement.
    pub fn settle(&self) {
        if let Some(ack) = &self.ack {
            ack.settle(self.readings);
        }
    }
}

/// Lines for one write request, with the origin of every line, in order: the lag metric and
/// dead-letter records need them, and bisecting a rejected batch keeps them straight.
#[derive(Debug, Default)]
pub struct Batch {
    pub body: Vec<u8>,
    pub readings: u32,
    pub origins: Vec<Origin>,
}

impl Batch {
    fn add(&mut self, chunk: Chunk) {
        self.body.extend_from_slice(&chunk.lines);
        self.readings += chunk.readings;
        self.origins.push(Origin {
            received: chunk.received,
            readings: chunk.readings,
            topic: chunk.topic,
            ack: chunk.ack,
        });
    }

    /// Lines that came back from the dead-letter queue: one origin for all of them.
    pub fn from_lines(body: Vec<u8>, topic: Arc<str>) -> Self {
        let readings = body.iter().filter(|b| **b == b'\n').count() as u32;
        Self {
            body,
            readings,
            origins: vec![Origin {
                received: Instant::now(),
                readings,
                topic,
                ack: None,
            }],
        }
    }

    /// Splits into the first `lines` lines and the rest (`0 < lines < self.readings`).
    pub fn split_at_line(self, lines: u32) -> (Batch, Batch) {
        let cut = self
            .body
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(lines.saturating_sub(1) as usize)
            .map_or(self.body.len(), |(i, _)| i + 1);
        let mut first = Vec::new();
        let mut second = Vec::new();
        let mut left = lines;
        for o in self.origins {
            if left == 0 {
                second.push(o);
            } else if o.readings <= left {
                left -= o.readings;
                first.push(o);
            } else {
                first.push(Origin {
                    readings: left,
                    ..o.clone()
                });
                second.push(Origin {
                    readings: o.readings - left,
                    ..o
                });
                left = 0;
            }
        }
        let (a, b) = self.body.split_at(cut);
        (
            Batch {
                body: a.to_vec(),
                readings: lines,
                origins: first,
            },
            Batch {
                body: b.to_vec(),
                readings: self.readings - lines,
                origins: second,
            },
        )
    }

    /// Distinct topics, at most `max`, and how many more there were.
    pub fn topics(&self, max: usize) -> (Vec<String>, u32) {
        let mut seen: Vec<&str> = Vec::new();
        let mut more = 0u32;
        for o in &self.origins {
            if seen.contains(&&*o.topic) {
                continue;
            }
            if seen.len() < max {
                seen.push(&o.topic);
            } else {
                more += 1;
            }
        }
        (seen.into_iter().map(str::to_owned).collect(), more)
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

/// Runs until the queue is closed and drained (every sender gone, or `drain`: the queue takes
/// nothing more and what it holds is written), then waits for every write in flight.
///
/// `cut` sends the batch being filled at once instead of after its linger: external mode
/// rings it when its receive window is full, since nothing more arrives until acknowledgements
/// go out, and those wait for this batch.
pub async fn run<D, F>(
    mut rx: QueueRx,
    limits: BatchLimits,
    deliver: D,
    drain: CancellationToken,
    cut: Arc<Notify>,
) where
    D: Fn(Batch) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight));
    let mut writes = JoinSet::new();
    let mut carry: Option<Chunk> = None;
    let mut draining = false;
    loop {
        let first = match carry.take() {
            Some(chunk) => chunk,
            None => {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = drain.cancelled(), if !draining => {
                        draining = true;
                        rx.close();
                        continue;
                    }
                };
                match next {
                    Some(chunk) => chunk,
                    None => break,
                }
            }
        };
        // Linger counts from when the batcher takes the first chunk, not from its receive time:
        // after a backlog, batches still fill up instead of leaving one by one.
        let deadline = tokio::time::Instant::now() + limits.linger;
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
                _ = cut.notified() => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Waiting for a free writer is the backpressure: the queue fills behind us.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let deliver = deliver.clone();
        writes.spawn(async move {
            deliver(batch).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(readings: u32, topic: &str) -> Origin {
        Origin {
            received: Instant::now(),
            readings,
            topic: topic.into(),
            ack: None,
        }
    }

    use crate::deliver::tests::{lines, rig, Rig};
    use crate::sink::fake::Scripted;

    /// Runs the batcher over `chunks` (each a list of lines) with these limits, drains it,
    /// and returns the rig to look at what the sink got.
    async fn batched(chunks: Vec<Vec<String>>, limits: BatchLimits, drain_at_end: bool) -> Rig {
        let r = rig(Scripted::new(vec![]));
        let (tx, rx) = crate::queue::bounded(1000, 1 << 20, r.metrics.clone());
        let drain = CancellationToken::new();
        let deliverer = r.deliverer.clone();
        let task = tokio::spawn(run(
            rx,
            limits,
            move |batch| {
                let deliverer = deliverer.clone();
                async move { deliverer.deliver(batch).await }
            },
            drain.clone(),
            Arc::new(Notify::new()),
        ));
        let total: usize = chunks.iter().map(Vec::len).sum();
        for c in chunks {
            let body: String = c.iter().map(|l| format!("{l}\n")).collect();
            let chunk = Chunk {
                lines: body.into_bytes(),
                readings: c.len() as u32,
                received: Instant::now(),
                topic: "telemetry/d/m".into(),
                ack: None,
            };
            assert!(tx.push(chunk).await.is_ok());
        }
        if drain_at_end {
            drain.cancel();
            task.await.expect("batcher");
        } else {
            while r.sink.written().len() < total {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            drain.cancel();
            task.await.expect("batcher");
        }
        r
    }

    fn limits(max_readings: usize, max_bytes: usize, linger: Duration) -> BatchLimits {
        BatchLimits {
            max_readings,
            max_bytes,
            linger,
            max_in_flight: 1,
        }
    }

    fn sizes(r: &Rig) -> Vec<usize> {
        r.sink.bodies().iter().map(|b| b.lines().count()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_when_it_holds_max_readings() {
        let chunks = (0..7).map(|i| lines(1, &i.to_string())).collect();
        let r = batched(chunks, limits(3, 1 << 20, Duration::from_secs(3600)), true).await;
        assert_eq!(sizes(&r), [3, 3, 1]);
        assert_eq!(r.metrics.sink_readings_written.get(), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_before_it_would_pass_max_bytes_and_keeps_messages_whole() {
        // Chunks of two 10-byte lines; 50 bytes hold two chunks, not three.
        let chunks = (0..5)
            .map(|i| lines(2, &format!("{i}")[..1]))
            .collect::<Vec<_>>();
        assert!(chunks[0].iter().all(|l| l.len() + 1 == 12));
        let r = batched(chunks, limits(1000, 50, Duration::from_secs(3600)), true).await;
        assert_eq!(sizes(&r), [4, 4, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_does_not_fill_goes_after_its_linger() {
        let started = tokio::time::Instant::now();
        let r = batched(
            vec![lines(2, "a")],
            limits(1000, 1 << 20, Duration::from_millis(200)),
            false,
        )
        .await;
        assert_eq!(sizes(&r), [2]);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_millis(300));
    }

    #[test]
    fn split_at_line_keeps_lines_and_origins_together() {
        let batch = Batch {
            body: b"m a=1 1\nm a=2 2\nm a=3 3\nm a=4 4\n".to_vec(),
            readings: 4,
            origins: vec![origin(3, "t/a/m"), origin(1, "t/b/m")],
        };
        let (a, b) = batch.split_at_line(2);
        assert_eq!(a.body, b"m a=1 1\nm a=2 2\n");
        assert_eq!(b.body, b"m a=3 3\nm a=4 4\n");
        assert_eq!((a.readings, b.readings), (2, 2));
        let counts = |b: &Batch| {
            b.origins
                .iter()
                .map(|o| (o.topic.to_string(), o.readings))
                .collect::<Vec<_>>()
        };
        assert_eq!(counts(&a), vec![("t/a/m".to_string(), 2)]);
        assert_eq!(
            counts(&b),
            vec![("t/a/m".to_string(), 1), ("t/b/m".to_string(), 1)]
        );
        assert_eq!(b.topics(1), (vec!["t/a/m".to_string()], 1));
    }
}
