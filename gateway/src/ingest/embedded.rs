//! Embedded mode: an in-process rumqttd broker that devices connect to, read through a link.
//!
//! rumqttd acknowledges QoS 1 before anyone reads the message and, when a reader falls behind,
//! drops the oldest segment of its in-memory log and moves the reader ahead. So the link reader
//! here never stalls on anything but the queue, subscribes to every topic (`#`) so nothing
//! vanishes unseen, refuses topics outside the pattern with a reason, and counts every message
//! the broker skipped past it: the link's cursor is an absolute offset in the filter's log, so
//! a jump in it is the exact number lost.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{guard, IngestError, Intake};
use crate::config::Config;
use crate::metrics::Metrics;

/// Everything the gateway answers for; topics outside the pattern are refused, not ignored.
const FILTER: &str = "#";

pub struct Embedded {
    // Kept so the router does not see the link disconnect.
    _tx: LinkTx,
    rx: LinkRx,
    alerts: rumqttd::alerts::AlertsLink,
    /// With the guard: what the link has read, so that devices wait when it falls behind.
    backlog: Option<Arc<guard::backlog::Backlog>>,
}

/// Where rumqttd listens and what login it requires.
struct Listen {
    v4: SocketAddr,
    v5: SocketAddr,
    login: Option<(String, String)>,
    backlog: Option<Arc<guard::backlog::Backlog>>,
}

/// Builds the broker, links the gateway to it, and starts it on its own threads. With the
/// guard (TLS, authentication or connection limits), devices connect to the guard and rumqttd
/// listens on loopback ports behind it; the guard runs until `stop`.
pub async fn start(
    config: &Config,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<Embedded, IngestError> {
    let mqtt = &config.mqtt;
    if config.auth.anonymous {
        warn!("auth.anonymous = true: any device that reaches the MQTT ports may publish");
    }
    let listen = if guard::wanted(config) {
        let listeners = guard::bind(config).await?;
        let upstream = (free_loopback_port()?, free_loopback_port()?);
        let login = guard::internal_login();
        let log_bytes = mqtt.broker_segment_size.as_u64() * mqtt.broker_segment_count as u64;
        let backlog = Arc::new(guard::backlog::Backlog::new(log_bytes));
        let g = Arc::new(guard::Guard::new(
            config,
            upstream,
            login.clone(),
            backlog.clone(),
            metrics,
        )?);
        tokio::spawn(g.run(listeners, config.auth.reload_interval, stop));
        info!(
            anonymous = config.auth.anonymous,
            tls = ?mqtt.tls_listen,
            bind_identity = config.auth.bind_identity,
            "device guard in front of the embedded broker"
        );
        Listen {
            v4: upstream.0,
            v5: upstream.1,
            login: Some(login),
            backlog: Some(backlog),
        }
    } else {
        for (key, addr) in [
            ("mqtt.listen", mqtt.listen),
            ("mqtt.listen_v5", mqtt.listen_v5),
        ] {
            // rumqttd binds inside its own threads and only logs a failure: check first so a
            // taken port is an error the operator sees.
            std::net::TcpListener::bind(addr).map_err(|source| IngestError::Bind {
                key,
                addr,
                source,
            })?;
        }
        Listen {
            v4: mqtt.listen,
            v5: mqtt.listen_v5,
            login: None,
            backlog: None,
        }
    };
    let broker_config = broker_config(config, &listen)?;
    let broker = Broker::new(broker_config);
    let (mut tx, rx) = broker
        .link(&mqtt.client_id)
        .map_err(|e| IngestError::Broker(format!("cannot link to the router: {e}")))?;
    let alerts = broker
        .alerts()
        .map_err(|e| IngestError::Broker(format!("no alerts link: {e}")))?;
    tx.subscribe(FILTER)
        .map_err(|e| IngestError::Broker(format!("cannot subscribe: {e}")))?;
    let mut broker = broker;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| IngestError::Broker(format!("cannot start the broker thread: {e}")))?;
    info!(v4 = %mqtt.listen, v5 = %mqtt.listen_v5, "embedded MQTT broker listening");
    Ok(Embedded {
        _tx: tx,
        rx,
        alerts,
        backlog: listen.backlog,
    })
}

/// A loopback port nobody listens on now. rumqttd binds inside its own threads, so the port
/// is chosen here and handed over; another process taking it in between fails the start-up.
fn free_loopback_port() -> Result<SocketAddr, IngestError> {
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|source| IngestError::Bind {
            key: "the guard's loopback port",
            addr,
            source,
        })
}

