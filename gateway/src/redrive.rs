//! Redrive: the running gateway writes `retries_exhausted` records again once the sink answers.
//!
//! While the sink is down, this task is its only prober: one record (the oldest) per probe,
//! with the probe interval doubling up to `sink.retry_max`. Once a probe succeeds the queue is
//! drained oldest first at `dlq.redrive_rate` records a second. Records rejected or refused by
//! the sink, and rejected input, wait for an operator (`gateway dlq replay`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::deliver::{Deliverer, Redrive};
use crate::dlq::{Kind, SharedDlq};

#[derive(Debug, Clone)]
pub struct RedriveConfig {
    pub interval: Duration,
    pub max_interval: Duration,
    /// Records per second once the sink is healthy.
    pub rate: u32,
}

pub async fn run(
    deliverer: Arc<Deliverer>,
    dlq: Arc<SharedDlq>,
    config: RedriveConfig,
    stop: CancellationToken,
) {
    let pace = Duration::from_secs_f64(1.0 / f64::from(config.rate.max(1)));
    let mut wait = config.interval;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if let Err(e) = dlq.retry_deletes().await {
            error!(error = %e, "still cannot delete redriven dead-letter records");
        }
        let batch = dlq.oldest(Kind::RetriesExhausted, 64);
        if batch.is_empty() {
            wait = config.interval;
            continue;
        }
        let mut redriven = 0usize;
        for (id, readings) in batch {
            if stop.is_cancelled() {
                return;
            }
            match deliverer.redrive(id.clone(), readings).await {
                Ok(Redrive::Done) => {
                    redriven += 1;
                    wait = pace;
                    tokio::time::sleep(pace).await;
                }
                Ok(Redrive::SinkDown) => {
                    wait = (wait * 2).clamp(config.interval, config.max_interval);
                    break;
                }
                Err(e) => {
                    error!(%id, error = %e, "cannot redrive a dead-letter record; trying again later");
                    wait = config.max_interval;
                    break;
                }
            }
        }
        if redriven > 0 {
            info!(
                records = redriven,
                "redrove dead-letter records to the sink"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::tests::{lines, rig};
    use crate::sink::fake::{self, Scripted};

    /// The task alone: the sink is down for the first batches and the first probes, then
    /// back; every parked record is written again, once, and the queue empties.
    #[tokio::test(start_paused = true)]
    async fn redrive_probes_until_the_sink_is_back_then_drains_oldest_first() {
        let mut script: Vec<_> = (0..7).map(|_| Err(fake::unreachable())).collect();
        script.push(Err(fake::unavailable(None)));
        let r = rig(Scripted::new(script));
        let (a, b) = (lines(3, "a"), lines(2, "b"));
        r.deliver(&a).await;
        r.deliver(&b).await;
        assert_eq!(r.parked(Kind::RetriesExhausted).len(), 2);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            r.deliverer.clone(),
            r.dlq.clone(),
            RedriveConfig {
                interval: Duration::from_millis(100),
                max_interval: Duration::from_secs(1),
                rate: 100,
            },
            stop.clone(),
        ));
        while !r.parked(Kind::RetriesExhausted).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        task.await.expect("redrive");
        // A failed probe parks its record again, behind the others: the order of records
        // changes while the sink is down, never what is written.
        let mut written = r.sink.written();
        written.sort();
        assert_eq!(written, [a, b].concat());
        assert_eq!(r.metrics.dlq_redriven_readings.get(), 5);
        assert_eq!(r.metrics.sink_up.get(), 1);
    }
}
