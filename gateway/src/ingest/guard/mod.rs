//! The guard: what stands between devices and the embedded broker when security is on.
//!
//! rumqttd cannot tie a publish to the device that sent it (a `Forward` carries no client id),
//! its TLS pulls in another crypto stack, and it refuses logins and excess connections
//! without counting them. So the guard owns the device-facing listeners (plain and TLS),
//! authenticates each CONNECT (credentials file or client certificate), and then relays the
//! connection to rumqttd on a loopback port, reading every packet the device sends: a PUBLISH
//! or a will under another device's id, or a SUBSCRIBE outside the device's own topics, closes
//! the connection and is counted. rumqttd's own listeners require a random per-process login
//! that only the guard knows, so the loopback ports are no way around it.
//!
//! Packets are checked where they lie in the read buffer and forwarded unchanged, in one write
//! per read; the broker's replies are copied back untouched.

pub mod backlog;
pub mod credentials;
pub mod packet;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::credentials::{Credentials, Verdict};
use self::packet::{Connect, Frame, PacketError, Refusal};
use super::limit::RateLimiter;
use super::IngestError;
use crate::config::Config;
use crate::decode::TopicPattern;
use crate::metrics::{Metrics, Reason};

/// The CONNECT must arrive within this long of the TCP (and TLS) handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After a device's DISCONNECT, how long the broker may take to close its side.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);
/// After a violation, how long the broker may take to acknowledge what came before it.
const VIOLATION_GRACE: Duration = Duration::from_millis(500);
/// A device's read buffer starts small (thousands of idle devices each hold one) and grows to
/// the largest packet it has to hold.
const READ_BUFFER: usize = 4 * 1024;

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
    connections: Arc<Semaphore>,
    connection_rate: Option<Mutex<RateLimiter>>,
    backlog: Arc<backlog::Backlog>,
    metrics: Arc<Metrics>,
    log_budget: LogBudget,
}

