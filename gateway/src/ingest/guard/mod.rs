//! The guard: what stands between devices and the embedded broker, and where telemetry ends.
//!
//! rumqttd acknowledges a publish before anyone has read it, cannot tie a publish to the device
//! that sent it (a `Forward` carries no client id), its TLS pulls in another crypto stack, and
//! it refuses logins and excess connections without counting them. So the guard owns the
//! device-facing listeners (plain and TLS), authenticates each CONNECT (credentials file or
//! client certificate), and reads every packet the device sends:
//!
//! ```text
//! device ──▶ reader (session.rs) ──telemetry PUBLISH──▶ intake (decode, write-ahead log) ─┐
//!   ▲          └──everything else──▶ rumqttd (loopback, opened on first need) ──▶ subscribers
//!   └──────── writer (writer.rs) ◀── rumqttd's packets, whole ◀── PUBACK when safe ───────┘
//! ```
//!
//! A telemetry PUBLISH (its topic is the pattern's, [`crate::decode::TopicPattern::claims`])
//! is decoded by the gateway and never reaches rumqttd; its PUBACK (PUBREC for QoS 2) leaves
//! once the message is safe as `ingest.ack` says, in the order the device published, between
//! whole packets of rumqttd's. The guard answers CONNECT and PINGREQ itself and enforces the
//! device's keep-alive, so a device that only publishes telemetry never reaches rumqttd at all
//! (`upstream.rs`). Everything else (subscriptions, other topics, wills) is relayed to rumqttd,
//! which stays the broker for what a broker is for. A PUBLISH or a will under another device's
//! id, or a SUBSCRIBE outside the device's own topics, is refused and counted. rumqttd's own
//! listeners require a random per-process login that only the guard knows, so the loopback
//! ports are no way around it.

pub mod credentials;
pub mod packet;
mod session;
mod upstream;
mod writer;

use crate::events::{self, ConnectionClosed, ConnectionRefused};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use self::credentials::{Credentials, Verdict};
use self::packet::{Connect, Frame, PacketError, Refusal, Reply, ServerLimits};
use self::session::{Ending, Session};
use self::writer::Outbound;
use super::limit::RateLimiter;
use super::{IngestError, Intake, LogBudget};
use crate::config::Config;
use crate::decode::TopicPattern;
use crate::metrics::Metrics;

/// The CONNECT must arrive within this long of the TCP (and TLS) handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a device's DISCONNECT, how long the broker may take to close its side.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// How long a connection the guard ends stays open for the device to read its last packets,
/// unless the device closes first.
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// How often expired MQTT 5 sessions are ended in rumqttd.
const SESSION_SWEEP: Duration = Duration::from_secs(30);
/// When a connection ends on the guard's side (a violation, or a DISCONNECT with no broker
/// side), how long the acknowledgements owed for what came before may take: the messages may
/// be waiting for a sync of the write-ahead log, which a loaded disk can make slow.
const OWED_GRACE: Duration = Duration::from_secs(5);
/// A device's read buffer starts small (thousands of idle devices each hold one), grows to
/// the largest packet it has to hold, and shrinks back once the device is idle.
const READ_BUFFER: usize = 2 * 1024;

/// What the guard enforces, built from the configuration.
pub struct Guard {
    pattern: TopicPattern,
    credentials: Option<Arc<Credentials>>,
    anonymous: bool,
    bind_identity: bool,
    /// The largest packet a device may send (the broker's own limit).
    max_packet: usize,
    /// rumqttd's loopback listeners for MQTT 3.1.1 and 5.
    upstream_v4: SocketAddr,
    upstream_v5: SocketAddr,
    /// The login rumqttd requires; only the guard has it.
    login: (String, String),
    /// Which client ids rumqttd may hold a session for.
    sessions: upstream::Sessions,
    /// What MQTT 5 devices are told in CONNACK.
    limits: ServerLimits,
    connections: Arc<Semaphore>,
    connection_rate: Option<Mutex<RateLimiter>>,
    intake: Arc<Intake>,
    metrics: Arc<Metrics>,
    log_budget: LogBudget,
    /// Connections stop reading from their devices (shutdown, first step).
    stop_reading: CancellationToken,
    /// Connections write what they owe their devices and close (shutdown, last step).
    close: CancellationToken,
    tasks: TaskTracker,
}

