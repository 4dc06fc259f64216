//! Keeps refused payloads as `rejected_input` dead-letter records, with their topic and reason,
//! within an allowance per device and minute so that a flood of garbage cannot fill the disk.
//! Over the allowance, or when the writer falls behind, a payload is not kept and counted in
//! `gateway_dlq_rejected_input_skipped_total`; its rejection is counted either way.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::error;

use crate::dlq::{self, Kind, Meta, SharedDlq};
use crate::metrics::Metrics;

/// Records waiting for the disk at most; the ingest task never waits on it.
const BACKLOG: usize = 1024;
/// Bytes of a payload kept at most: enough to see what a device sends.
const MAX_KEPT: usize = 64 * 1024;

pub struct Rejects {
    tx: mpsc::Sender<(Meta, Vec<u8>)>,
    per_device: u32,
    minute: Instant,
    used: HashMap<String, u32>,
    metrics: Arc<Metrics>,
}

impl Rejects {
    /// Starts the writer task; `per_device` is the allowance per device and minute.
    pub fn start(
        dlq: Arc<SharedDlq>,
        per_device: u32,
        metrics: Arc<Metrics>,
        tasks: &crate::tasks::Tasks,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<(Meta, Vec<u8>)>(BACKLOG);
        let writer_metrics = metrics.clone();
        // Ends once intake, which holds the sender, is gone.
        tasks.spawn("rejected input keeper", async move {
            while let Some((meta, payload)) = rx.recv().await {
                if let Err(e) = dlq.append(meta, payload).await {
                    writer_metrics.dlq_rejected_input_skipped.inc();
                    error!(error = %e, "cannot keep a rejected payload in the dead-letter queue");
                }
            }
        });
        Self {
            tx,
            per_device,
            minute: Instant::now(),
            used: HashMap::new(),
            metrics,
        }
    }

    /// Keeps `payload` unless its device is over its allowance.
    pub fn keep(
        &mut self,
        device: Option<&str>,
        topic: &str,
        payload: &[u8],
        content_type: Option<&str>,
        reason: String,
        readings: u32,
    ) {
        if self.per_device == 0 {
            return;
        }
        if self.minute.elapsed().as_secs() >= 60 {
            self.minute = Instant::now();
            self.used.clear();
        }
        // Topics that name no device share one allowance.
        let key = device.unwrap_or("<no device>");
        let used = match self.used.get_mut(key) {
            Some(n) => n,
            None => self.used.entry(key.to_owned()).or_insert(0),
        };
        if *used >= self.per_device {
            self.metrics.dlq_rejected_input_skipped.inc();
            return;
        }
        *used += 1;
        let now = dlq::now_ms();
        let kept = &payload[..payload.len().min(MAX_KEPT)];
        let reason = if kept.len() < payload.len() {
            format!(
                "{reason} (first {MAX_KEPT} of {} bytes kept)",
                payload.len()
            )
        } else {
            reason
        };
        let meta = Meta {
            kind: Kind::RejectedInput,
            reason,
            status: None,
            attempts: 0,
            first_failure_ms: now,
            last_failure_ms: now,
            topics: vec![topic.chars().take(256).collect()],
            more_topics: 0,
            readings,
            content_type: content_type.map(str::to_owned),
        };
        if self.tx.try_send((meta, kept.to_vec())).is_err() {
            self.metrics.dlq_rejected_input_skipped.inc();
        }
    }
}