/// The guard runs unless the operator chose `mqtt.direct` (validated to need none of what
/// only the guard does).
pub fn wanted(config: &Config) -> bool {
    !config.mqtt.direct
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
        backlog: Arc<backlog::Backlog>,
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
            connections: Arc::new(Semaphore::new(config.mqtt.max_connections)),
            connection_rate: (limits.connection_rate > 0).then(|| {
                Mutex::new(RateLimiter::new(
                    limits.connection_rate,
                    limits.connection_burst,
                ))
            }),
            backlog,
            metrics,
            log_budget: LogBudget::default(),
        })
    }

    /// Serves the listeners until `stop` fires; reloads the credentials file as it changes.
    pub async fn run(
        self: Arc<Self>,
        listeners: Listeners,
        reload: Duration,
        stop: CancellationToken,
    ) {
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
        for l in listeners.plain {
            tasks.spawn(self.clone().accept(l, None));
        }
        if let Some((l, tls)) = listeners.tls {
            tasks.spawn(self.clone().accept(l, Some(tls)));
        }
        stop.cancelled().await;
        tasks.abort_all();
    }

    /// Logs in to rumqttd's MQTT 3.1.1 listener and out again (a bare TCP probe makes it log
    /// errors). Its MQTT 5 listener starts in the same breath.
    async fn probe(&self) -> std::io::Result<()> {
        let (user, password) = &self.login;
        let connect = packet::connect_v4("gateway-guard-probe", user, password.as_bytes(), 10);
        let mut broker = TcpStream::connect(self.upstream_v4).await?;
        broker.write_all(&connect).await?;
        let mut connack = [0u8; 4];
        broker.read_exact(&mut connack).await?;
        if connack != [0x20, 2, 0, 0] {
            return Err(std::io::Error::other(
                "the broker refused the guard's login",
            ));
        }
        broker.write_all(&[0xE0, 0]).await?;
        // Wait for the broker to close (see DISCONNECT_GRACE).
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(DISCONNECT_GRACE, broker.read_to_end(&mut rest)).await;
        Ok(())
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
                    self.refused("connection_rate", &peer, None);
                    continue;
                }
            }
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.refused("too_many_connections", &peer, None);
                continue;
            };
            let guard = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
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
            Ok(Err(e)) => return self.refused("tls_handshake", &peer, Some(&e.to_string())),
            Err(_) => return self.refused("tls_handshake", &peer, Some("timed out")),
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
            Some(Err(e)) => return self.refused("bad_certificate", &peer, Some(&e)),
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
            Err(e) => return self.refused("protocol_error", &peer, Some(&e.to_string())),
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
        let client_id = match &identity {
            // A client id is scoped to its device, so that no device can take over (and so
            // disconnect) another device's session by reusing its client id.
            // (rumqttd refuses client ids with `/`, `+`, `#` or `$`.)
            Some(id) if !connect.client_id.is_empty() => format!("{id}:{}", connect.client_id),
            _ => connect.client_id.to_owned(),
        };
        let upstream = if level == 5 {
            self.upstream_v5
        } else {
            self.upstream_v4
        };
        let mut broker = match TcpStream::connect(upstream).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "the guard cannot reach the embedded broker");
                return;
            }
        };
        let _ = broker.set_nodelay(true);
        let hello = connect.rebuild(&client_id, &self.login.0, self.login.1.as_bytes());
        buf.advance(frame.len);
        if broker.write_all(&hello).await.is_err() {
            return;
        }
        let (mut from_broker, mut to_broker) = broker.into_split();
        let (mut from_device, mut to_device) = tokio::io::split(device);
        let mut session = Session {
            guard: self,
            identity: identity.as_deref(),
            v5: level == 5,
            aliases: HashMap::new(),
        };
        let relay = session.relay(&mut from_device, &mut to_broker, buf);
        let outcome = tokio::select! {
            outcome = relay => outcome,
            _ = tokio::io::copy(&mut from_broker, &mut to_device) => return,
        };
        if let Outcome::Violation(reason, detail) = &outcome {
            self.metrics
                .connections_closed
                .get_or_create(&Reason { reason })
                .inc();
            if self.log_budget.allow() {
                warn!(
                    reason,
                    device = identity.as_deref().unwrap_or(""),
                    peer = %peer,
                    detail = %detail,
                    "device connection closed"
                );
            }
        }
        // Let the broker answer what it was sent (the PUBACKs of the packets before a
        // violation) and, after a DISCONNECT, close its side first: rumqttd 0.20 handles a
        // DISCONNECT and then the socket's close as two disconnections, and the second can cut
        // a device that just took the same connection slot.
        let grace = match outcome {
            Outcome::Closed => return,
            Outcome::Disconnected => DISCONNECT_GRACE,
            Outcome::Violation(..) => VIOLATION_GRACE,
        };
        let _ =
            tokio::time::timeout(grace, tokio::io::copy(&mut from_broker, &mut to_device)).await;
    }

    /// The device's identity (`None` for an anonymous device), or why it may not connect.
    async fn authenticate(
        &self,
        connect: &Connect<'_>,
        certified: Option<String>,
    ) -> Result<Option<String>, (&'static str, Refusal)> {
        let identity = match (certified, connect.username) {
            (Some(name), Some(user)) if user != name => {
                return Err(("certificate_mismatch", Refusal::NotAuthorized))
            }
            // The client certificate is the stronger proof; a password adds nothing to it.
            (Some(name), _) => Some(name),
            (None, Some(user)) => match &self.credentials {
                Some(c) => match c.verify(user, connect.password.unwrap_or(b"")).await {
                    Verdict::Accepted => Some(user.to_owned()),
                    Verdict::UnknownDevice => {
                        return Err(("unknown_device", Refusal::BadCredentials))
                    }
                    Verdict::WrongPassword => {
                        return Err(("bad_password", Refusal::BadCredentials))
                    }
                },
                None if self.anonymous => None,
                None => return Err(("unknown_device", Refusal::BadCredentials)),
            },
            (None, None) if self.anonymous => None,
            (None, None) => return Err(("anonymous", Refusal::NotAuthorized)),
        };
        if let (Some(id), Some(topic)) = (&identity, connect.will_topic) {
            if self.bind_identity && !self.may_publish(id, topic) {
                return Err(("will_identity_mismatch", Refusal::NotAuthorized));
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

    fn refused(&self, reason: &'static str, peer: &SocketAddr, detail: Option<&str>) {
        self.metrics
            .connections_refused
            .get_or_create(&Reason { reason })
            .inc();
        if self.log_budget.allow() {
            info!(reason, peer = %peer, detail = detail.unwrap_or(""), "device connection refused");
        }
    }
}

/// The embedded broker takes payloads up to twice the decoder's limit, so that an oversized
/// payload is counted by the decoder instead of cutting the connection.
pub fn broker_payload_limit(config: &Config) -> usize {
    (config.decode.max_payload_bytes.as_u64() as usize).saturating_mul(2)
}

/// Reads until `buf` holds the first packet.
async fn read_frame<S: AsyncRead + Unpin>(
    device: &mut S,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Frame, &'static str> {
    let read = async {
        loop {
            match packet::frame(buf, limit) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(PacketError::TooLarge { .. }) => return Err("packet_too_large"),
                Err(PacketError::Malformed(_)) => return Err("protocol_error"),
            }
            match device.read_buf(buf).await {
                Ok(0) | Err(_) => return Err("closed_before_connect"),
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read)
        .await
        .unwrap_or(Err("connect_timeout"))
}

enum Outcome {
    /// The device or the broker closed the connection.
    Closed,
    /// The device said DISCONNECT.
    Disconnected,
    /// The device broke a rule; the connection is closed.
    Violation(&'static str, String),
}

/// One device's connection after CONNECT.
struct Session<'g> {
    guard: &'g Guard,
    identity: Option<&'g str>,
    v5: bool,
    /// MQTT 5 topic aliases the device has set.
    aliases: HashMap<u16, String>,
}

const DISCONNECT: u8 = 14;

impl Session<'_> {
    async fn relay<R, W>(&mut self, device: &mut R, broker: &mut W, mut buf: BytesMut) -> Outcome
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let (ok, verdict) = self.check(&buf);
            if ok > 0 {
                if broker.write_all(&buf[..ok]).await.is_err() {
                    return Outcome::Closed;
                }
                buf.advance(ok);
            }
            if let Some(outcome) = verdict {
                return outcome;
            }
            if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                buf.reserve(buf.capacity().max(READ_BUFFER));
            }
            if self.guard.backlog.room().await {
                self.guard.metrics.ingest_paused.inc();
            }
            match device.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Outcome::Closed,
                Ok(_) => {}
            }
        }
    }

    /// How many bytes at the front of `buf` are whole packets that may pass, and what ends
    /// the connection after them, if anything.
    fn check(&mut self, buf: &[u8]) -> (usize, Option<Outcome>) {
        let mut at = 0;
        loop {
            let frame = match packet::frame(&buf[at..], self.guard.max_packet) {
                Ok(Some(f)) => f,
                Ok(None) => return (at, None),
                Err(e @ PacketError::TooLarge { .. }) => {
                    return (
                        at,
                        Some(Outcome::Violation("packet_too_large", e.to_string())),
                    )
                }
                Err(e) => {
                    return (
                        at,
                        Some(Outcome::Violation("protocol_error", e.to_string())),
                    )
                }
            };
            let bytes = &buf[at..at + frame.len];
            if let Err(outcome) = self.allowed(bytes, frame) {
                return (at, Some(outcome));
            }
            at += frame.len;
            if frame.kind == DISCONNECT {
                return (at, Some(Outcome::Disconnected));
            }
        }
    }

    fn allowed(&mut self, bytes: &[u8], frame: Frame) -> Result<(), Outcome> {
        let malformed = |e: PacketError| Outcome::Violation("protocol_error", e.to_string());
        match frame.kind {
            packet::PUBLISH => {
                let topic = packet::publish_topic(bytes, frame, self.v5).map_err(malformed)?;
                let name = match topic.alias {
                    Some(alias) if topic.name.is_empty() => match self.aliases.get(&alias) {
                        Some(name) => name.as_str(),
                        None => {
                            return Err(Outcome::Violation(
                                "protocol_error",
                                format!("unknown topic alias {alias}"),
                            ))
                        }
                    },
                    Some(alias) => {
                        self.aliases.insert(alias, topic.name.to_owned());
                        topic.name
                    }
                    None => topic.name,
                };
                if name.contains(['+', '#']) || name.starts_with('$') {
                    return Err(Outcome::Violation(
                        "protocol_error",
                        format!("publish to {name:?}"),
                    ));
                }
                if let Some(id) = self.identity {
                    if self.guard.bind_identity && !self.guard.may_publish(id, name) {
                        self.guard.metrics.reject("identity_mismatch", true);
                        return Err(Outcome::Violation(
                            "identity_mismatch",
                            format!("published to {name:?}"),
                        ));
                    }
                }
                // Topic and payload, near enough (packet id and properties count too): the
                // backlog needs the mean size, not an exact one.
                let body = frame.len - frame.header - 2 - topic.name.len();
                self.guard.backlog.forwarded((name.len() + body) as u64);
                Ok(())
            }
            packet::SUBSCRIBE => {
                let filters =
                    packet::subscribe_filters(bytes, frame, self.v5).map_err(malformed)?;
                match self.identity {
                    Some(id) if self.guard.bind_identity => {
                        match filters
                            .iter()
                            .find(|f| !self.guard.pattern.filter_within(f, id))
                        {
                            Some(f) => Err(Outcome::Violation(
                                "subscribe_denied",
                                format!("subscribed to {f:?}"),
                            )),
                            None => Ok(()),
                        }
                    }
                    _ => Ok(()),
                }
            }
            packet::CONNECT => Err(Outcome::Violation(
                "protocol_error",
                "a second CONNECT".to_owned(),
            )),
            _ => Ok(()),
        }
    }
}