/// Login for rumqttd's listeners: a name and a random password made at start.
pub fn internal_login() -> (String, String) {
    use rand::Rng;
    let password: String = rand::thread_rng()
        .sample_iter(rand::distributions::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    ("gateway-guard".to_owned(), password)
}

/// The device-facing listeners, bound before anything else starts so that a taken port is an
/// error at start-up.
pub struct Listeners {
    plain: Vec<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
}

pub async fn bind(config: &Config) -> Result<Listeners, IngestError> {
    let mut plain = Vec::new();
    for (key, addr) in [
        ("mqtt.listen", config.mqtt.listen),
        ("mqtt.listen_v5", config.mqtt.listen_v5),
    ] {
        plain.push(listen(key, addr).await?);
    }
    let tls = match config.mqtt.tls_listen {
        Some(addr) => {
            let server = super::tls::server_config(&config.mqtt)?;
            Some((
                listen("mqtt.tls_listen", addr).await?,
                TlsAcceptor::from(Arc::new(server)),
            ))
        }
        None => None,
    };
    Ok(Listeners { plain, tls })
}

/// Connections the kernel holds for the guard before it accepts them. A fleet reconnecting at
/// once overflows the usual 1,024, and a device whose SYN is dropped waits a second or more.
const ACCEPT_BACKLOG: u32 = 8192;

async fn listen(key: &'static str, addr: SocketAddr) -> Result<TcpListener, IngestError> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    bind().map_err(|source| IngestError::Bind { key, addr, source })
}

impl Guard {
    pub fn new(
        config: &Config,
        upstream: (SocketAddr, SocketAddr),
        login: (String, String),
        intake: Arc<Intake>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IngestError> {
        let pattern = TopicPattern::parse(&config.mqtt.topic)
            .map_err(|e| IngestError::Broker(format!("mqtt.topic: {e}")))?;
        let credentials = if config.auth.credentials_file.as_os_str().is_empty() {
            None
        } else {
            let c = Credentials::open(&config.auth.credentials_file)
                .map_err(|e| IngestError::Credentials(e.to_string()))?;
            metrics.credentials_devices.set(c.devices() as i64);
            Some(Arc::new(c))
        };
        let limits = &config.limits;
        Ok(Self {
            pattern,
            credentials,
            anonymous: config.auth.anonymous,
            bind_identity: config.auth.bind_identity,
            // The broker takes a little more, so that the guard, which counts what it
            // forwards, is the one that refuses.
            max_packet: broker_payload_limit(config),
            upstream_v4: upstream.0,
            upstream_v5: upstream.1,
            login,
            sessions: upstream::Sessions::default(),
            limits: ServerLimits {
                receive_maximum: session::MAX_UNACKED as u16,
                maximum_packet_size: u32::try_from(broker_payload_limit(config))
                    .unwrap_or(u32::MAX),
                topic_alias_maximum: session::TOPIC_ALIAS_MAXIMUM,
            },
            connections: Arc::new(Semaphore::new(config.mqtt.max_connections)),
            connection_rate: (limits.connection_rate > 0).then(|| {
                Mutex::new(RateLimiter::new(
                    limits.connection_rate,
                    limits.connection_burst,
                ))
            }),
            intake,
            metrics,
            log_budget: LogBudget::default(),
            stop_reading: CancellationToken::new(),
            close: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Shutdown, first step: stop accepting, and stop reading from devices. A message not yet
    /// read is not acknowledged: its device sends it to the next process.
    pub fn stop_reading(&self) {
        self.stop_reading.cancel();
    }

    /// Shutdown, last step: write what the connections owe their devices, close them, and
    /// return once they are closed (or after `grace`).
    pub async fn close(&self, grace: Duration) {
        self.close.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                connections = self.tasks.len(),
                "device connections still open at the end of shutdown"
            );
        }
    }

    /// Serves the listeners until [`Self::stop_reading`]; reloads the credentials file as it
    /// changes.
    pub async fn run(self: Arc<Self>, listeners: Listeners, reload: Duration) {
        // rumqttd binds on its own threads: accept devices only once it answers, or the first
        // ones would be cut.
        for _ in 0..500 {
            if self.probe().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(c) = &self.credentials {
            tasks.spawn(c.clone().watch(reload, self.metrics.clone()));
        }
        tasks.spawn(self.clone().expire_sessions());
        for l in listeners.plain {
            tasks.spawn(self.clone().accept(l, None));
        }
        if let Some((l, tls)) = listeners.tls {
            tasks.spawn(self.clone().accept(l, Some(tls)));
        }
        self.metrics.ingest_up.set(1);
        self.stop_reading.cancelled().await;
        self.metrics.ingest_up.set(0);
        tasks.abort_all();
    }

    /// Ends the sessions whose MQTT 5 expiry has passed, so that rumqttd does not hold them for
    /// ever (a device that comes back first has its expired session ended at its CONNECT).
    async fn expire_sessions(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SESSION_SWEEP);
        loop {
            tick.tick().await;
            for id in self.sessions.expired() {
                self.discard_session(&id).await;
            }
        }
    }

    /// Logs in to rumqttd's MQTT 3.1.1 listener and out again (a bare TCP probe makes it log
    /// errors). Its MQTT 5 listener starts in the same breath.
    async fn probe(&self) -> Result<(), upstream::UpstreamError> {
        upstream::log_in_and_out(self.upstream_v4, "gateway-guard-probe", &self.login).await
    }

    async fn accept(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors, mostly: wait instead of spinning.
                    warn!(error = %e, "cannot accept a device connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Some(rate) = &self.connection_rate {
                let admitted = rate.lock().map(|mut r| r.admit("", 1)).unwrap_or(true);
                if !admitted {
                    self.refused(events::Refusal::ConnectionRate, &peer, None);
                    continue;
                }
            }
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.refused(events::Refusal::TooManyConnections, &peer, None);
                continue;
            };
            let guard = self.clone();
            let tls = tls.clone();
            self.tasks.spawn(async move {
                guard.metrics.device_connections.inc();
                guard.connection(socket, peer, tls, permit).await;
                guard.metrics.device_connections.dec();
            });
        }
    }

    async fn connection(
        &self,
        socket: TcpStream,
        peer: SocketAddr,
        tls: Option<TlsAcceptor>,
        _permit: OwnedSemaphorePermit,
    ) {
        // Small packets both ways (PUBACKs, one reading): never wait for Nagle.
        let _ = socket.set_nodelay(true);
        let Some(tls) = tls else {
            return self.serve(socket, peer, None).await;
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, tls.accept(socket)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return self.refused(events::Refusal::TlsHandshake, &peer, Some(&e.to_string()))
            }
            Err(_) => return self.refused(events::Refusal::TlsHandshake, &peer, Some("timed out")),
        };
        let name = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|cert| super::tls::common_name(cert));
        let name = match name {
            None => None,
            Some(Ok(name)) => Some(name),
            Some(Err(e)) => return self.refused(events::Refusal::BadCertificate, &peer, Some(&e)),
        };
        self.serve(stream, peer, name).await
    }

    async fn serve<S>(&self, mut device: S, peer: SocketAddr, certified: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(READ_BUFFER);
        let frame = match read_frame(&mut device, &mut buf, self.max_packet).await {
            Ok(f) => f,
            Err(reason) => return self.refused(reason, &peer, None),
        };
        let connect = match Connect::parse(&buf[..frame.len], frame) {
            Ok(c) => c,
            Err(e) => {
                return self.refused(events::Refusal::ProtocolError, &peer, Some(&e.to_string()))
            }
        };
        let level = connect.level;
        let identity = match self.authenticate(&connect, certified).await {
            Ok(identity) => identity,
            Err((reason, refusal)) => {
                // Counted before the device can see the refusal.
                self.refused(reason, &peer, connect.username);
                let _ = device
                    .write_all(&packet::connack_refusal(level, refusal))
                    .await;
                return;
            }
        };
        // A device that sends no client id gets one (MQTT 5 says which in CONNACK); 3.1.1
        // allows that only for a clean session.
        let assigned = if connect.client_id.is_empty() {
            if level != 5 && !connect.clean_start() {
                self.refused(events::Refusal::EmptyClientId, &peer, None);
                let _ = device
                    .write_all(&packet::connack_refusal(level, Refusal::IdentifierRejected))
                    .await;
                return;
            }
            Some(assigned_client_id())
        } else {
            None
        };
        let own_id = assigned.as_deref().unwrap_or(connect.client_id);
        let client_id = match &identity {
            // A client id is scoped to its device, so that no device can take over (and so
            // disconnect) another device's session by reusing its client id.
            // (rumqttd refuses client ids with `/`, `+`, `#` or `$`.)
            Some(id) => format!("{id}:{own_id}"),
            None => own_id.to_owned(),
        };
        let hello = connect.rebuild(
            &client_id,
            &self.login.0,
            self.login.1.as_bytes(),
            upstream::BROKER_KEEP_ALIVE,
        );
        let found = match self.sessions.find(&client_id) {
            upstream::Found::Expired => {
                // rumqttd never expires a session; the guard makes it drop this one before
                // the device could resume it.
                self.discard_session(&client_id).await;
                upstream::Found::Nothing
            }
            found => found,
        };
        // Only rumqttd can publish a will or resume a session it holds.
        let opened = if connect.will_topic.is_some() || found == upstream::Found::Session {
            match upstream::open(self.upstream(level == 5), &hello).await {
                Ok(o) => Some(o),
                Err(upstream::UpstreamError::Refused(_, connack)) => {
                    self.refused(events::Refusal::BrokerRefused, &peer, None);
                    let _ = device.write_all(&connack).await;
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "the guard cannot reach the embedded broker");
                    return;
                }
            }
        } else {
            None
        };
        // A clean start is never told of a session, even one rumqttd resumed (keeps_session).
        let session_present =
            !connect.clean_start() && opened.as_ref().is_some_and(|o| o.session_present);
        let connack =
            packet::connack_accept(level, session_present, &self.limits, assigned.as_deref());
        // Flushed: TLS would keep it in its buffer until the next write.
        if device.write_all(&connack).await.is_err() || device.flush().await.is_err() {
            return;
        }
        let (keeps_session, keep_alive) = (connect.keeps_session(), connect.keep_alive());
        let session_expiry = connect.session_expiry;
        let (receive_maximum, max_packet) = (
            connect.receive_maximum,
            connect
                .maximum_packet_size
                .map_or(usize::MAX, |n| n as usize),
        );
        buf.advance(frame.len);
        let (mut from_device, to_device) = tokio::io::split(device);
        let (replies, replies_rx) = mpsc::unbounded_channel();
        let (on_behalf, mut on_behalf_rx) = mpsc::unbounded_channel();
        let (attach, attach_rx) = oneshot::channel();
        let outbound = Arc::new(Outbound::new(receive_maximum));
        let limits = writer::Limits {
            max_packet,
            outbound: outbound.clone(),
        };
        let mut writer = std::pin::pin!(writer::write_loop(
            attach_rx,
            to_device,
            replies_rx,
            on_behalf,
            limits,
            self.close.clone(),
        ));
        let mut session = Session::new(session::Setup {
            guard: self,
            identity: identity.as_deref(),
            v5: level == 5,
            client_id,
            keeps_session,
            session_expiry: (level == 5).then_some(session_expiry),
            keep_alive,
            hello,
            attach,
            replies,
            outbound,
        });
        if let Some(o) = opened {
            session.opened(o);
        }
        let relay = session.relay(&mut from_device, buf, &mut on_behalf_rx, &peer);
        let outcome = tokio::select! {
            outcome = relay => outcome,
            // The broker closed, or the device stopped taking what is written to it.
            _ = &mut writer => return,
        };
        if let Ending::Violation(reason, detail) = &outcome {
            ConnectionClosed {
                reason: *reason,
                device: identity.as_deref().unwrap_or(""),
                peer: &peer,
                detail,
            }
            .emit(&self.metrics, &self.log_budget);
            if session.v5() {
                session.reply_now(Reply::disconnect(session::disconnect_code(*reason)));
            }
        }
        let broker_open = session.broker_open();
        session.end();
        // Let the broker answer what it was sent (the PUBACKs of the packets before a
        // violation) and, after a DISCONNECT, close its side first: rumqttd 0.20 handles a
        // DISCONNECT and then the socket's close as two disconnections, and the second can cut
        // a device that just took the same connection slot. At shutdown, the writer delivers
        // the acknowledgements still due until the pipeline has them all. Without a broker
        // side, the writer ends once the replies are written.
        drop(session);
        let grace = match outcome {
            Ending::Closed => return,
            Ending::Stopped => return writer.await,
            Ending::Disconnected if broker_open => DISCONNECT_GRACE,
            Ending::Disconnected | Ending::Violation(..) => OWED_GRACE,
        };
        if tokio::time::timeout(grace, writer).await.is_err() {
            return;
        }
        // Everything owed is written. A device that was told nothing (3.1.1 has no DISCONNECT
        // from the server) gets a moment to read its last acknowledgements before the close:
        // clients that read data and the close together can drop the data (rumqttc over TLS
        // does). Reading meanwhile also keeps unread bytes from turning the close into a reset,
        // which would throw those acknowledgements away on the device's side.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            let mut sink = [0u8; 512];
            while matches!(from_device.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Makes rumqttd drop an expired session, if it is still expired.
    async fn discard_session(&self, client_id: &str) {
        if !self.sessions.forget_expired(client_id) {
            return;
        }
        if let Err(e) = upstream::log_in_and_out(self.upstream_v4, client_id, &self.login).await {
            warn!(error = %e, "cannot end an expired session in the embedded broker");
        }
    }

    /// rumqttd's loopback listener for the device's protocol version.
    fn upstream(&self, v5: bool) -> SocketAddr {
        if v5 {
            self.upstream_v5
        } else {
            self.upstream_v4
        }
    }

    /// The device's identity (`None` for an anonymous device), or why it may not connect.
    async fn authenticate(
        &self,
        connect: &Connect<'_>,
        certified: Option<String>,
    ) -> Result<Option<String>, (events::Refusal, Refusal)> {
        let identity = match (certified, connect.username) {
            (Some(name), Some(user)) if user != name => {
                return Err((events::Refusal::CertificateMismatch, Refusal::NotAuthorized))
            }
            // The client certificate is the stronger proof; a password adds nothing to it.
            (Some(name), _) => Some(name),
            (None, Some(user)) => match &self.credentials {
                Some(c) => match c.verify(user, connect.password.unwrap_or(b"")).await {
                    Verdict::Accepted => Some(user.to_owned()),
                    Verdict::UnknownDevice => {
                        return Err((events::Refusal::UnknownDevice, Refusal::BadCredentials))
                    }
                    Verdict::WrongPassword => {
                        return Err((events::Refusal::BadPassword, Refusal::BadCredentials))
                    }
                },
                None if self.anonymous => None,
                None => return Err((events::Refusal::UnknownDevice, Refusal::BadCredentials)),
            },
            (None, None) if self.anonymous => None,
            (None, None) => return Err((events::Refusal::Anonymous, Refusal::NotAuthorized)),
        };
        if let (Some(id), Some(topic)) = (&identity, connect.will_topic) {
            if self.bind_identity && !self.may_publish(id, topic) {
                return Err((
                    events::Refusal::WillIdentityMismatch,
                    Refusal::NotAuthorized,
                ));
            }
        }
        Ok(identity)
    }

    /// Telemetry topics must carry the device's own id; topics outside the pattern are left
    /// to the decoder, which refuses them as `bad_topic`.
    fn may_publish(&self, identity: &str, topic: &str) -> bool {
        self.pattern
            .match_topic(topic)
            .map_or(true, |(device, _)| device == identity)
    }

    fn refused(&self, reason: events::Refusal, peer: &SocketAddr, detail: Option<&str>) {
        ConnectionRefused {
            reason,
            peer,
            detail,
        }
        .emit(&self.metrics, &self.log_budget);
    }
}

