//! One simulated device: its own MQTT connection, with one task publishing and another
//! driving the connection's event loop.
//!
//! The two must be separate tasks: a publish waits for room in rumqttc's bounded request
//! channel, and only polling the event loop makes that room.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use crate::payload::{self, Encoding, Reading};

/// Unacknowledged QoS 1 publishes allowed per connection. Enough to keep a connection busy
/// without letting one device hide a stalled gateway behind a deep buffer.
const INFLIGHT: u16 = 100;
/// Capacity of the channel between the publishing task and the event loop.
const REQUEST_CHANNEL: usize = 100;
/// rumqttc's 10 KiB default would refuse large multi-reading payloads before the gateway could
/// count them; the gateway's own default limit is 256 KiB.
const MAX_PACKET_BYTES: usize = 1024 * 1024;
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// A connection with publishes outstanding and no acknowledgement for this long is given up.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    V4,
    V5,
}

/// Payload format of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Cbor,
    Json,
    /// Alternates per message, starting with CBOR.
    Mixed,
}

impl Format {
    pub fn encoding_of(self, message: u64) -> Encoding {
        match self {
            Format::Cbor => Encoding::Cbor,
            Format::Json => Encoding::Json,
            Format::Mixed if message.is_multiple_of(2) => Encoding::Cbor,
            Format::Mixed => Encoding::Json,
        }
    }
}

/// Everything the devices of a run share.
#[derive(Debug, Clone)]
pub struct Plan {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    /// QoS 1 when true, else QoS 0.
    pub qos1: bool,
    pub format: Format,
    pub messages: u64,
    pub readings_per_message: u32,
    pub measurement: String,
    pub topic_prefix: String,
    pub run_id: String,
    pub start_ms: i64,
    pub seed: u64,
    /// Messages per second per device; 0 for as fast as the connection allows.
    pub rate: f64,
}

/// How one device's run went.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    pub index: u32,
    pub device: String,
    /// Publishes written to the connection.
    pub published: u64,
    /// QoS 1 publishes the broker acknowledged.
    pub acked: u64,
    /// QoS 1 publishes the broker answered with a failure reason (MQTT 5 only).
    pub rejected: u64,
    /// Why the device stopped early, if it did.
    pub error: Option<String>,
}

/// Runs device `n` to completion: connects, publishes its messages, waits for their
/// acknowledgements (QoS 1) and disconnects. Failures end up in the report, not in a panic or
/// an `Err`, so that one bad connection does not hide the numbers of the others.
pub async fn run_device(plan: Arc<Plan>, n: u32) -> DeviceReport {
    let (client, connection) = connect(&plan, n);
    let (handed_tx, handed_rx) = oneshot::channel();
    let driver = tokio::spawn(drive(connection, client.clone(), plan.qos1, handed_rx));

    let mut handed = 0;
    let published = publish_all(&client, &plan, n, &mut handed).await;
    // Dropping our handle matters: the driver's clone is then the last one.
    drop(client);
    // The driver only needs this to know when it is done; if it already stopped, nobody is
    // listening and that is fine.
    let _ = handed_tx.send(handed);

    let mut report = DeviceReport {
        index: n,
        device: payload::device_name(n),
        ..Default::default()
    };
    match driver.await {
        Ok(driven) => {
            report.published = driven.published;
            report.acked = driven.acked;
            report.rejected = driven.rejected;
            report.error = driven.error;
        }
        Err(e) => report.error = Some(format!("event loop task failed: {e}")),
    }
    // The connection's error explains a failed publish better than "channel closed" does.
    if let (None, Err(e)) = (&report.error, published) {
        report.error = Some(format!("{e:#}"));
    }
    if let Some(e) = &report.error {
        tracing::warn!(device = %report.device, "{e}");
    }
    report
}

