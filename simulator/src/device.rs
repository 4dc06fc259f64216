//! One simulated device: its own MQTT connection, with one task publishing and another
//! driving the connection's event loop; dropped and opened again when its profile says so.
//!
//! The two must be separate tasks: a publish waits for room in rumqttc's bounded request
//! channel, and only polling the event loop makes that room.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use crate::config::Protocol;
use crate::generate::{Fate, Generator, Message};
use crate::payload::{self, Encoding};
use crate::profile::DevicePlan;
use crate::shared::{Sent, Shared};

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

/// How one device's run went.
#[derive(Debug, Clone, Default)]
pub struct DeviceReport {
    pub index: u32,
    pub device: String,
    /// Its clock's offset, ms.
    pub skew_ms: i64,
    /// Publishes written to the connection.
    pub published: u64,
    /// QoS 1 publishes the broker acknowledged.
    pub acked: u64,
    /// QoS 1 publishes the broker answered with a failure reason (MQTT 5 only).
    pub rejected: u64,
    /// Readings published that should land in the sink.
    pub readings_landing: u64,
    /// Readings published that the gateway should refuse, by its reason label.
    pub refused: BTreeMap<&'static str, u64>,
    /// Bad-input messages published, by kind.
    pub bad: BTreeMap<&'static str, u64>,
    /// Time from opening a connection to its CONNACK, per connection.
    pub connect_times: Vec<Duration>,
    /// QoS 1: time from each PUBLISH leaving to its PUBACK, per acknowledged message.
    pub ack_times: Vec<Duration>,
    /// Thundering herd: from the moment every device dropped to this one's CONNACK.
    pub herd_reconnect: Option<Duration>,
    /// Offline backlog: readings buffered while offline, and the oldest one's age when sent.
    pub backlog_readings: u64,
    pub backlog_max_age: Duration,
    /// Why the device stopped early, if it did.
    pub error: Option<String>,
}

/// Runs device `n` to completion. Failures end up in the report, not in a panic or an `Err`,
/// so that one bad connection does not hide the numbers of the others.
pub async fn run_device(shared: Arc<Shared>, n: u32) -> DeviceReport {
    let plan = DevicePlan::new(&shared.settings, n);
    let mut report = DeviceReport {
        index: n,
        device: payload::device_name(n),
        skew_ms: plan.skew_ms,
        ..Default::default()
    };
    if let Err(e) = lifecycle(&shared, n, &plan, &mut report).await {
        // The connection's error explains a failed publish better than "channel closed".
        report.error.get_or_insert_with(|| format!("{e:#}"));
    }
    if let Some(e) = &report.error {
        shared.counters.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(device = %report.device, "{e}");
    }
    report
}

async fn lifecycle(
    shared: &Arc<Shared>,
    n: u32,
    plan: &DevicePlan,
    report: &mut DeviceReport,
) -> Result<()> {
    let clock = &shared.clock;
    let mut generator = Generator::new(&shared.settings, &shared.run_id, n, plan.skew_ms);
    sleep_until(clock.at(plan.start)).await;
    let mut link = Some(Link::open(shared, n));
    let mut herd_done = false;
    // Messages measured while offline, with the instant each was measured.
    let mut backlog: Vec<(Message, Instant)> = Vec::new();

    for t in plan.schedule.clone() {
        if let (Some(at), false) = (plan.herd_at, herd_done) {
            if t >= at {
                // Everyone drops at the same instant and reconnects at once.
                let at = clock.at(at);
                sleep_until(at).await;
                close(&mut link, report).await?;
                let mut l = Link::open(shared, n);
                l.herd_from = Some(at);
                link = Some(l);
                herd_done = true;
            }
        }
        if let Some((from, to)) = plan.offline {
            if link.is_some() && t >= from && t < to {
                sleep_until(clock.at(from)).await;
                close(&mut link, report).await?;
            }
            if link.is_none() && t >= to {
                sleep_until(clock.at(to)).await;
                link = Some(Link::open(shared, n));
                for (message, measured) in backlog.drain(..) {
                    send(&mut link, report, message, measured, true).await?;
                }
            }
        }
        sleep_until(clock.at(t)).await;
        let message = generator.next(clock.now_ms())?;
        if link.is_some() {
            send(&mut link, report, message, Instant::now(), false).await?;
        } else {
            // Offline: the device keeps measuring and holds on to what it measured.
            backlog.push((message, Instant::now()));
        }
    }
    if let (None, Some((_, to))) = (&link, plan.offline) {
        // The schedule ended while offline: the device comes back when the outage ends.
        sleep_until(clock.at(to)).await;
        link = Some(Link::open(shared, n));
        for (message, measured) in backlog.drain(..) {
            send(&mut link, report, message, measured, true).await?;
        }
    }
    close(&mut link, report).await
}

