//! Batcher: chunks from the queue → batches for the sink, sent when full or when the first
//! reading has lingered long enough, with a bounded number of writes in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::deliver::Deliverer;
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
pub async fn run(
    mut rx: QueueRx,
    limits: BatchLimits,
    deliverer: Arc<Deliverer>,
    drain: CancellationToken,
    cut: Arc<Notify>,
) {
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
