//! The reading side of a device's connection after its CONNECT: every packet the device sends
//! is taken in (telemetry), answered by the guard (PINGREQ, a QoS 2 release of its own), or
//! passed on to the broker, whose side this opens on first need (`upstream`).

use crate::events::{Closing, ReadingsRejected, Rejection};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::warn;

use super::packet::{self, reason, Frame, PacketError, Reply};
use super::upstream::{self, BROKER_KEEP_ALIVE};
use super::writer::{Attach, Due, Outbound};
use super::{Guard, READ_BUFFER};
use crate::ack::Verdict;

/// Telemetry messages of one connection whose acknowledgement has not been written yet, at
/// most: past it the guard stops reading from that device until acknowledgements go out
/// (more than any client keeps in flight; it bounds what a device that never reads costs).
/// MQTT 5 devices are told it as the guard's receive maximum.
pub(super) const MAX_UNACKED: usize = 4096;
/// Topic aliases an MQTT 5 device may set on one connection.
pub(super) const TOPIC_ALIAS_MAXIMUM: u16 = 32;
/// The guard sends the broker a PINGREQ when it has sent it nothing for this long.
const BROKER_PING: Duration = Duration::from_secs(BROKER_KEEP_ALIVE as u64 / 2);
/// Far enough ahead to mean "no deadline" for a timer.
const NEVER: Duration = Duration::from_secs(86_400);

pub(super) enum Ending {
    /// The device or the broker closed the connection.
    Closed,
    /// The device said DISCONNECT.
    Disconnected,
    /// The device broke a rule; the connection is closed.
    Violation(Closing, String),
    /// Shutdown: no more reading from the device.
    Stopped,
}

/// The broker's side of this connection.
enum Broker {
    /// Not needed so far: the CONNECT to replay, and where the writer waits for the socket.
    Unopened {
        hello: Vec<u8>,
        attach: oneshot::Sender<Attach>,
    },
    Open {
        to_broker: OwnedWriteHalf,
        last_sent: Instant,
    },
}

/// What a session is built from.
pub(super) struct Setup<'g> {
    pub guard: &'g Guard,
    pub identity: Option<&'g str>,
    pub v5: bool,
    /// The client id rumqttd knows this device by.
    pub client_id: String,
    pub keeps_session: bool,
    /// MQTT 5's session expiry from CONNECT (`None` for 3.1.1).
    pub session_expiry: Option<u32>,
    pub keep_alive: u16,
    pub hello: Vec<u8>,
    pub attach: oneshot::Sender<Attach>,
    pub replies: mpsc::UnboundedSender<Due>,
    pub outbound: Arc<Outbound>,
}

pub(super) struct Session<'g> {
    pub(super) guard: &'g Guard,
    identity: Option<&'g str>,
    v5: bool,
    client_id: String,
    keeps_session: bool,
    session_expiry: Option<u32>,
    /// The number of this connection's broker opening, if rumqttd keeps its session.
    opening: Option<u64>,
    /// MQTT 5 topic aliases the device has set.
    aliases: HashMap<u16, String>,
    /// To the writer.
    replies: mpsc::UnboundedSender<Due>,
    next_seq: u64,
    unacked: Arc<Semaphore>,
    /// QoS 2 packet ids taken in and acknowledged with PUBREC, until their PUBREL.
    exactly_once: HashSet<u16>,
    /// 1.5 × the device's keep-alive: silent that long, it is cut as if the network had
    /// failed, and its will is published (MQTT §3.1.2.10). `None` for a keep-alive of 0.
    silence_limit: Option<Duration>,
    last_heard: Instant,
    broker: Broker,
    outbound: Arc<Outbound>,
    /// Packets for the broker from one read, written together.
    pub(super) forward: Vec<u8>,
}