/// Hands a message to the open link. When that fails the connection is gone: closing the
/// link puts the connection's own error, which says why, in the report.
async fn send(
    link: &mut Option<Link>,
    report: &mut DeviceReport,
    message: Message,
    measured: Instant,
    backlog: bool,
) -> Result<()> {
    let Some(l) = link.as_mut() else {
        anyhow::bail!("publishing without a connection");
    };
    if let Err(e) = l.publish(message, measured, backlog).await {
        close(link, report).await?;
        return Err(e);
    }
    Ok(())
}

/// Closes the link, if open, and adds its figures to the report. `Err` when the connection
/// failed, so that the device stops there.
async fn close(link: &mut Option<Link>, report: &mut DeviceReport) -> Result<()> {
    let Some(l) = link.take() else {
        return Ok(());
    };
    let (opened, herd_from) = (l.opened, l.herd_from);
    let t = l.close().await;
    if let (Some(from), Some(after)) = (herd_from, t.connected_after) {
        report.herd_reconnect = Some((opened + after).saturating_duration_since(from));
    }
    report.published += t.published;
    report.acked += t.acked;
    report.rejected += t.rejected;
    report.readings_landing += t.readings_landing;
    for (reason, n) in t.refused {
        *report.refused.entry(reason).or_default() += n;
    }
    for (kind, n) in t.bad {
        *report.bad.entry(kind).or_default() += n;
    }
    report.connect_times.extend(t.connected_after);
    report.ack_times.extend(t.ack_times);
    report.backlog_readings += t.backlog_readings;
    report.backlog_max_age = report.backlog_max_age.max(t.backlog_max_age);
    match t.error {
        Some(e) => {
            report.error = Some(e.clone());
            anyhow::bail!(e)
        }
        None => Ok(()),
    }
}

/// What the publishing side tells the driver about each message, in publish order.
struct Meta {
    fate: Fate,
    measured: Instant,
    backlog: bool,
}

/// One MQTT connection of a device.
struct Link {
    client: Client,
    driver: JoinHandle<Tally>,
    meta: mpsc::UnboundedSender<Meta>,
    handed: u64,
    handed_tx: oneshot::Sender<u64>,
    opened: Instant,
    /// Set on the connection opened when the herd reconnected: the herd's moment.
    herd_from: Option<Instant>,
}

impl Link {
    fn open(shared: &Arc<Shared>, n: u32) -> Link {
        let (client, connection) = connect(shared, n);
        let (handed_tx, handed_rx) = oneshot::channel();
        let (meta, meta_rx) = mpsc::unbounded_channel();
        let opened = Instant::now();
        let driver = tokio::spawn(drive(
            connection,
            client.clone(),
            Arc::clone(shared),
            n,
            meta_rx,
            handed_rx,
            opened,
        ));
        Link {
            client,
            driver,
            meta,
            handed: 0,
            handed_tx,
            opened,
            herd_from: None,
        }
    }

    async fn publish(&mut self, m: Message, measured: Instant, backlog: bool) -> Result<()> {
        let meta = Meta {
            fate: m.fate,
            measured,
            backlog,
        };
        // The driver holds the receiver until it ends, and then the publish below fails too.
        let _ = self.meta.send(meta);
        self.client
            .publish(m.topic, m.payload, m.encoding)
            .await
            .context("publishing")?;
        self.handed += 1;
        Ok(())
    }

    /// Waits until everything handed over is written (QoS 0) or answered (QoS 1), then closes
    /// the socket.
    async fn close(self) -> Tally {
        // If the driver already stopped, nobody listens and its tally says why.
        let _ = self.handed_tx.send(self.handed);
        // Dropping our handle matters: the driver's clone is then the last one.
        drop(self.client);
        match self.driver.await {
            Ok(t) => t,
            Err(e) => Tally {
                error: Some(format!("event loop task failed: {e}")),
                ..Default::default()
            },
        }
    }
}

