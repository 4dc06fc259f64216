//! Self-metrics in the sink: every `self_metrics.interval` the gateway writes its own metrics as
//! line protocol to the same sink as the telemetry, so one InfluxDB datasource serves both the
//! "Telemetry" and the "Gateway health" dashboards (`/metrics` stays for Prometheus).
//!
//! The mapping is mechanical, so every metric the gateway has is there: measurement
//! `self_metrics.measurement` (default `gateway`), tag `instance`, one field per Prometheus
//! sample named like the sample (`gateway_queue_readings`, `gateway_messages_received_total`);
//! samples with labels become their own lines with the labels as tags (`reason`, `outcome`,
//! `kind`). Histograms contribute `_sum` and `_count`; end-to-end lag also gets
//! `gateway_end_to_end_lag_p50_seconds` and `_p99_seconds` over the last interval.
//!
//! Self-metrics are not telemetry: a write that fails is counted
//! (`gateway_self_metrics_failed_total`) and not retried or parked.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::line_protocol::{self, FieldValue};
use crate::metrics::Metrics;
use crate::sink::Sink;

#[derive(Debug, Clone)]
pub struct SelfMetricsConfig {
    pub interval: Duration,
    pub measurement: String,
    pub instance: String,
}

pub async fn run(
    sink: Sink,
    metrics: Arc<Metrics>,
    config: SelfMetricsConfig,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let (p50, p99) = metrics.lag_window.take_quantiles();
        let mut text = metrics.encode();
        text.push_str(&format!(
            "gateway_end_to_end_lag_p50_seconds {p50}\ngateway_end_to_end_lag_p99_seconds {p99}\n"
        ));
        let body = to_line_protocol(&text, &config.measurement, &config.instance, now_ns);
        if let Err(e) = sink.write(bytes::Bytes::from(body)).await {
            metrics.self_metrics_failed.inc();
            debug!(error = %e, "self-metrics not written");
        }
    }
}

/// Turns Prometheus text exposition into line protocol (see the module doc for the mapping).
pub fn to_line_protocol(text: &str, measurement: &str, instance: &str, ts_ns: i64) -> Vec<u8> {
    let mut plain: Vec<(&str, f64)> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((sample, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if !value.is_finite() || sample.contains("_bucket{") || sample.ends_with("_created") {
            continue;
        }
        match sample.split_once('{') {
            None => plain.push((sample, value)),
            Some((name, labels)) => {
                line_protocol::push_measurement(&mut out, measurement);
                line_protocol::push_tag(&mut out, "instance", instance);
                for (k, v) in parse_labels(labels.trim_end_matches('}')) {
                    line_protocol::push_tag(&mut out, k, v);
                }
                out.push(b' ');
                line_protocol::push_field(&mut out, true, name, FieldValue::Float(value));
                line_protocol::push_timestamp(&mut out, ts_ns);
            }
        }
    }
    if !plain.is_empty() {
        line_protocol::push_measurement(&mut out, measurement);
        line_protocol::push_tag(&mut out, "instance", instance);
        out.push(b' ');
        for (i, (name, value)) in plain.iter().enumerate() {
            line_protocol::push_field(&mut out, i == 0, name, FieldValue::Float(*value));
        }
        line_protocol::push_timestamp(&mut out, ts_ns);
    }
    out
}

/// `a="x",b="y"` → pairs. Label values here are our own reason/outcome/kind names: no quotes
/// or escapes inside them.
fn parse_labels(labels: &str) -> Vec<(&str, &str)> {
    labels
        .split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim(), v.trim().trim_matches('"')))
        })
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_becomes_lines() {
        let text = "# HELP x\ngateway_queue_readings 5\ngateway_readings_rejected_total{reason=\"bad_topic\"} 2\n\
                    gateway_lag_bucket{le=\"0.1\"} 1\ngateway_lag_sum 0.5\ngateway_messages_received_total 10\n";
        let lines = String::from_utf8(to_line_protocol(text, "gateway", "gw 1", 7)).expect("utf-8");
        assert_eq!(
            lines,
            "gateway,instance=gw\\ 1,reason=bad_topic gateway_readings_rejected_total=2 7\n\
             gateway,instance=gw\\ 1 gateway_queue_readings=5,gateway_lag_sum=0.5,gateway_messages_received_total=10 7\n"
        );
    }
}
