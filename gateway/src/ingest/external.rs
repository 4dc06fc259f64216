//! External mode: the gateway subscribes to an existing broker (cluster) as a member of an
//! MQTT 5 shared-subscription group, so that several replicas split the load.
//!
//! Delivery: the session is persistent (`clean_start = false`, a session expiry) and
//! acknowledgements are manual. A message is acknowledged only when every reading in it is
//! safe as `ingest.ack` says (by default written, or parked in the dead-letter queue), or
//! refused with a reason ([`super::Intake`]); until then the broker keeps it, and gives it again (dup) to this gateway
//! when it reconnects, or to another member. At most `mqtt.receive_maximum` messages are
//! unacknowledged at once, so a stalled sink pushes back to the broker.
//!
//! The event loop runs in its own task and is never blocked by the pipeline (it must keep
//! answering pings and sending acknowledgements); messages go to the intake task through a
//! channel as large as the receive maximum, which the broker cannot overrun.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{IngestError, Intake};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// The running connection: the intake task ends when input stops; the event loop goes on
/// until `finish` so that acknowledgements of what is still being written get out.
pub struct External {
    pub intake: tokio::task::JoinHandle<()>,
    pub events: tokio::task::JoinHandle<()>,
    pub finish: CancellationToken,
}

/// `mqtt://host[:1883]` or `mqtts://host[:8883]` → (host, port, TLS).
pub fn parse_url(url: &str) -> Result<(String, u16, bool), IngestError> {
    let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (rest, true, 8883)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (rest, false, 1883)
    } else {
        return Err(IngestError::Url(url.to_owned()));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => (
            host,
            port.parse().map_err(|_| IngestError::Url(url.to_owned()))?,
        ),
        _ => (rest, default_port),
    };
    if host.is_empty() {
        return Err(IngestError::Url(url.to_owned()));
    }
    Ok((host.trim_matches(['[', ']']).to_owned(), port, tls))
}

pub fn start(
    config: &Config,
    intake: Intake,
    filter: String,
    metrics: Arc<Metrics>,
    stop_input: CancellationToken,
) -> Result<External, IngestError> {
    let mqtt = &config.mqtt;
    let (host, port, tls) = parse_url(&mqtt.url)?;
    let mut opts = MqttOptions::new(mqtt.client_id.clone(), host, port);
    if tls {
        let config = super::tls::client_config(mqtt)?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    opts.set_keep_alive(mqtt.keep_alive);
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(
        u32::try_from(mqtt.session_expiry.as_secs()).unwrap_or(u32::MAX),
    ));
    opts.set_manual_acks(true);
    opts.set_receive_maximum(Some(mqtt.receive_maximum));
    let max_packet = (config.decode.max_payload_bytes.as_u64() as usize).saturating_mul(2) as u32;
    opts.set_max_packet_size(Some(max_packet));
    if !mqtt.username.is_empty() {
        opts.set_credentials(mqtt.username.clone(), mqtt.password.expose().to_owned());
    }
    // Acknowledgements travel on the request channel: room for all of them, so that a
    // try_ack never fails.
    let receive_maximum = usize::from(mqtt.receive_maximum);
    let (client, mut eventloop) = AsyncClient::new(opts, receive_maximum + 64);
    let shared = format!("$share/{}/{}", mqtt.group, filter);

    let (tx, mut rx) = mpsc::channel::<Publish>(receive_maximum + 16);
    // Acknowledgements go through their own task, which waits for room on the client's request
    // channel: one dropped acknowledgement would hold a slot of the broker's in-flight window
    // until the next reconnect. The channel is unbounded on purpose: it holds at most one entry
    // per unacknowledged message, and those are bounded by the queue and the batches in flight.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Publish>();
    let ack_client = client.clone();
    tokio::spawn(async move {
        while let Some(publish) = ack_rx.recv().await {
            if let Err(e) = ack_client.ack(&publish).await {
                // Only when the client is gone (shutdown): the broker redelivers, harmlessly.
                warn!(error = %e, "cannot send an acknowledgement");
                break;
            }
        }
    });
    let intake_task = tokio::spawn(async move {
        while let Some(publish) = rx.recv().await {
            let content_type = publish
                .properties
                .as_ref()
                .and_then(|p| p.content_type.clone());
            let ack_tx = ack_tx.clone();
            let p = publish.clone();
            // Refused or safe, the broker is answered: a refused message is not sent again.
            let done: crate::ack::Done = Box::new(move |_| {
                let _ = ack_tx.send(p);
            });
            if intake
                .accept(
                    &publish.topic,
                    &publish.payload,
                    content_type.as_deref(),
                    Some(done),
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });

    let finish = CancellationToken::new();
    let finish_events = finish.clone();
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };
    let events = tokio::spawn(async move {
        let mut connected = false;
        let mut failures = 0u32;
        let mut input = Some(tx);
        loop {
            let event = tokio::select! {
                biased;
                _ = finish_events.cancelled() => break,
                _ = stop_input.cancelled(), if input.is_some() => {
                    // No more input: what arrives from now on is not acknowledged, so the
                    // broker keeps it for the next member.
                    input = None;
                    continue;
                }
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    failures = 0;
                    connected = true;
                    info!(session_present = ack.session_present, group = %shared, "connected to the broker");
                    let filter = Filter::new(shared.clone(), QoS::AtLeastOnce);
                    if let Err(e) = client.subscribe_many([filter]).await {
                        error!(error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused: Vec<_> = ack
                        .return_codes
                        .iter()
                        .filter(|c| {
                            !matches!(
                                c,
                                rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                            )
                        })
                        .collect();
                    if refused.is_empty() {
                        // Up once subscribed, not at CONNACK: a broker drops what is published
                        // to a topic nobody has subscribed to yet (seen in the benchmark: a
                        // fresh session's first messages).
                        metrics.ingest_up.set(1);
                    } else {
                        error!(codes = ?refused, filter = %shared, "the broker refused the subscription (shared subscriptions and the topic ACL must allow it)");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if publish.dup {
                        metrics.messages_redelivered.inc();
                    }
                    if let Some(tx) = &input {
                        // Never blocks: the broker sends at most receive_maximum unacknowledged.
                        if tx.send(publish).await.is_err() {
                            input = None;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    metrics.ingest_up.set(0);
                    if connected {
                        warn!(error = %e, "lost the broker; reconnecting");
                        connected = false;
                    } else if failures == 0 {
                        warn!(error = %e, "cannot reach the broker; retrying");
                    }
                    failures += 1;
                    tokio::select! {
                        _ = finish_events.cancelled() => break,
                        _ = tokio::time::sleep(backoff.delay(failures, None)) => {}
                    }
                }
            }
        }
        metrics.ingest_up.set(0);
        // Leave the session in place on the broker: unacknowledged messages wait for us (or
        // go to the rest of the group).
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    });
    Ok(External {
        intake: intake_task,
        events,
        finish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let ok = |url: &str| parse_url(url).expect("valid");
        assert_eq!(
            ok("mqtt://127.0.0.1:1885"),
            ("127.0.0.1".into(), 1885, false)
        );
        assert_eq!(
            ok("mqtt://broker.local"),
            ("broker.local".into(), 1883, false)
        );
        assert_eq!(ok("mqtt://[::1]:1883"), ("::1".into(), 1883, false));
        assert_eq!(
            ok("mqtts://broker.local"),
            ("broker.local".into(), 8883, true)
        );
        assert!(matches!(parse_url("tcp://x:1"), Err(IngestError::Url(_))));
        assert!(matches!(
            parse_url("mqtt://x:notaport"),
            Err(IngestError::Url(_))
        ));
    }
}
