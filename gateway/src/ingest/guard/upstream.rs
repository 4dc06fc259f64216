//! The broker's side of a device's connection, opened only when the device needs it.
//!
//! A device that only publishes telemetry never reaches rumqttd: the guard answers its CONNECT,
//! PINGREQs and publishes itself, so it costs one file descriptor and no broker session. The
//! first packet that is the broker's business (a SUBSCRIBE, a publish to another topic, a
//! retained telemetry value) opens the connection to rumqttd and replays the device's CONNECT
//! there. A device with a will, or one whose earlier connection left a session in rumqttd, gets
//! its broker side at once, because only rumqttd can publish that will or resume that session.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::packet;

/// rumqttd refuses a keep-alive of 0, which MQTT allows: the guard gives it this one and keeps
/// the broker's side alive itself, whatever the device asked for.
pub(super) const BROKER_KEEP_ALIVE: u16 = 60;
/// How long rumqttd may take to answer the replayed CONNECT.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the broker's side could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    /// The broker refused the replayed CONNECT with this return or reason code.
    #[error("the broker refused the connection (code {0:#04x})")]
    Refused(u8, Vec<u8>),
    #[error("the broker did not answer the connection")]
    NoAnswer,
    #[error("cannot reach the broker: {0}")]
    Io(#[from] std::io::Error),
}

/// An open broker side: where the reader writes, and what the writer reads.
pub(super) struct Opened {
    pub to_broker: OwnedWriteHalf,
    pub from_broker: OwnedReadHalf,
    /// What the broker sent after its CONNACK in the same read.
    pub pending: BytesMut,
    pub session_present: bool,
}

/// Connects to rumqttd and replays `hello`, the device's CONNECT as the guard rebuilt it.
pub(super) async fn open(addr: SocketAddr, hello: &[u8]) -> Result<Opened, UpstreamError> {
    let mut broker = TcpStream::connect(addr).await?;
    let _ = broker.set_nodelay(true);
    broker.write_all(hello).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let read_connack = async {
        loop {
            if let Ok(Some(frame)) = packet::frame(&buf, usize::MAX) {
                return Ok::<_, UpstreamError>(frame);
            }
            if broker.read_buf(&mut buf).await? == 0 {
                return Err(UpstreamError::NoAnswer);
            }
        }
    };
    let frame = tokio::time::timeout(CONNACK_TIMEOUT, read_connack)
        .await
        .map_err(|_| UpstreamError::NoAnswer)??;
    let (session_present, code) =
        packet::connack_of(&buf, frame).map_err(|_| UpstreamError::NoAnswer)?;
    if code != 0 {
        return Err(UpstreamError::Refused(code, buf[..frame.len].to_vec()));
    }
    buf.advance(frame.len);
    let (from_broker, to_broker) = broker.into_split();
    Ok(Opened {
        to_broker,
        from_broker,
        pending: buf,
        session_present,
    })
}

/// Where rumqttd may hold a session for a client id, and until when (MQTT 5 session expiry,
/// which rumqttd does not implement: it keeps every session it was told to keep, for ever).
/// rumqttd keeps sessions in memory only, and so does this.
#[derive(Default)]
pub(super) struct Sessions(Mutex<SessionMap>);

#[derive(Default)]
struct SessionMap {
    held: HashMap<String, Held>,
    /// Numbers each opening, so that a connection taken over ends nothing of its successor's.
    next: u64,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    opening: u64,
    /// When the session expires once its connection has ended; `None` while it is open or
    /// when it never expires (3.1.1, or MQTT 5's 0xFFFFFFFF).
    until: Option<Instant>,
}

/// What rumqttd holds for a client id as a device connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// Nothing (as far as the guard knows).
    Nothing,
    /// A session to resume.
    Session,
    /// A session that has expired but that rumqttd still holds: discard it first.
    Expired,
}

impl Sessions {
    pub fn find(&self, client_id: &str) -> Found {
        match self.lock().held.get(client_id) {
            None => Found::Nothing,
            Some(Held { until: Some(t), .. }) if *t <= Instant::now() => Found::Expired,
            Some(_) => Found::Session,
        }
    }

    /// The broker side of `client_id` opened, and rumqttd keeps its session if `kept`: the
    /// number of this opening, for [`Self::ended`].
    pub fn opened(&self, client_id: &str, kept: bool) -> u64 {
        let mut s = self.lock();
        s.next += 1;
        let opening = s.next;
        if kept {
            s.held.insert(
                client_id.to_owned(),
                Held {
                    opening,
                    until: None,
                },
            );
        } else {
            s.held.remove(client_id);
        }
        opening
    }

    /// The connection that made `opening` ended; its session expires after `expiry` seconds
    /// (`None` or MQTT 5's 0xFFFFFFFF: never).
    pub fn ended(&self, client_id: &str, opening: u64, expiry: Option<u32>) {
        let mut s = self.lock();
        if let Some(held) = s.held.get_mut(client_id) {
            if held.opening == opening {
                held.until = expiry
                    .filter(|&secs| secs != u32::MAX)
                    .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
            }
        }
    }

    /// Forgets `client_id` if its session is still the expired one.
    pub fn forget_expired(&self, client_id: &str) -> bool {
        let mut s = self.lock();
        let expired = matches!(
            s.held.get(client_id),
            Some(Held { until: Some(t), .. }) if *t <= Instant::now()
        );
        if expired {
            s.held.remove(client_id);
        }
        expired
    }

    /// The client ids whose sessions have expired.
    pub fn expired(&self) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .held
            .iter()
            .filter(|(_, h)| h.until.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs in to rumqttd as `client_id` with a clean session and out again, then waits for
/// rumqttd to close (see the guard's DISCONNECT_GRACE for why): how the guard checks that
/// rumqttd answers, and how it makes rumqttd drop an expired session under that id.
pub(super) async fn log_in_and_out(
    addr: SocketAddr,
    client_id: &str,
    login: &(String, String),
) -> Result<(), UpstreamError> {
    let hello = packet::connect_v4(client_id, &login.0, login.1.as_bytes(), BROKER_KEEP_ALIVE);
    let mut opened = open(addr, &hello).await?;
    opened
        .to_broker
        .write_all(&[packet::DISCONNECT << 4, 0])
        .await?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(CONNACK_TIMEOUT, opened.from_broker.read_to_end(&mut rest)).await;
    Ok(())
}