/// What one connection's event loop saw.
#[derive(Default)]
struct Tally {
    published: u64,
    acked: u64,
    rejected: u64,
    readings_landing: u64,
    refused: BTreeMap<&'static str, u64>,
    bad: BTreeMap<&'static str, u64>,
    connected_after: Option<Duration>,
    ack_times: Vec<Duration>,
    backlog_readings: u64,
    backlog_max_age: Duration,
    error: Option<String>,
}

/// Polls the connection until every handed message is written (QoS 0) or answered (QoS 1),
/// then closes it, recording when each message went out.
///
/// There is no reconnect: with a clean session rumqttc drops unacknowledged publishes on
/// reconnect, so a retry would blur exactly the loss this tool is meant to measure. A
/// connection error ends the device and is reported.
async fn drive(
    mut connection: Connection,
    // Held, not used: dropping it would close the request channel under the event loop.
    client: Client,
    shared: Arc<Shared>,
    n: u32,
    mut meta_rx: mpsc::UnboundedReceiver<Meta>,
    mut handed_rx: oneshot::Receiver<u64>,
    opened: Instant,
) -> Tally {
    let qos1 = client.qos1;
    let counters = &shared.counters;
    let mut t = Tally::default();
    let mut handed: Option<u64> = None;
    let mut last_progress = Instant::now();
    let mut connected = false;
    // Packet id → when its PUBLISH left, until its PUBACK.
    let mut in_flight: HashMap<u16, Instant> = HashMap::new();

    loop {
        let finished = if qos1 {
            t.acked + t.rejected
        } else {
            t.published
        };
        if handed.is_some_and(|h| finished >= h) {
            // Everything is out and answered: close the socket without an MQTT DISCONNECT.
            // rumqttd 0.20 treats DISCONNECT-then-close as two disconnections and the second can
            // cut a device that is connecting at that moment (docs/contract.md, "Known issue"); a fleet
            // reconnecting at once would hit it.
            break;
        }
        let outstanding = qos1 && t.published > t.acked + t.rejected;

        let polled = tokio::select! {
            polled = connection.poll() => polled,
            h = &mut handed_rx, if handed.is_none() => {
                // A dropped sender means the device task is gone; stop once what was
                // published so far is settled.
                handed = Some(h.unwrap_or(t.published));
                continue;
            }
            _ = tokio::time::sleep_until(last_progress + ACK_TIMEOUT), if outstanding => {
                t.error = Some(format!(
                    "no acknowledgement for {}s with {} publishes outstanding",
                    ACK_TIMEOUT.as_secs(),
                    t.published - t.acked - t.rejected
                ));
                break;
            }
        };
        match polled {
            Ok(Progress::Connected) => {
                if !connected {
                    connected = true;
                    t.connected_after = Some(opened.elapsed());
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Progress::Published(pkid)) => {
                let now = Instant::now();
                if qos1 {
                    in_flight.insert(pkid, now);
                }
                if !outstanding {
                    last_progress = now;
                }
                t.published += 1;
                counters.published.fetch_add(1, Ordering::Relaxed);
                // Every publish handed over produces exactly one of these, in order, and its
                // Meta was queued before it.
                if let Ok(meta) = meta_rx.try_recv() {
                    account(&shared, n, &mut t, meta, now);
                }
            }
            Ok(Progress::Acked(pkid)) => {
                if let Some(sent) = in_flight.remove(&pkid) {
                    t.ack_times.push(sent.elapsed());
                }
                t.acked += 1;
                counters.acked.fetch_add(1, Ordering::Relaxed);
                last_progress = Instant::now();
            }
            Ok(Progress::Rejected(pkid, reason)) => {
                in_flight.remove(&pkid);
                t.rejected += 1;
                last_progress = Instant::now();
                tracing::debug!("publish rejected: {reason}");
            }
            Ok(Progress::Disconnected) => break,
            Ok(Progress::Other) => {}
            Err(e) => {
                // Not `{e:#}`: rumqttc's errors already print their source.
                t.error = Some(format!("connection: {e}"));
                break;
            }
        }
    }
    if connected {
        counters.connected.fetch_sub(1, Ordering::Relaxed);
    }
    t
}

/// Books one message that went out at `now`.
fn account(shared: &Shared, n: u32, t: &mut Tally, meta: Meta, now: Instant) {
    let readings = match meta.fate {
        Fate::Lands(ts) => {
            let count = ts.len() as u64;
            t.readings_landing += count;
            if let Some(tx) = &shared.sent {
                // The tracker outlives every device; if it is gone, the run is ending anyway.
                let _ = tx.send(Sent {
                    device: n,
                    ts,
                    at: now,
                });
            }
            count
        }
        Fate::Refused {
            reason,
            readings,
            bad,
        } => {
            *t.refused.entry(reason).or_default() += u64::from(readings);
            if let Some(kind) = bad {
                *t.bad.entry(kind.reason()).or_default() += 1;
            }
            u64::from(readings)
        }
    };
    if meta.backlog {
        t.backlog_readings += readings;
        t.backlog_max_age = t.backlog_max_age.max(now - meta.measured);
    }
}

fn connect(shared: &Shared, n: u32) -> (Client, Connection) {
    let b = &shared.settings.broker;
    let id = payload::client_id(&shared.run_id, n);
    let qos1 = b.qos == 1;
    let timeout = b.connect_timeout.as_secs().max(1);
    let access = &shared.access;
    match b.protocol {
        Protocol::V4 => {
            let will = b.will.then(|| format!("status/{id}"));
            let mut opts = rumqttc::MqttOptions::new(id, b.host.clone(), b.port);
            if let Some(topic) = will {
                opts.set_last_will(rumqttc::LastWill::new(
                    topic,
                    "offline",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                ));
            }
            opts.set_keep_alive(KEEP_ALIVE)
                .set_clean_session(true)
                .set_inflight(INFLIGHT)
                .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
            if let Some((user, password)) = &access.credentials {
                opts.set_credentials(user.clone(), password.clone());
            }
            if let Some(transport) = &access.transport {
                opts.set_transport(transport.clone());
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, REQUEST_CHANNEL);
            // A fleet connecting at once waits in the broker's accept queue.
            eventloop.network_options.set_connection_timeout(timeout);
            (
                Client {
                    inner: ClientInner::V4(client),
                    qos1,
                },
                Connection::V4(Box::new(eventloop)),
            )
        }
        Protocol::V5 => {
            let will = b.will.then(|| format!("status/{id}"));
            let mut opts = rumqttc::v5::MqttOptions::new(id, b.host.clone(), b.port);
            if let Some(topic) = will {
                opts.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                    topic,
                    "offline",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    None,
                ));
            }
            opts.set_keep_alive(KEEP_ALIVE)
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(INFLIGHT)
                .set_max_packet_size(Some(MAX_PACKET_BYTES as u32))
                .set_connection_timeout(timeout);
            if let Some((user, password)) = &access.credentials {
                opts.set_credentials(user.clone(), password.clone());
            }
            if let Some(transport) = &access.transport {
                opts.set_transport(transport.clone());
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(opts, REQUEST_CHANNEL);
            (
                Client {
                    inner: ClientInner::V5(client),
                    qos1,
                },
                Connection::V5(Box::new(eventloop)),
            )
        }
    }
}

