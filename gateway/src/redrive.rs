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