/// At most this many connection events are logged a second; the counters keep the full count.
const LOG_PER_SEC: u32 = 20;

#[derive(Default)]
struct LogBudget {
    second: AtomicU64,
    used: AtomicU32,
}

impl LogBudget {
    fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        self.used.fetch_add(1, Ordering::Relaxed) < LOG_PER_SEC
    }
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

    /// Feeds `stream` to a session `step` bytes at a time, as reads would deliver it; returns
    /// the bytes forwarded and what ended it.
    fn feed(stream: &[u8], step: usize) -> (usize, Option<&'static str>) {
        let config = Config::from_toml("[auth]\nanonymous = true\n").expect("config");
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let guard = Guard::new(
            &config,
            (addr, addr),
            ("u".into(), "p".into()),
            Arc::new(backlog::Backlog::new(1 << 30)),
            Arc::new(Metrics::new()),
        )
        .expect("guard");
        let mut session = Session {
            guard: &guard,
            identity: Some("dev-a"),
            v5: false,
            aliases: HashMap::new(),
        };
        let (mut buf, mut forwarded) = (Vec::new(), 0);
        for chunk in stream.chunks(step) {
            buf.extend_from_slice(chunk);
            let (ok, verdict) = session.check(&buf);
            forwarded += ok;
            buf.drain(..ok);
            match verdict {
                Some(Outcome::Violation(reason, _)) => return (forwarded, Some(reason)),
                Some(_) => return (forwarded, Some("other")),
                None => {}
            }
        }
        (forwarded, None)
    }

    #[test]
    fn packets_split_anywhere_pass_whole_and_a_foreign_topic_stops_the_stream() {
        let mut stream = publish("telemetry/dev-a/env", 10);
        stream.extend(publish("telemetry/dev-a/env", 300));
        stream.extend(publish("not/the/pattern/at/all", 5));
        let allowed = stream.len();
        stream.extend(publish("telemetry/dev-b/env", 20));
        stream.extend(publish("telemetry/dev-a/env", 20));
        for step in [1, 2, 3, 7, 64, 333, stream.len()] {
            assert_eq!(
                feed(&stream, step),
                (allowed, Some("identity_mismatch")),
                "reads of {step} bytes"
            );
        }
        let own = publish("telemetry/dev-a/env", 1000);
        assert_eq!(feed(&own, 5), (own.len(), None));
    }
}
