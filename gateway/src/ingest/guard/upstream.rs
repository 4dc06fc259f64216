//! The broker's side of a device's connection, opened only when the device needs it.
//!
//! A device that only publishes telemetry never reaches rumqttd: the guard answers its CONNECT,
//! PINGREQs and publishes itself, so it costs one file descriptor and no broker session. The
//! first packet that is the broker's business (a SUBSCRIBE, a publish to another topic, a
//! retained telemetry value) opens the connection to rumqttd and replays the device's CONNECT
//! there. A device with a will, or one whose earlier connection left a session in rumqttd, gets
//! its broker side at once, because only rumqttd can publish that will or resume that session.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

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

/// Client ids whose broker side was opened with a session that outlives the connection:
/// rumqttd may hold subscriptions or messages for them, so their next connection opens its
/// broker side at once. rumqttd keeps sessions in memory only, and so does this.
#[derive(Default)]
pub(super) struct Sessions(Mutex<HashSet<String>>);

impl Sessions {
    pub fn has(&self, client_id: &str) -> bool {
        self.lock().contains(client_id)
    }

    /// Notes whether the broker keeps a session for `client_id` after this connection.
    pub fn set(&self, client_id: &str, kept: bool) {
        let mut s = self.lock();
        if kept {
            if !s.contains(client_id) {
                s.insert(client_id.to_owned());
            }
        } else {
            s.remove(client_id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
