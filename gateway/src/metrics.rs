//! Self-metrics (docs/contract.md §4 names) and the ledger they prove.
//!
//! Ledger ([`Ledger`]):
//! `accepted + inherited = written + in the DLQ + expired + in the log + queued + in flight`.
//! Each reading moves between the right-hand terms with counter steps in the task that moves it,
//! so a scrape sees the ledger balanced up to the reading being moved at that instant.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub messages_received: Counter,
    pub messages_rejected: Family<Reason, Counter>,
    pub readings_accepted: Counter,
    pub readings_rejected: Family<Reason, Counter>,
    pub queue_readings: Gauge,
    pub queue_bytes: Gauge,
    pub queue_capacity_readings: Gauge,
    pub queue_capacity_bytes: Gauge,
    pub readings_in_flight: Gauge,
    pub batch_readings: Histogram,
    pub sink_readings_written: Counter,
    pub dlq_records: Gauge,
    pub dlq_readings: Gauge,
    pub dlq_rejected_inputs: Gauge,
    pub dlq_bytes: Gauge,
    pub dlq_oldest_age_seconds: Gauge<f64, AtomicU64>,
    pub dlq_inherited_readings: Gauge,
    pub dlq_parked_readings: Family<KindLabel, Counter>,
    pub dlq_redriven_readings: Counter,
    pub dlq_full: Gauge,
    pub dlq_expired_readings: Counter,
    pub dlq_rejected_input_skipped: Counter,
    pub sink_requests: Family<OutcomeLabel, Counter>,
    pub sink_retries: Counter,
    pub sink_request_duration: Histogram,
    pub sink_up: Gauge,
    pub end_to_end_lag: Histogram,
    pub broker_dropped: Counter,
    pub broker_alerts: Counter,
    pub ingest_up: Gauge,
    pub self_metrics_failed: Counter,
    pub unacked_messages: Gauge,
    pub acks_pending: Gauge,
    pub messages_redelivered: Counter,
    pub wal_readings: Gauge,
    pub wal_inherited_readings: Gauge,
    pub wal_bytes: Gauge,
    pub wal_records: Gauge,
    pub wal_full: Gauge,
    pub wal_syncs: Counter,
    pub wal_bytes_written: Counter,
    pub wal_sync_duration: Histogram,
    pub wal_fed_readings: Counter,
    pub device_connections: Gauge,
    pub ingest_paused: Counter,
    pub connections_refused: Family<Reason, Counter>,
    pub connections_closed: Family<Reason, Counter>,
    pub credentials_devices: Gauge,
    pub credentials_reloads: Family<OutcomeLabel, Counter>,
    /// Lag since the last self-metrics write (not exposed: `/metrics` has the histogram).
    pub lag_window: LagWindow,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            messages_received: Counter::default(),
            messages_rejected: Family::default(),
            readings_accepted: Counter::default(),
            readings_rejected: Family::default(),
            queue_readings: Gauge::default(),
            queue_bytes: Gauge::default(),
            queue_capacity_readings: Gauge::default(),
            queue_capacity_bytes: Gauge::default(),
            readings_in_flight: Gauge::default(),
            batch_readings: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            sink_readings_written: Counter::default(),
            dlq_records: Gauge::default(),
            dlq_readings: Gauge::default(),
            dlq_rejected_inputs: Gauge::default(),
            dlq_bytes: Gauge::default(),
            dlq_oldest_age_seconds: Gauge::default(),
            dlq_inherited_readings: Gauge::default(),
            dlq_parked_readings: Family::default(),
            dlq_redriven_readings: Counter::default(),
            dlq_full: Gauge::default(),
            dlq_expired_readings: Counter::default(),
            dlq_rejected_input_skipped: Counter::default(),
            sink_requests: Family::default(),
            sink_retries: Counter::default(),
            sink_request_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            sink_up: Gauge::default(),
            end_to_end_lag: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            broker_dropped: Counter::default(),
            broker_alerts: Counter::default(),
            ingest_up: Gauge::default(),
            self_metrics_failed: Counter::default(),
            unacked_messages: Gauge::default(),
            acks_pending: Gauge::default(),
            messages_redelivered: Counter::default(),
            wal_readings: Gauge::default(),
            wal_inherited_readings: Gauge::default(),
            wal_bytes: Gauge::default(),
            wal_records: Gauge::default(),
            wal_full: Gauge::default(),
            wal_syncs: Counter::default(),
            wal_bytes_written: Counter::default(),
            wal_sync_duration: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            wal_fed_readings: Counter::default(),
            device_connections: Gauge::default(),
            ingest_paused: Counter::default(),
            connections_refused: Family::default(),
            connections_closed: Family::default(),
            credentials_devices: Gauge::default(),
            credentials_reloads: Family::default(),
            lag_window: Default::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "gateway_messages_received",
            "MQTT messages taken from the broker",
            m.messages_received.clone(),
        );
        r.register(
            "gateway_messages_rejected",
            "Messages refused whole, by reason",
            m.messages_rejected.clone(),
        );
        r.register(
            "gateway_readings_accepted",
            "Readings decoded and queued for the sink",
            m.readings_accepted.clone(),
        );
        r.register(
            "gateway_readings_rejected",
            "Readings refused at input, by reason (an unreadable payload counts as one)",
            m.readings_rejected.clone(),
        );
        r.register(
            "gateway_queue_readings",
            "Readings waiting in the queue",
            m.queue_readings.clone(),
        );
        r.register(
            "gateway_queue_bytes",
            "Line-protocol bytes waiting in the queue",
            m.queue_bytes.clone(),
        );
        r.register(
            "gateway_queue_capacity_readings",
            "Queue capacity in readings",
            m.queue_capacity_readings.clone(),
        );
        r.register(
            "gateway_queue_capacity_bytes",
            "Queue capacity in bytes",
            m.queue_capacity_bytes.clone(),
        );
        r.register(
            "gateway_readings_in_flight",
            "Readings taken from the queue whose write has not finished",
            m.readings_in_flight.clone(),
        );
        r.register(
            "gateway_batch_readings",
            "Readings per batch sent to the sink",
            m.batch_readings.clone(),
        );
        r.register(
            "gateway_sink_readings_written",
            "Readings the sink acknowledged",
            m.sink_readings_written.clone(),
        );
        r.register(
            "gateway_dlq_records",
            "Records in the dead-letter queue",
            m.dlq_records.clone(),
        );
        r.register(
            "gateway_dlq_readings",
            "Accepted readings in the dead-letter queue (rejected input not included)",
            m.dlq_readings.clone(),
        );
        r.register(
            "gateway_dlq_rejected_inputs",
            "Rejected payloads kept in the dead-letter queue",
            m.dlq_rejected_inputs.clone(),
        );
        r.register(
            "gateway_dlq_bytes",
            "Bytes of the dead-letter queue's files",
            m.dlq_bytes.clone(),
        );
        r.register(
            "gateway_dlq_oldest_age_seconds",
            "Age of the oldest dead-letter record's first failure",
            m.dlq_oldest_age_seconds.clone(),
        );
        r.register(
            "gateway_dlq_inherited_readings",
            "Accepted readings that were in the dead-letter queue when this process started",
            m.dlq_inherited_readings.clone(),
        );
        r.register(
            "gateway_dlq_parked_readings",
            "Readings parked in the dead-letter queue, by kind (rejected input: the readings refused, 1 for a payload refused whole)",
            m.dlq_parked_readings.clone(),
        );
        r.register(
            "gateway_dlq_redriven_readings",
            "Readings written from the dead-letter queue by automatic redrive",
            m.dlq_redriven_readings.clone(),
        );
        r.register(
            "gateway_dlq_full",
            "1 while the dead-letter queue is at dlq.max_bytes and writers hold their batches",
            m.dlq_full.clone(),
        );
        r.register(
            "gateway_dlq_expired_readings",
            "Accepted readings deleted from the dead-letter queue by dlq.retention",
            m.dlq_expired_readings.clone(),
        );
        r.register(
            "gateway_dlq_rejected_input_skipped",
            "Rejected payloads not kept because their device was over its dead-letter allowance",
            m.dlq_rejected_input_skipped.clone(),
        );
        r.register(
            "gateway_sink_requests",
            "Write requests by outcome",
            m.sink_requests.clone(),
        );
        r.register(
            "gateway_sink_retries",
            "Write requests that were retries",
            m.sink_retries.clone(),
        );
        r.register(
            "gateway_sink_request_duration_seconds",
            "Duration of one write request",
            m.sink_request_duration.clone(),
        );
        r.register(
            "gateway_sink_up",
            "1 when the sink's last answer was a success",
            m.sink_up.clone(),
        );
        r.register(
            "gateway_end_to_end_lag_seconds",
            "From a message's receive time to the sink's acknowledgement, per message",
            m.end_to_end_lag.clone(),
        );
        r.register(
            "gateway_broker_dropped",
            "Messages the embedded broker lost before the gateway read them (cursor jumps)",
            m.broker_dropped.clone(),
        );
        r.register(
            "gateway_broker_alerts",
            "Alerts the embedded broker raised",
            m.broker_alerts.clone(),
        );
        r.register(
            "gateway_ingest_up",
            "1 while MQTT ingest is running",
            m.ingest_up.clone(),
        );
        r.register(
            "gateway_unacked_messages",
            "Messages received whose acknowledgement (PUBACK) is not on the wire yet: not yet safe, or safe and waiting to be sent",
            m.unacked_messages.clone(),
        );
        r.register(
            "gateway_acks_pending",
            "External mode: acknowledgements due (the message is safe or refused) that have not gone out to the broker yet",
            m.acks_pending.clone(),
        );
        r.register(
            "gateway_messages_redelivered",
            "External mode: messages the broker sent again (MQTT dup flag)",
            m.messages_redelivered.clone(),
        );
        r.register(
            "gateway_self_metrics_failed",
            "Self-metrics writes to the sink that failed (not retried)",
            m.self_metrics_failed.clone(),
        );
        r.register(
            "gateway_wal_readings",
            "Accepted readings held only by the write-ahead log (not yet in the queue)",
            m.wal_readings.clone(),
        );
        r.register(
            "gateway_wal_inherited_readings",
            "Readings that were in the write-ahead log when this process started (replayed first)",
            m.wal_inherited_readings.clone(),
        );
        r.register(
            "gateway_wal_bytes",
            "Bytes of the write-ahead log's segment files",
            m.wal_bytes.clone(),
        );
        r.register(
            "gateway_wal_records",
            "Records in the write-ahead log not yet released (written or parked)",
            m.wal_records.clone(),
        );
        r.register(
            "gateway_wal_full",
            "1 while the write-ahead log is at wal.max_bytes and devices wait (push-back)",
            m.wal_full.clone(),
        );
        r.register(
            "gateway_wal_syncs",
            "fdatasyncs of the write-ahead log: one per group of messages acknowledged together",
            m.wal_syncs.clone(),
        );
        r.register(
            "gateway_wal_written_bytes",
            "Bytes of line protocol written to the write-ahead log",
            m.wal_bytes_written.clone(),
        );
        r.register(
            "gateway_wal_sync_duration_seconds",
            "Time to write and fdatasync one group of messages",
            m.wal_sync_duration.clone(),
        );
        r.register(
            "gateway_wal_fed_readings",
            "Readings read back from the write-ahead log into the queue (after a restart, or when the queue was full)",
            m.wal_fed_readings.clone(),
        );
        r.register(
            "gateway_device_connections",
            "Devices connected through the guard (TLS, authentication or connection limits on)",
            m.device_connections.clone(),
        );
        r.register(
            "gateway_ingest_paused",
            "Times ingest waited for room in the write-ahead log or the queue (push-back)",
            m.ingest_paused.clone(),
        );
        r.register(
            "gateway_connections_refused",
            "Device connections refused before they reached the broker, by reason",
            m.connections_refused.clone(),
        );
        r.register(
            "gateway_connections_closed",
            "Device connections closed for breaking a rule (identity, subscription, size), by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "gateway_credentials_devices",
            "Devices in the credentials file in force",
            m.credentials_devices.clone(),
        );
        r.register(
            "gateway_credentials_reloads",
            "Reloads of the credentials file, by outcome",
            m.credentials_reloads.clone(),
        );
        Self { registry, ..m }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The ledger's terms, for logs and the shutdown report.
    pub fn ledger(&self) -> Ledger {
        Ledger {
            accepted: self.readings_accepted.get(),
            inherited: (self.dlq_inherited_readings.get() + self.wal_inherited_readings.get())
                .max(0) as u64,
            written: self.sink_readings_written.get(),
            in_dlq: self.dlq_readings.get().max(0) as u64,
            expired: self.dlq_expired_readings.get(),
            in_log: self.wal_readings.get().max(0) as u64,
            queued: self.queue_readings.get().max(0) as u64,
            in_flight: self.readings_in_flight.get().max(0) as u64,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `accepted + inherited = written + in_dlq + expired + in_log + queued + in_flight`: every
/// reading this process accepted, plus those it found in the dead-letter queue and the
/// write-ahead log at start, is written, parked, deleted by the retention the operator set,
/// waiting in the write-ahead log for queue room, or on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ledger {
    pub accepted: u64,
    pub inherited: u64,
    pub written: u64,
    pub in_dlq: u64,
    pub expired: u64,
    pub in_log: u64,
    pub queued: u64,
    pub in_flight: u64,
}

impl Ledger {
    pub fn balanced(&self) -> bool {
        self.accepted + self.inherited
            == self.written
                + self.in_dlq
                + self.expired
                + self.in_log
                + self.queued
                + self.in_flight
    }
}

/// End-to-end lag over the last self-metrics interval, in fixed buckets, for p50/p99 in the
/// sink (the Prometheus histogram covers all time and cannot be read back).
pub struct LagWindow {
    counts: Vec<AtomicU64>,
}

/// Bucket upper bounds in seconds: 1 ms doubling to about 9 minutes.
const LAG_BUCKETS: usize = 20;

impl Default for LagWindow {
    fn default() -> Self {
        Self {
            counts: (0..=LAG_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LagWindow {
    fn bound(i: usize) -> f64 {
        0.001 * f64::from(1u32 << i)
    }

    pub fn observe(&self, seconds: f64) {
        let i = (0..LAG_BUCKETS)
            .find(|&i| seconds <= Self::bound(i))
            .unwrap_or(LAG_BUCKETS);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Upper bounds of the p50 and p99 buckets since the last call (0 when nothing happened).
    pub fn take_quantiles(&self) -> (f64, f64) {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.swap(0, Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return (0.0, 0.0);
        }
        let quantile = |q: f64| {
            let rank = (q * total as f64).ceil() as u64;
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Self::bound(i.min(LAG_BUCKETS - 1));
                }
            }
            Self::bound(LAG_BUCKETS - 1)
        };
        (quantile(0.5), quantile(0.99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_quantiles_over_the_window() {
        let w = LagWindow::default();
        assert_eq!(w.take_quantiles(), (0.0, 0.0));
        for _ in 0..98 {
            w.observe(0.003);
        }
        w.observe(0.5);
        w.observe(0.5);
        let (p50, p99) = w.take_quantiles();
        assert_eq!(p50, 0.004);
        assert_eq!(p99, 0.512);
        assert_eq!(w.take_quantiles(), (0.0, 0.0), "the window resets");
    }
}