/// Hands every message of device `n` to the client, counting them in `handed`.
async fn publish_all(client: &Client, plan: &Plan, n: u32, handed: &mut u64) -> Result<()> {
    let device = payload::device_name(n);
    let topic = payload::topic(&plan.topic_prefix, &device, &plan.measurement);
    // Seeded per device so that a run can be repeated reading for reading.
    let mut rng =
        StdRng::seed_from_u64(plan.seed ^ u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut value: f64 = rng.gen_range(15.0..25.0);
    let mut ticker = (plan.rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate));
        // Catch up after a stall so that the average rate is the one asked for.
        t.set_missed_tick_behavior(MissedTickBehavior::Burst);
        t
    });
    let per_message = u64::from(plan.readings_per_message);
    let mut readings = Vec::with_capacity(plan.readings_per_message as usize);

    for message in 0..plan.messages {
        if let Some(t) = ticker.as_mut() {
            t.tick().await;
        }
        readings.clear();
        for r in 0..per_message {
            // A random walk looks like a sensor on a dashboard; rounding keeps payloads short.
            value += rng.gen_range(-0.5..0.5);
            let shown = (value * 1000.0).round() / 1000.0;
            readings.push(Reading::new(
                &plan.run_id,
                plan.start_ms,
                message * per_message + r,
                shown,
            ));
        }
        let encoding = plan.format.encoding_of(message);
        let bytes = payload::encode(&readings, encoding)?;
        client
            .publish(&topic, plan.qos1, bytes, encoding)
            .await
            .with_context(|| format!("publishing message {message}"))?;
        *handed += 1;
    }
    Ok(())
}

/// What the event loop saw.
struct Driven {
    published: u64,
    acked: u64,
    rejected: u64,
    error: Option<String>,
}

/// Polls the connection until every handed message is written (QoS 0) or answered (QoS 1),
/// then closes it.
///
/// There is no reconnect: with a clean session rumqttc drops unacknowledged publishes on
/// reconnect, so a retry would blur exactly the loss this tool is meant to measure. A
/// connection error ends the device and is reported.
async fn drive(
    mut connection: Connection,
    // Held, not used: dropping it would close the request channel under the event loop.
    _client: Client,
    qos1: bool,
    mut handed_rx: oneshot::Receiver<u64>,
) -> Driven {
    let mut d = Driven {
        published: 0,
        acked: 0,
        rejected: 0,
        error: None,
    };
    let mut handed: Option<u64> = None;
    let mut last_progress = Instant::now();

    loop {
        let finished = if qos1 {
            d.acked + d.rejected
        } else {
            d.published
        };
        if handed.is_some_and(|h| finished >= h) {
            // Everything is out and answered: close the socket without an MQTT DISCONNECT.
            // rumqttd 0.20 treats DISCONNECT-then-close as two disconnections and the second can
            // cut a device that is connecting at that moment (README, "Known issue"); a fleet
            // finishing at different times would hit it.
            break;
        }
        let outstanding = qos1 && d.published > d.acked + d.rejected;

        let polled = tokio::select! {
            polled = connection.poll() => polled,
            h = &mut handed_rx, if handed.is_none() => {
                // A dropped sender means the device task is gone; stop once what was
                // published so far is settled.
                handed = Some(h.unwrap_or(d.published));
                continue;
            }
            _ = tokio::time::sleep_until(last_progress + ACK_TIMEOUT), if outstanding => {
                d.error = Some(format!(
                    "no acknowledgement for {}s with {} publishes outstanding",
                    ACK_TIMEOUT.as_secs(),
                    d.published - d.acked - d.rejected
                ));
                break;
            }
        };
        match polled {
            Ok(Progress::Connected) => tracing::debug!("connected"),
            Ok(Progress::Published) => {
                if !outstanding {
                    last_progress = Instant::now();
                }
                d.published += 1;
            }
            Ok(Progress::Acked) => {
                d.acked += 1;
                last_progress = Instant::now();
            }
            Ok(Progress::Rejected(reason)) => {
                d.rejected += 1;
                last_progress = Instant::now();
                tracing::debug!("publish rejected: {reason}");
            }
            Ok(Progress::Disconnected) => break,
            Ok(Progress::Other) => {}
            Err(e) => {
                // Not `{e:#}`: rumqttc's errors already print their source.
                d.error = Some(format!("connection: {e}"));
                break;
            }
        }
    }
    d
}