fn broker_config(config: &Config, listen: &Listen) -> Result<rumqttd::Config, IngestError> {
    let mqtt = &config.mqtt;
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        // A little over the guard's limit, so that the guard, which counts what it
        // forwards, refuses an oversized packet before the broker does.
        max_payload_size: guard::broker_payload_limit(config) + 64 * 1024,
        max_inflight_count: 100,
        auth: listen
            .login
            .clone()
            .map(|(user, password)| HashMap::from([(user, password)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        // No pause between accepts: a fleet reconnecting at once is the normal case.
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    // RouterConfig::default() has max_connections = 0 and max_segment_size = 0, which make
    // link() fail and the router panic: every field is set deliberately.
    let router = RouterConfig {
        // +1 for the gateway's own link.
        max_connections: mqtt.max_connections + 1,
        max_outgoing_packet_count: 1000,
        max_segment_size: mqtt.broker_segment_size.as_u64() as usize,
        max_segment_count: mqtt.broker_segment_count,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    // MetricSettings' fields are private; its serde form is the way to build one. rumqttd's
    // timer unwraps both intervals whichever is configured, so meters get one too (nobody
    // subscribes to them).
    let metrics = serde_json::from_value(serde_json::json!({
        "alerts": {"push_interval": 1},
        "meters": {"push_interval": 3600},
    }))
    .map_err(|e| IngestError::Broker(format!("alert settings: {e}")))?;
    Ok(rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("v4".to_owned(), server("v4", listen.v4))])),
        v5: Some(HashMap::from([("v5".to_owned(), server("v5", listen.v5))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: Some(metrics),
    })
}

impl Embedded {
    /// Reads the link until `stop` fires or the queue closes.
    pub async fn run(self, mut intake: Intake, metrics: Arc<Metrics>, stop: CancellationToken) {
        let Embedded {
            _tx,
            mut rx,
            alerts,
            backlog,
        } = self;
        let alert_task = tokio::spawn(watch_alerts(alerts, metrics.clone()));
        metrics.ingest_up.set(1);
        let mut next_offset: u64 = 0;
        loop {
            if let Some(b) = &backlog {
                b.reader_idle(true);
            }
            let notification = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                n = rx.next() => n,
            };
            if let Some(b) = &backlog {
                b.reader_idle(false);
            }
            match notification {
                Ok(Some(Notification::Forward(forward))) => {
                    if let Some((_, offset)) = forward.cursor {
                        if offset > next_offset {
                            let lost = offset - next_offset;
                            metrics.broker_dropped.inc_by(lost);
                            if let Some(b) = &backlog {
                                b.consumed(lost);
                            }
                            error!(
                                lost,
                                "the embedded broker dropped messages before the gateway read them \
                                 (its log overflowed); raise mqtt.broker_segment_size or _count, or \
                                 speed up the sink"
                            );
                        }
                        next_offset = next_offset.max(offset + 1);
                    }
                    if let Some(b) = &backlog {
                        b.consumed(1);
                    }
                    let content_type = forward
                        .properties
                        .as_ref()
                        .and_then(|p| p.content_type.as_deref());
                    let publish = &forward.publish;
                    if intake
                        .accept(&publish.topic, &publish.payload, content_type, None)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                // The router parks a link that has drained its buffer; without this wake the
                // link stops receiving after one buffer's worth of messages.
                Ok(Some(Notification::Unschedule)) => {
                    if let Err(e) = rx.wake().await {
                        error!(error = %e, "cannot wake the broker link");
                        break;
                    }
                }
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => {
                    error!(error = %e, "broker link closed");
                    break;
                }
            }
        }
        metrics.ingest_up.set(0);
        alert_task.abort();
    }
}

/// Logs the broker's alerts. Losses are counted from the cursor (exact); the alert's own
/// `lost` field is always 0 in rumqttd 0.20.
async fn watch_alerts(alerts: rumqttd::alerts::AlertsLink, metrics: Arc<Metrics>) {
    while let Ok(batch) = alerts.next().await {
        for alert in batch {
            metrics.broker_alerts.inc();
            // AlertKind is not nameable outside rumqttd; its serde form is.
            let detail = serde_json::to_value(&alert).unwrap_or_default();
            warn!(alert = %detail, "embedded broker alert");
        }
    }
}