/// The two rumqttc protocol versions behind one face; only what a device needs.
#[derive(Clone)]
struct Client {
    inner: ClientInner,
    qos1: bool,
}

#[derive(Clone)]
enum ClientInner {
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
    /// A PUBLISH left, with this packet id (0 at QoS 0).
    Published(u16),
    Acked(u16),
    Rejected(u16, String),
    Disconnected,
    Other,
}

impl Client {
    async fn publish(&self, topic: String, payload: Vec<u8>, encoding: Encoding) -> Result<()> {
        let qos1 = self.qos1;
        match &self.inner {
            ClientInner::V4(c) => {
                let qos = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload).await?;
            }
            ClientInner::V5(c) => {
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
                    Event::Incoming(Packet::PubAck(ack)) => Progress::Acked(ack.pkid),
                    Event::Outgoing(Outgoing::Publish(pkid)) => Progress::Published(pkid),
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
                            Progress::Acked(ack.pkid)
                        }
                        reason => Progress::Rejected(ack.pkid, format!("{reason:?}")),
                    },
                    Event::Outgoing(Outgoing::Publish(pkid)) => Progress::Published(pkid),
                    Event::Outgoing(Outgoing::Disconnect) => Progress::Disconnected,
                    _ => Progress::Other,
                }
            }
        })
    }
}