impl<'g> Session<'g> {
    pub fn new(s: Setup<'g>) -> Self {
        Self {
            guard: s.guard,
            identity: s.identity,
            v5: s.v5,
            client_id: s.client_id,
            keeps_session: s.keeps_session,
            session_expiry: s.session_expiry,
            opening: None,
            aliases: HashMap::new(),
            replies: s.replies,
            next_seq: 0,
            unacked: Arc::new(Semaphore::new(MAX_UNACKED)),
            exactly_once: HashSet::new(),
            silence_limit: (s.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(s.keep_alive) * 1500)),
            last_heard: Instant::now(),
            broker: Broker::Unopened {
                hello: s.hello,
                attach: s.attach,
            },
            outbound: s.outbound,
            forward: Vec::new(),
        }
    }

    /// The broker's side is open: the reader writes to it, the writer reads from it.
    pub fn opened(&mut self, opened: upstream::Opened) {
        let opening = self
            .guard
            .sessions
            .opened(&self.client_id, self.keeps_session);
        self.opening = self.keeps_session.then_some(opening);
        let old = std::mem::replace(
            &mut self.broker,
            Broker::Open {
                to_broker: opened.to_broker,
                last_sent: Instant::now(),
            },
        );
        if let Broker::Unopened { attach, .. } = old {
            // The writer is gone only if the connection is ending anyway.
            let _ = attach.send(Attach {
                from_broker: opened.from_broker,
                pending: opened.pending,
            });
        }
    }

    pub fn broker_open(&self) -> bool {
        matches!(self.broker, Broker::Open { .. })
    }

    /// The connection is over: from now the session rumqttd keeps for it may expire.
    pub fn end(&self) {
        if let Some(opening) = self.opening {
            self.guard
                .sessions
                .ended(&self.client_id, opening, self.session_expiry);
        }
    }

    pub fn v5(&self) -> bool {
        self.v5
    }

    pub async fn relay<R>(
        &mut self,
        device: &mut R,
        mut buf: BytesMut,
        on_behalf: &mut mpsc::UnboundedReceiver<Reply>,
        peer: &SocketAddr,
    ) -> Ending
    where
        R: AsyncRead + Unpin,
    {
        let timer = tokio::time::sleep_until(self.next_wake().into());
        tokio::pin!(timer);
        loop {
            let (used, verdict) = self.handle_all(&buf).await;
            buf.advance(used);
            if let Err(outcome) = self.flush(peer).await {
                return outcome;
            }
            if let Some(outcome) = verdict {
                return outcome;
            }
            if buf.is_empty() && buf.capacity() > 2 * READ_BUFFER {
                // An idle device keeps a small buffer, whatever its largest message was.
                buf = BytesMut::with_capacity(READ_BUFFER);
            } else if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                buf.reserve(buf.capacity().max(READ_BUFFER));
            }
            let wake = self.next_wake();
            if wake < timer.deadline().into_std() {
                timer.as_mut().reset(wake.into());
            }
            tokio::select! {
                biased;
                _ = self.guard.stop_reading.cancelled() => return Ending::Stopped,
                Some(reply) = on_behalf.recv() => {
                    if let Err(outcome) = self.send_broker(reply.as_bytes()).await {
                        return outcome;
                    }
                }
                read = device.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Ending::Closed,
                    Ok(_) => self.last_heard = Instant::now(),
                },
                _ = &mut timer => {
                    let now = Instant::now();
                    if self.silence_limit.is_some_and(|limit| now >= self.last_heard + limit) {
                        return Ending::Violation(
                            Closing::KeepAliveTimeout,
                            format!("nothing heard for {:?}", now - self.last_heard),
                        );
                    }
                    if let Broker::Open { last_sent, .. } = &self.broker {
                        if now >= *last_sent + BROKER_PING {
                            if let Err(outcome) = self.send_broker(&[packet::PINGREQ << 4, 0]).await {
                                return outcome;
                            }
                        }
                    }
                    timer.as_mut().reset(self.next_wake().into());
                }
            }
        }
    }

    /// When the next keep-alive duty falls due: cutting a silent device, or pinging the broker.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let silence = self
            .silence_limit
            .map_or(now + NEVER, |limit| self.last_heard + limit);
        match &self.broker {
            Broker::Open { last_sent, .. } => silence.min(*last_sent + BROKER_PING),
            Broker::Unopened { .. } => silence,
        }
    }

    /// Writes what one read produced for the broker, opening the broker's side first if this is
    /// the first of it.
    async fn flush(&mut self, peer: &SocketAddr) -> Result<(), Ending> {
        if self.forward.is_empty() {
            return Ok(());
        }
        if matches!(self.broker, Broker::Unopened { .. }) {
            self.open(peer).await?;
        }
        let forward = std::mem::take(&mut self.forward);
        let written = self.send_broker(&forward).await;
        self.forward = forward;
        self.forward.clear();
        written
    }

    async fn send_broker(&mut self, bytes: &[u8]) -> Result<(), Ending> {
        match &mut self.broker {
            Broker::Open {
                to_broker,
                last_sent,
            } => {
                to_broker
                    .write_all(bytes)
                    .await
                    .map_err(|_| Ending::Closed)?;
                *last_sent = Instant::now();
                Ok(())
            }
            // Acknowledgements for a broker never opened: there is nothing to acknowledge.
            Broker::Unopened { .. } => Ok(()),
        }
    }

    /// Opens the broker's side now that the device needs it.
    async fn open(&mut self, peer: &SocketAddr) -> Result<(), Ending> {
        let Broker::Unopened { hello, .. } = &self.broker else {
            return Ok(());
        };
        let addr = self.guard.upstream(self.v5);
        let opened = match upstream::open(addr, hello).await {
            Ok(o) => o,
            Err(e) => {
                if self.guard.log_budget.allow() {
                    warn!(error = %e, peer = %peer, "cannot open the device's broker side; closing it");
                }
                return Err(Ending::Violation(Closing::BrokerRefused, e.to_string()));
            }
        };
        self.opened(opened);
        Ok(())
    }

    /// Handles the whole packets at the front of `buf`: how many bytes they took, and what
    /// ends the connection after them, if anything.
    pub(super) async fn handle_all(&mut self, buf: &[u8]) -> (usize, Option<Ending>) {
        let mut at = 0;
        loop {
            let frame = match packet::frame(&buf[at..], self.guard.max_packet) {
                Ok(Some(f)) => f,
                Ok(None) => return (at, None),
                Err(e @ PacketError::TooLarge { .. }) => {
                    return (
                        at,
                        Some(Ending::Violation(Closing::PacketTooLarge, e.to_string())),
                    )
                }
                Err(e) => {
                    return (
                        at,
                        Some(Ending::Violation(Closing::ProtocolError, e.to_string())),
                    )
                }
            };
            let bytes = &buf[at..at + frame.len];
            if let Err(outcome) = self.handle(bytes, frame).await {
                return (at, Some(outcome));
            }
            at += frame.len;
            if frame.kind == packet::DISCONNECT {
                return (at, Some(Ending::Disconnected));
            }
        }
    }

    /// One packet: taken in (telemetry), answered, or queued for the broker.
    async fn handle(&mut self, bytes: &[u8], frame: Frame) -> Result<(), Ending> {
        let malformed = |e: PacketError| Ending::Violation(Closing::ProtocolError, e.to_string());
        packet::sent_by_device(frame).map_err(malformed)?;
        match frame.kind {
            packet::PUBLISH => {
                let publish = packet::publish(bytes, frame, self.v5).map_err(malformed)?;
                let name = self.topic_of(&publish)?;
                if name.contains(['+', '#']) {
                    return Err(Ending::Violation(
                        Closing::ProtocolError,
                        format!("publish to {name:?}"),
                    ));
                }
                if name.starts_with('$') {
                    // Reserved for the server (MQTT §4.7.2): refused, and never delivered to
                    // a subscriber whose filter starts with a wildcard.
                    self.refuse(&publish, Rejection::DollarTopic);
                    return Ok(());
                }
                if !self.guard.intake.is_telemetry(&name) {
                    if publish.alias.is_some() {
                        let named = packet::with_topic(bytes, frame, &name).map_err(malformed)?;
                        self.forward.extend_from_slice(&named);
                    } else {
                        self.forward.extend_from_slice(bytes);
                    }
                    return Ok(());
                }
                if publish.utf8 && std::str::from_utf8(publish.payload).is_err() {
                    self.refuse(&publish, Rejection::PayloadFormatInvalid);
                    return Ok(());
                }
                self.telemetry(bytes, frame, &publish, &name).await
            }
            packet::PINGREQ => {
                self.reply_now(Reply::pingresp());
                Ok(())
            }
            packet::PUBREL => {
                let id = packet::packet_id(bytes, frame).map_err(malformed)?;
                if self.exactly_once.remove(&id) {
                    self.reply_now(Reply::new(packet::PUBCOMP, id, reason::SUCCESS, self.v5));
                } else {
                    self.forward.extend_from_slice(bytes);
                }
                Ok(())
            }
            // The device answers the broker's messages.
            packet::PUBACK | packet::PUBREC | packet::PUBCOMP => {
                let (id, code) = packet::ack_of(bytes, frame).map_err(malformed)?;
                if frame.kind != packet::PUBREC || code >= 0x80 {
                    self.outbound.release(id);
                }
                if self.broker_open() {
                    self.forward.extend_from_slice(bytes);
                }
                Ok(())
            }
            packet::SUBSCRIBE => {
                let filters =
                    packet::subscribe_filters(bytes, frame, self.v5).map_err(malformed)?;
                if let Some(id) = self.identity.filter(|_| self.guard.bind_identity) {
                    if let Some(f) = filters
                        .iter()
                        .find(|f| !self.guard.pattern.filter_within(f, id))
                    {
                        return Err(Ending::Violation(
                            Closing::SubscribeDenied,
                            format!("subscribed to {f:?}"),
                        ));
                    }
                }
                self.forward.extend_from_slice(bytes);
                Ok(())
            }
            packet::DISCONNECT => {
                if self.v5 {
                    // MQTT 5 may change the session's expiry as it leaves.
                    if let Some(expiry) =
                        packet::disconnect_expiry(bytes, frame).map_err(malformed)?
                    {
                        self.session_expiry = Some(expiry);
                    }
                }
                // The broker needs it only to drop the will.
                if self.broker_open() {
                    self.forward.extend_from_slice(bytes);
                }
                Ok(())
            }
            packet::CONNECT => Err(Ending::Violation(
                Closing::ProtocolError,
                "a second CONNECT".to_owned(),
            )),
            // UNSUBSCRIBE: what a device leaves is its own affair.
            _ => {
                self.forward.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// The topic a PUBLISH goes to, through the device's MQTT 5 topic aliases.
    fn topic_of(&mut self, publish: &packet::Publish<'_>) -> Result<String, Ending> {
        let Some(alias) = publish.alias else {
            if publish.name.is_empty() {
                return Err(Ending::Violation(
                    Closing::ProtocolError,
                    "publish without a topic".to_owned(),
                ));
            }
            return Ok(publish.name.to_owned());
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAXIMUM {
            return Err(Ending::Violation(
                Closing::TopicAliasInvalid,
                format!("topic alias {alias} (at most {TOPIC_ALIAS_MAXIMUM})"),
            ));
        }
        if !publish.name.is_empty() {
            self.aliases.insert(alias, publish.name.to_owned());
            return Ok(publish.name.to_owned());
        }
        self.aliases.get(&alias).cloned().ok_or_else(|| {
            Ending::Violation(
                Closing::TopicAliasInvalid,
                format!("unknown topic alias {alias}"),
            )
        })
    }

    /// A publish refused whole: counted; MQTT 5 says why in its acknowledgement, 3.1.1 has no
    /// way to and acknowledges it.
    fn refuse(&mut self, publish: &packet::Publish<'_>, why: Rejection) {
        ReadingsRejected {
            reason: why,
            readings: 1,
            whole: true,
            topic: publish.name,
            why: "the message breaks a rule of MQTT",
        }
        .emit(&self.guard.metrics, &self.guard.log_budget);
        if let Some(id) = publish.packet_id {
            let kind = if publish.qos == 2 {
                packet::PUBREC
            } else {
                packet::PUBACK
            };
            self.reply_now(Reply::new(kind, id, reason_code(why), self.v5));
        }
    }

    /// A telemetry PUBLISH: decoded and taken in here, acknowledged once safe.
    async fn telemetry(
        &mut self,
        bytes: &[u8],
        frame: Frame,
        publish: &packet::Publish<'_>,
        name: &str,
    ) -> Result<(), Ending> {
        let kind = if publish.qos == 2 {
            packet::PUBREC
        } else {
            packet::PUBACK
        };
        if let Some(id) = self.identity {
            if self.guard.bind_identity && !self.guard.may_publish(id, name) {
                let detail = format!("published to {name:?}");
                ReadingsRejected {
                    reason: Rejection::IdentityMismatch,
                    readings: 1,
                    whole: true,
                    topic: name,
                    why: "published under another device's id",
                }
                .emit(&self.guard.metrics, &self.guard.log_budget);
                // MQTT 5 can refuse the one message and keep the connection; 3.1.1 cannot
                // say no to a publish, so the connection closes.
                return match publish.packet_id {
                    Some(pid) if self.v5 => {
                        self.reply_now(Reply::new(kind, pid, reason::NOT_AUTHORIZED, true));
                        Ok(())
                    }
                    _ => Err(Ending::Violation(Closing::IdentityMismatch, detail)),
                };
            }
        }
        if publish.retain {
            // Subscribers still get the retained value from the broker.
            let copy = packet::at_qos0(bytes, frame);
            if publish.alias.is_some() {
                let f = packet::frame(&copy, usize::MAX).ok().flatten();
                if let Some(f) = f {
                    let named = packet::with_topic(&copy, f, name)
                        .map_err(|e| Ending::Violation(Closing::ProtocolError, e.to_string()))?;
                    self.forward.extend_from_slice(&named);
                }
            } else {
                self.forward.extend_from_slice(&copy);
            }
        }
        let done = match publish.packet_id {
            None => None,
            // A QoS 2 message sent again before its PUBREL was taken in already.
            Some(pid) if publish.qos == 2 && publish.dup && self.exactly_once.contains(&pid) => {
                self.reply_now(Reply::new(kind, pid, reason::SUCCESS, self.v5));
                return Ok(());
            }
            Some(pid) => {
                let slot = match self.unacked.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        // The device is not reading its acknowledgements: wait for room.
                        self.guard.metrics.ingest_paused.inc();
                        self.unacked
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| Ending::Closed)?
                    }
                };
                let slot = crate::ingest::Unacked::new(slot, self.guard.metrics.clone());
                if publish.qos == 2 {
                    self.exactly_once.insert(pid);
                }
                let (seq, replies, v5) = (self.take_seq(), self.replies.clone(), self.v5);
                let done: crate::ack::Done = Box::new(move |verdict| {
                    let code = match verdict {
                        Verdict::Accepted => reason::SUCCESS,
                        Verdict::Refused(why) => reason_code(why),
                    };
                    let _ = replies.send(Due {
                        seq,
                        reply: Reply::new(kind, pid, code, v5),
                        _slot: Some(slot),
                    });
                });
                Some(done)
            }
        };
        self.guard
            .intake
            .accept(name.as_bytes(), publish.payload, publish.content_type, done)
            .await
            .map_err(|_| Ending::Stopped)
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// A reply that needs no waiting, in its place after those still due.
    pub(super) fn reply_now(&mut self, reply: Reply) {
        let seq = self.take_seq();
        let _ = self.replies.send(Due {
            seq,
            reply,
            _slot: None,
        });
    }
}

/// The MQTT 5 reason code for a message refused whole (§3.4.2.1).
fn reason_code(why: Rejection) -> u8 {
    match why {
        Rejection::RateLimited | Rejection::QueueFull | Rejection::PayloadTooLarge => {
            reason::QUOTA_EXCEEDED
        }
        Rejection::BadTopic | Rejection::DollarTopic => reason::TOPIC_NAME_INVALID,
        Rejection::IdentityMismatch => reason::NOT_AUTHORIZED,
        _ => reason::PAYLOAD_FORMAT_INVALID,
    }
}

/// The MQTT 5 reason code of the DISCONNECT that ends a connection for `violation`.
pub(super) fn disconnect_code(violation: Closing) -> u8 {
    match violation {
        Closing::PacketTooLarge => reason::PACKET_TOO_LARGE,
        Closing::TopicAliasInvalid => reason::TOPIC_ALIAS_INVALID,
        Closing::KeepAliveTimeout => reason::KEEP_ALIVE_TIMEOUT,
        Closing::IdentityMismatch | Closing::SubscribeDenied => reason::NOT_AUTHORIZED,
        Closing::BrokerRefused => reason::UNSPECIFIED,
        Closing::ProtocolError => reason::PROTOCOL_ERROR,
    }
}
