//! The connection to the broker: connect, subscribe, then read messages and write their
//! acknowledgements, reconnecting with a backoff when the connection is lost.
//!
//! rumqttc's codec frames the packets; its event loop is not used. That loop takes one
//! request (an acknowledgement) per turn while one network read brings up to ten packets, and
//! it reads whenever it is polled, so under a broker that delivers faster than the sink takes
//! the acknowledgements fell behind without limit (measured: 85,000 due and unsent, 860 MiB)
//! and the connection could not be left unread without also stopping the acknowledgements.
//! Here the reading half and the writing half of one connection are driven side by side: the
//! reader stops at `mqtt.receive_maximum` messages not yet acknowledged on the wire, the
//! writer sends the acknowledgements due at once, in one write, in the order their messages
//! arrived (as MQTT asks of a client), and pings the broker.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    Filter, Login, Packet, PingReq, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{Acks, Message, Pending};
use crate::config::Config;
use crate::ingest::IngestError;
use crate::metrics::Metrics;
use crate::retry::Backoff;

/// Connecting (TCP, TLS and the CONNACK) may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The packet id of the gateway's one SUBSCRIBE.
const SUBSCRIBE_ID: u16 = 1;

/// Why a connection ended or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The network or the broker went away: reconnect.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    #[error("nothing from the broker for {0:?} (keep-alive)")]
    Silent(Duration),
    #[error("the broker closed the connection")]
    Closed,
    #[error("the broker disconnected: {0:?}")]
    Disconnected(DisconnectReasonCode),
    /// The broker sent something this client cannot take: reconnect, and say what it was.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The broker refused the connection: the settings (credentials, client id, TLS) need
    /// a look; retried with the backoff.
    #[error("the broker refused the connection: {0:?}")]
    Refused(ConnectReturnCode),
}

/// What the link needs from the configuration, checked at start.
pub struct Settings {
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    connect: Connect,
    login: Option<Login>,
    /// The largest packet taken from the broker (twice the largest payload the decoder takes:
    /// room for the topic and properties). The broker is told, and must not send bigger.
    max_packet: u32,
    filter: String,
}