/// The embedded broker takes payloads up to twice the decoder's limit, so that an oversized
/// payload is counted by the decoder instead of cutting the connection.
pub fn broker_payload_limit(config: &Config) -> usize {
    (config.decode.max_payload_bytes.as_u64() as usize).saturating_mul(2)
}

/// A client id for a device that sent none: unique within this process, and unlike any a
/// scoped device gets (those contain `:`).
fn assigned_client_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "gateway-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Reads until `buf` holds the first packet.
async fn read_frame<S: AsyncRead + Unpin>(
    device: &mut S,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Frame, events::Refusal> {
    let read = async {
        loop {
            match packet::frame(buf, limit) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(PacketError::TooLarge { .. }) => return Err(events::Refusal::PacketTooLarge),
                Err(PacketError::Malformed(_)) => return Err(events::Refusal::ProtocolError),
            }
            match device.read_buf(buf).await {
                Ok(0) | Err(_) => return Err(events::Refusal::ClosedBeforeConnect),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .unwrap_or(Err(events::Refusal::ConnectTimeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(topic: &str, payload_len: usize) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend(std::iter::repeat_n(b'x', payload_len));
        packet::framed(0x32, &body)
    }

    /// What a session made of a stream of packets.
    #[derive(Debug, PartialEq, Eq)]
    struct Fed {
        handled: usize,
        forwarded: usize,
        taken_in: u64,
        acknowledged: usize,
        ended: Option<&'static str>,
    }

    /// Feeds `stream` to a session `step` bytes at a time, as reads would deliver it.
    async fn feed(stream: &[u8], step: usize) -> Fed {
        let config = Config::from_toml("[auth]\nanonymous = true\n").expect("config");
        let metrics = Arc::new(Metrics::new());
        let (queue, _rx) = crate::queue::bounded(1000, 1 << 20, metrics.clone());
        let pattern = TopicPattern::parse(&config.mqtt.topic).expect("pattern");
        let intake = Arc::new(Intake::new(
            config.limits(),
            pattern,
            queue,
            super::super::Safe::Received,
            true,
            metrics.clone(),
            None,
            None,
        ));
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let guard = Guard::new(
            &config,
            (addr, addr),
            ("u".into(), "p".into()),
            intake,
            metrics.clone(),
        )
        .expect("guard");
        let (replies, mut replies_rx) = mpsc::unbounded_channel();
        let (attach, _attach_rx) = oneshot::channel();
        let mut session = Session::new(session::Setup {
            guard: &guard,
            identity: Some("dev-a"),
            v5: false,
            client_id: "dev-a:c".into(),
            keeps_session: false,
            session_expiry: None,
            keep_alive: 0,
            hello: Vec::new(),
            attach,
            replies,
            outbound: Arc::new(Outbound::new(u16::MAX)),
        });
        let (mut buf, mut handled, mut forwarded) = (Vec::new(), 0, 0);
        let mut ended = None;
        for chunk in stream.chunks(step) {
            buf.extend_from_slice(chunk);
            let (used, verdict) = session.handle_all(&buf).await;
            handled += used;
            forwarded += session.forward.len();
            session.forward.clear();
            buf.drain(..used);
            match verdict {
                Some(Ending::Violation(reason, _)) => {
                    ended = Some(reason.label());
                    break;
                }
                Some(_) => {
                    ended = Some("other");
                    break;
                }
                None => {}
            }
        }
        drop(session);
        let mut acknowledged = 0;
        while let Some(due) = replies_rx.recv().await {
            assert_eq!(due.seq, acknowledged as u64, "in publish order");
            assert_eq!(due.reply.as_bytes(), [0x40, 2, 0, 1], "PUBACK of packet 1");
            acknowledged += 1;
        }
        Fed {
            handled,
            forwarded,
            taken_in: metrics.messages_received.get(),
            acknowledged,
            ended,
        }
    }

    #[tokio::test]
    async fn packets_split_anywhere_are_taken_whole_and_a_foreign_device_stops_the_stream() {
        let mut stream = publish("telemetry/dev-a/env", 10);
        stream.extend(publish("telemetry/dev-a/env", 300));
        let other = publish("not/the/pattern/at/all", 5);
        stream.extend(&other);
        let allowed = stream.len();
        stream.extend(publish("telemetry/dev-b/env", 20));
        stream.extend(publish("telemetry/dev-a/env", 20));
        for step in [1, 2, 3, 7, 64, 333, stream.len()] {
            assert_eq!(
                feed(&stream, step).await,
                Fed {
                    handled: allowed,
                    forwarded: other.len(),
                    taken_in: 2,
                    acknowledged: 2,
                    ended: Some("identity_mismatch"),
                },
                "reads of {step} bytes"
            );
        }
        let own = publish("telemetry/dev-a/env", 1000);
        let fed = feed(&own, 5).await;
        assert_eq!((fed.handled, fed.taken_in, fed.ended), (own.len(), 1, None));
    }
}
