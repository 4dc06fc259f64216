//! Embedded mode: the guard owns the device sockets and takes telemetry in itself; an
//! in-process rumqttd broker behind it, on loopback ports, serves everything else a broker is
//! for (subscriptions, publishes to other topics, retained messages, wills).
//!
//! Telemetry never passes through rumqttd, which acknowledges a publish before anyone has read
//! it and drops the oldest part of its in-memory log when a reader falls behind. What still
//! flows through it is the broker's business with its subscribers; its alerts (a subscriber's
//! cursor jumping past lost messages) are logged and counted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::{info, warn};

use super::{guard, IngestError, Intake};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::tasks::{Task, Tasks};

/// The running guard and broker.
pub struct Embedded {
    guard: Arc<guard::Guard>,
    serving: Task,
    alerts: Task,
}

/// Where rumqttd listens and what login it requires.
struct Listen {
    v4: SocketAddr,
    v5: SocketAddr,
    login: (String, String),
}

/// Starts the broker on its own threads and the guard in front of it.
pub async fn start(
    config: &Config,
    intake: Arc<Intake>,
    metrics: Arc<Metrics>,
    tasks: &Tasks,
) -> Result<Embedded, IngestError> {
    let mqtt = &config.mqtt;
    if config.auth.anonymous {
        warn!("auth.anonymous = true: any device that reaches the MQTT ports may publish");
    }
    let listeners = guard::bind(config).await?;
    let listen = Listen {
        v4: free_loopback_port()?,
        v5: free_loopback_port()?,
        login: guard::internal_login(),
    };
    let broker_config = broker_config(config, &listen)?;
    let mut broker = Broker::new(broker_config);
    let alerts = broker
        .alerts()
        .map_err(|e| IngestError::Broker(format!("no alerts link: {e}")))?;
    // rumqttd runs for as long as the process: its end, by error or panic, stops the gateway.
    let reporter = tasks.reporter();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            // The closure returns the error as text: rumqttd's error type is large.
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                broker.start().map_err(|e| e.to_string())
            }));
            let how = match started {
                Ok(Ok(())) => "ended on its own".to_owned(),
                Ok(Err(e)) => format!("stopped: {e}"),
                Err(_) => "panicked".to_owned(),
            };
            reporter.ended("embedded broker", how);
        })
        .map_err(|e| IngestError::Broker(format!("cannot start the broker thread: {e}")))?;
    let guard = Arc::new(guard::Guard::new(
        config,
        (listen.v4, listen.v5),
        listen.login,
        intake,
        metrics.clone(),
    )?);
    let serving = tasks.spawn(
        "guard",
        guard.clone().run(listeners, config.auth.reload_interval),
    );
    let alerts = tasks.spawn("broker alerts", watch_alerts(alerts, metrics));
    info!(
        v4 = %mqtt.listen,
        v5 = %mqtt.listen_v5,
        tls = ?mqtt.tls_listen,
        anonymous = config.auth.anonymous,
        bind_identity = config.auth.bind_identity,
        "listening for devices; telemetry ends in the gateway, the rest goes to the embedded broker"
    );
    Ok(Embedded {
        guard,
        serving,
        alerts,
    })
}

impl Embedded {
    /// Shutdown, first step: no new connections, no more reading from devices.
    pub async fn stop_reading(&mut self) {
        self.guard.stop_reading();
        self.serving.join().await;
    }

    /// Shutdown, last step: the acknowledgements still due are written and the connections
    /// closed.
    pub async fn close(mut self, grace: Duration) {
        self.guard.close(grace).await;
        self.alerts.abort().await;
    }
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
        auth: Some(HashMap::from([listen.login.clone()])),
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
        // +1 for the guard's start-up probe.
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

/// Logs the broker's alerts. A cursor jump means a subscriber fell behind the broker's log and
/// lost messages; rumqttd 0.20 does not say how many (its `lost` is always 0), so each jump
/// counts one in `gateway_broker_dropped_total`, at least one message.
async fn watch_alerts(alerts: rumqttd::alerts::AlertsLink, metrics: Arc<Metrics>) {
    while let Ok(batch) = alerts.next().await {
        for alert in batch {
            metrics.broker_alerts.inc();
            // AlertKind is not nameable outside rumqttd; its serde form is.
            let detail = serde_json::to_value(&alert).unwrap_or_default();
            if detail.to_string().contains("CursorJump") {
                metrics.broker_dropped.inc();
            }
            warn!(alert = %detail, "embedded broker alert");
        }
    }
}