impl Settings {
    pub fn new(config: &Config, filter: &str) -> Result<Self, IngestError> {
        let mqtt = &config.mqtt;
        let (host, port, tls) = parse_url(&mqtt.url)?;
        let tls = if tls {
            let config = crate::ingest::tls::client_config(mqtt)?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        let max_packet = (config.decode.max_payload_bytes.as_u64())
            .saturating_mul(2)
            .min(u64::from(u32::MAX)) as u32;
        let properties = ConnectProperties {
            session_expiry_interval: Some(
                u32::try_from(mqtt.session_expiry.as_secs()).unwrap_or(u32::MAX),
            ),
            receive_maximum: Some(mqtt.receive_maximum),
            max_packet_size: Some(max_packet),
            ..ConnectProperties::new()
        };
        let connect = Connect {
            keep_alive: u16::try_from(mqtt.keep_alive.as_secs()).unwrap_or(u16::MAX),
            client_id: mqtt.client_id.clone(),
            clean_start: false,
            properties: Some(properties),
        };
        let login = (!mqtt.username.is_empty())
            .then(|| Login::new(mqtt.username.clone(), mqtt.password.expose().to_owned()));
        Ok(Self {
            host,
            port,
            tls,
            connect,
            login,
            max_packet,
            filter: format!("$share/{}/{}", mqtt.group, filter),
        })
    }
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

/// What the link shares with the rest of external mode.
pub struct Shared {
    pub tx: mpsc::Sender<Message>,
    pub acks: Arc<Acks>,
    /// `mqtt.receive_maximum` slots: one per message from receipt to its acknowledgement on
    /// the wire.
    pub window: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    /// No more input: the link stops reading from the broker (what the broker sends from then
    /// on stays with it) and goes on sending acknowledgements.
    pub stop_input: CancellationToken,
    /// Send what is due, leave the session in place (DISCONNECT), and end.
    pub finish: CancellationToken,
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Connects, serves the connection until it is lost, and again, until `finish`.
pub async fn run(settings: Settings, shared: Shared) {
    let backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };
    let mut failures = 0u32;
    let mut was_up = false;
    loop {
        let attempt = tokio::select! {
            _ = shared.finish.cancelled() => break,
            c = tokio::time::timeout(CONNECT_TIMEOUT, connect(&settings)) => {
                c.unwrap_or(Err(LinkError::ConnectTimeout(CONNECT_TIMEOUT)))
            }
        };
        let outcome = match attempt {
            Ok((stream, buffer, connack)) => {
                failures = 0;
                was_up = true;
                info!(session_present = connack.session_present, group = %settings.filter, "connected to the broker");
                let keep_alive = connack
                    .properties
                    .as_ref()
                    .and_then(|p| p.server_keep_alive)
                    .unwrap_or(settings.connect.keep_alive);
                let result = serve(&settings, &shared, stream, buffer, keep_alive).await;
                shared.metrics.ingest_up.set(0);
                shared.acks.connection_lost();
                result
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => break,
            // Input is over: a new connection would have nothing to acknowledge (what the
            // lost one had due is delivered again by the broker anyway).
            Err(e) if shared.stop_input.is_cancelled() => {
                warn!(error = %e, "lost the broker while stopping");
                break;
            }
            Err(e) => {
                if was_up {
                    warn!(error = %e, "lost the broker; reconnecting");
                    was_up = false;
                } else if failures == 0 {
                    warn!(error = %e, "cannot reach the broker; retrying");
                }
                if let LinkError::Refused(_) = e {
                    error!(error = %e, "check mqtt.client_id, mqtt.username, mqtt.password and the broker's ACL");
                }
                failures += 1;
                tokio::select! {
                    _ = shared.finish.cancelled() => break,
                    _ = tokio::time::sleep(backoff.delay(failures, None)) => {}
                }
            }
        }
    }
    shared.metrics.ingest_up.set(0);
}

/// TCP (and TLS), CONNECT, CONNACK. The buffer keeps what came after the CONNACK.
async fn connect(settings: &Settings) -> Result<(Box<dyn Stream>, BytesMut, ConnAck), LinkError> {
    let tcp = TcpStream::connect((settings.host.as_str(), settings.port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Stream> = match &settings.tls {
        None => Box::new(tcp),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from(settings.host.clone())
                .map_err(|e| LinkError::Protocol(format!("{}: {e}", settings.host)))?;
            Box::new(connector.connect(name, tcp).await?)
        }
    };
    let connect = Packet::Connect(settings.connect.clone(), None, settings.login.clone());
    write_packets(&mut stream, &[connect]).await?;
    let mut buffer = BytesMut::with_capacity(8 * 1024);
    match read_packet(&mut stream, &mut buffer, settings.max_packet).await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok((stream, buffer, ack)),
        Packet::ConnAck(ack) => Err(LinkError::Refused(ack.code)),
        other => Err(LinkError::Protocol(format!(
            "expected CONNACK, got {}",
            packet_name(&other)
        ))),
    }
}

/// Subscribes, then reads and writes side by side until the connection is lost (`Err`) or
/// `finish` (`Ok`, after the last acknowledgements and a DISCONNECT).
async fn serve(
    settings: &Settings,
    shared: &Shared,
    stream: Box<dyn Stream>,
    buffer: BytesMut,
    keep_alive: u16,
) -> Result<(), LinkError> {
    let (reader, mut writer) = tokio::io::split(stream);
    let subscribe = Subscribe {
        pkid: SUBSCRIBE_ID,
        ..Subscribe::new(Filter::new(settings.filter.clone(), QoS::AtLeastOnce), None)
    };
    write_packets(&mut writer, &[Packet::Subscribe(subscribe)]).await?;
    let keep_alive = Duration::from_secs(u64::from(keep_alive));
    let connection = shared.acks.connection();
    tokio::select! {
        r = read_loop(settings, shared, reader, buffer, keep_alive, connection) => r,
        r = write_loop(shared, &mut writer, keep_alive) => r,
    }
}

/// Reads packets: messages to the intake task, each taking a slot of the window first.
async fn read_loop(
    settings: &Settings,
    shared: &Shared,
    mut reader: impl AsyncRead + Unpin,
    mut buffer: BytesMut,
    keep_alive: Duration,
    connection: u64,
) -> Result<(), LinkError> {
    // The writer pings every keep-alive; a broker that answers nothing for two is gone.
    let silence = if keep_alive.is_zero() {
        Duration::MAX
    } else {
        keep_alive * 2
    };
    let mut seq = 0u64;
    loop {
        let packet = tokio::select! {
            biased;
            // No more input: leave what comes with the broker. The writer goes on.
            _ = shared.stop_input.cancelled() => return std::future::pending().await,
            p = tokio::time::timeout(silence, read_packet(&mut reader, &mut buffer, settings.max_packet)) => {
                p.map_err(|_| LinkError::Silent(silence))??
            }
        };
        match packet {
            Packet::Publish(publish) => {
                let Some(message) = take(shared, publish, connection, &mut seq).await else {
                    return std::future::pending().await;
                };
                if shared.tx.send(message).await.is_err() {
                    // The intake task has stopped: input is over.
                    return std::future::pending().await;
                }
            }
            Packet::SubAck(ack) => {
                let refused: Vec<_> = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .collect();
                if refused.is_empty() {
                    // Up once subscribed, not at CONNACK: a broker drops what is published
                    // to a topic nobody has subscribed to yet (seen in the benchmark: a
                    // fresh session's first messages).
                    shared.metrics.ingest_up.set(1);
                } else {
                    error!(codes = ?refused, filter = %settings.filter, "the broker refused the subscription (shared subscriptions and the topic ACL must allow it)");
                }
            }
            Packet::PingResp(_) => {}
            Packet::Disconnect(d) => return Err(LinkError::Disconnected(d.reason_code)),
            other => {
                return Err(LinkError::Protocol(format!(
                    "unexpected {} from the broker",
                    packet_name(&other)
                )))
            }
        }
    }
}

/// A message for the intake task, with its slot in the window when it needs an
/// acknowledgement. `None` when input has stopped while waiting for a slot. `seq` numbers the
/// connection's messages that need one, in order of receipt.
async fn take(
    shared: &Shared,
    publish: Publish,
    connection: u64,
    seq: &mut u64,
) -> Option<Message> {
    if publish.dup {
        shared.metrics.messages_redelivered.inc();
    }
    let ack = match publish.qos {
        QoS::AtMostOnce => None,
        // The subscription is QoS 1, so the broker sends nothing higher; a broker that does
        // gets a PUBACK, which it takes as the end of the exchange for QoS 1 and as a
        // protocol error for QoS 2 (it then delivers again).
        QoS::AtLeastOnce | QoS::ExactlyOnce => {
            let slot = tokio::select! {
                biased;
                _ = shared.stop_input.cancelled() => return None,
                s = shared.window.clone().acquire_owned() => s.ok()?,
            };
            *seq += 1;
            Some(Pending {
                pkid: publish.pkid,
                connection,
                seq: *seq - 1,
                _slot: crate::ingest::Unacked::new(slot, shared.metrics.clone()),
            })
        }
    };
    let content_type = publish.properties.and_then(|p| p.content_type);
    Some(Message {
        topic: publish.topic,
        payload: publish.payload,
        content_type,
        ack,
    })
}

/// Writes every acknowledgement as soon as it is due, and a ping every keep-alive; at
/// `finish`, the last acknowledgements and a DISCONNECT that leaves the session in place.
async fn write_loop(
    shared: &Shared,
    writer: &mut (impl AsyncWrite + Unpin),
    keep_alive: Duration,
) -> Result<(), LinkError> {
    let mut ping = (!keep_alive.is_zero()).then(|| {
        let first = tokio::time::Instant::now() + keep_alive;
        let mut ping = tokio::time::interval_at(first, keep_alive);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping
    });
    let mut out = BytesMut::new();
    loop {
        tokio::select! {
            biased;
            _ = shared.finish.cancelled() => {
                send_acks(shared, writer, &mut out).await?;
                let bye = Packet::Disconnect(Disconnect::new(DisconnectReasonCode::NormalDisconnection));
                write_packets(writer, &[bye]).await?;
                return Ok(());
            }
            _ = shared.acks.ready.notified() => send_acks(shared, writer, &mut out).await?,
            _ = async { ping.as_mut()?.tick().await; Some(()) }, if ping.is_some() => {
                write_packets(writer, &[Packet::PingReq(PingReq)]).await?;
            }
        }
    }
}

async fn send_acks(
    shared: &Shared,
    writer: &mut (impl AsyncWrite + Unpin),
    out: &mut BytesMut,
) -> Result<(), LinkError> {
    let due = shared.acks.take();
    if due.is_empty() {
        return Ok(());
    }
    out.clear();
    for pending in &due {
        encode(&Packet::PubAck(PubAck::new(pending.pkid, None)), out)?;
    }
    writer.write_all(out).await?;
    writer.flush().await?;
    shared.acks.sent(due.len());
    // Dropping them gives their slots back: the reader may go on.
    drop(due);
    Ok(())
}

fn encode(packet: &Packet, out: &mut BytesMut) -> Result<(), LinkError> {
    packet
        .write(out, None)
        .map(|_| ())
        .map_err(|e| LinkError::Protocol(format!("cannot encode {}: {e}", packet_name(packet))))
}

async fn write_packets(
    writer: &mut (impl AsyncWrite + Unpin),
    packets: &[Packet],
) -> Result<(), LinkError> {
    let mut out = BytesMut::new();
    for packet in packets {
        encode(packet, &mut out)?;
    }
    writer.write_all(&out).await?;
    writer.flush().await?;
    Ok(())
}

/// The next packet: from what is buffered, or read for. A message's topic and payload are
/// slices of the buffer it was read into, which lives until the intake task has decoded every
/// message in it: a few buffers of about a read each, at most one per message in the
/// intake channel.
async fn read_packet(
    reader: &mut (impl AsyncRead + Unpin),
    buffer: &mut BytesMut,
    max_packet: u32,
) -> Result<Packet, LinkError> {
    loop {
        match Packet::read(buffer, Some(max_packet)) {
            Ok(packet) => return Ok(packet),
            Err(CodecError::InsufficientBytes(more)) => {
                buffer.reserve(more.max(4096));
                if reader.read_buf(buffer).await? == 0 {
                    return Err(LinkError::Closed);
                }
            }
            Err(e) => return Err(LinkError::Protocol(e.to_string())),
        }
    }
}

fn packet_name(packet: &Packet) -> &'static str {
    match packet {
        Packet::Auth(_) => "AUTH",
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PingReq(_) => "PINGREQ",
        Packet::PingResp(_) => "PINGRESP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::Disconnect(_) => "DISCONNECT",
    }
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