fn connect(plan: &Plan, n: u32) -> (Client, Connection) {
    let id = payload::client_id(&plan.run_id, n);
    match plan.protocol {
        Protocol::V4 => {
            let mut opts = rumqttc::MqttOptions::new(id, plan.host.clone(), plan.port);
            opts.set_keep_alive(KEEP_ALIVE)
                .set_clean_session(true)
                .set_inflight(INFLIGHT)
                .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
            let (client, eventloop) = rumqttc::AsyncClient::new(opts, REQUEST_CHANNEL);
            (Client::V4(client), Connection::V4(Box::new(eventloop)))
        }
        Protocol::V5 => {
            let mut opts = rumqttc::v5::MqttOptions::new(id, plan.host.clone(), plan.port);
            opts.set_keep_alive(KEEP_ALIVE)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(INFLIGHT);
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, REQUEST_CHANNEL);
            (Client::V5(client), Connection::V5(Box::new(eventloop)))
        }
    }
}

/// The two rumqttc protocol versions behind one face; only what a device needs.
#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Boxed: the event loops are large and differ in size, and there is one per device anyway.
enum Connection {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The events a device counts.
enum Progress {
    Connected,
    Published,
    Acked,
    Rejected(String),
    Disconnected,
    Other,
}

impl Client {
    async fn publish(
        &self,
        topic: &str,
        qos1: bool,
        payload: Vec<u8>,
        encoding: Encoding,
    ) -> Result<()> {
        match self {
            Client::V4(c) => {
                let qos = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload).await?;
            }
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::{v5::PublishProperties, QoS};
                let qos = if qos1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                // MQTT 5 lets the gateway take the format from the content type instead of
                // sniffing the first byte.
                let props = PublishProperties {
                    content_type: Some(encoding.content_type().to_owned()),
                    ..Default::default()
                };
                c.publish_with_properties(topic, qos, false, payload, props)
                    .await?;
            }
        }
        Ok(())
    }
}

impl Connection {
    async fn poll(&mut self) -> Result<Progress> {
        use rumqttc::Outgoing;
        Ok(match self {
            Connection::V4(el) => {
                use rumqttc::{Event, Packet};
                match el.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => Progress::Connected,
                    Event::Incoming(Packet::PubAck(_)) => Progress::Acked,
                    Event::Outgoing(Outgoing::Publish(_)) => Progress::Published,
                    Event::Outgoing(Outgoing::Disconnect) => Progress::Disconnected,
                    _ => Progress::Other,
                }
            }
            Connection::V5(el) => {
                use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
                use rumqttc::v5::Event;
                match el.poll().await? {
                    Event::Incoming(Packet::ConnAck(_)) => Progress::Connected,
                    Event::Incoming(Packet::PubAck(ack)) => match ack.reason {
                        // Nobody subscribed is still a delivered publish.
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                            Progress::Acked
                        }
                        reason => Progress::Rejected(format!("{reason:?}")),
                    },
                    Event::Outgoing(Outgoing::Publish(_)) => Progress::Published,
                    Event::Outgoing(Outgoing::Disconnect) => Progress::Disconnected,
                    _ => Progress::Other,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_alternates_starting_with_cbor() {
        let got: Vec<_> = (0..4).map(|m| Format::Mixed.encoding_of(m)).collect();
        assert_eq!(
            got,
            [
                Encoding::Cbor,
                Encoding::Json,
                Encoding::Cbor,
                Encoding::Json
            ]
        );
        assert_eq!(Format::Json.encoding_of(0), Encoding::Json);
        assert_eq!(Format::Cbor.encoding_of(1), Encoding::Cbor);
    }
}
