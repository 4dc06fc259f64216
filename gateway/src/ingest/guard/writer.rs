//! The writing side of a device's connection: the broker's packets, whole, and the guard's own
//! acknowledgements in the order their messages arrived, between them.
//!
//! The broker's side is attached only once the device first needs it (see `upstream`); until
//! then the writer carries the guard's replies alone. On the way to the device it enforces
//! what the device asked for in its MQTT 5 CONNECT and rumqttd does not: no packet larger than
//! the device's maximum packet size (such a message is dropped as if delivered, and the guard
//! acknowledges it to the broker on the device's behalf), and no more QoS 1 and 2 messages
//! unacknowledged than the device's receive maximum (the writer stops reading from the broker
//! until the device acknowledges one).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::packet::{self, reason, Reply};

/// A reply due to the device, numbered in the order its cause arrived.
pub(super) struct Due {
    pub seq: u64,
    pub reply: Reply,
    /// A place in the connection's window of unacknowledged messages, freed once written.
    pub _slot: Option<crate::ingest::Unacked>,
}

/// The broker's side of a connection, handed to the writer when it opens: the socket, and
/// what the broker sent after its CONNACK in the same read.
pub(super) struct Attach {
    pub from_broker: OwnedReadHalf,
    pub pending: BytesMut,
}

/// The broker's QoS 1 and 2 messages the device has not acknowledged yet, bounded by its
/// receive maximum; the reader releases them as the device's acknowledgements pass.
pub(super) struct Outbound {
    max: usize,
    in_flight: Mutex<HashSet<u16>>,
    room: Notify,
}

impl Outbound {
    pub fn new(receive_maximum: u16) -> Self {
        Self {
            max: usize::from(receive_maximum),
            in_flight: Mutex::new(HashSet::new()),
            room: Notify::new(),
        }
    }

    /// Whether message `id` may go to the device now (a resend of one in flight may).
    fn admit(&self, id: u16) -> bool {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if f.contains(&id) {
            return true;
        }
        if f.len() >= self.max {
            return false;
        }
        f.insert(id);
        true
    }

    /// The device has finished with message `id`.
    pub fn release(&self, id: u16) {
        let removed = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if removed {
            self.room.notify_one();
        }
    }
}

/// What the writer needs besides its channels.
pub(super) struct Limits {
    /// The largest packet the device takes.
    pub max_packet: usize,
    pub outbound: Arc<Outbound>,
}

/// Runs the writer. Ends when the broker or the device goes away; when the reader has gone
/// and every reply is written while no broker side is open (leaving the socket open); after a
/// DISCONNECT to the device; or at shutdown once the connection owes nothing more.
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    mut attach: oneshot::Receiver<Attach>,
    mut to_device: W,
    mut replies: mpsc::UnboundedReceiver<Due>,
    to_broker: mpsc::UnboundedSender<Reply>,
    limits: Limits,
    close: CancellationToken,
) {
    let mut broker: Option<(OwnedReadHalf, BytesMut)> = None;
    let mut attach_open = true;
    // QoS 2 messages dropped for their size and acknowledged on the device's behalf: their
    // PUBRELs are the guard's to answer.
    let mut on_behalf: HashSet<u16> = HashSet::new();
    // The next broker packet waits for the device to acknowledge one.
    let mut held = false;
    let mut out: Vec<u8> = Vec::new();
    let mut waiting: BTreeMap<u64, Due> = BTreeMap::new();
    let mut next = 0u64;
    // The reader is gone and every reply it promised has come in.
    let mut all_due = false;
    let mut closing = false;
    loop {
        let reading = broker.is_some() && !held;
        tokio::select! {
            read = async {
                match broker.as_mut() {
                    Some((from, buf)) => from.read_buf(buf).await,
                    None => std::future::pending().await,
                }
            }, if reading => {
                if !matches!(read, Ok(n) if n > 0) {
                    // The broker closed the session: so does the device's side (a FIN, which
                    // the device waits for after its DISCONNECT).
                    let _ = to_device.shutdown().await;
                    return;
                }
            }
            attached = &mut attach, if attach_open => {
                attach_open = false;
                if let Ok(a) = attached {
                    broker = Some((a.from_broker, a.pending));
                }
            }
            _ = limits.outbound.room.notified(), if held => held = false,
            due = replies.recv(), if !all_due => match due {
                Some(due) => {
                    waiting.insert(due.seq, due);
                    while let Ok(due) = replies.try_recv() {
                        waiting.insert(due.seq, due);
                    }
                }
                None => all_due = true,
            },
            // Shutdown: go once what is owed is written.
            _ = close.cancelled(), if !closing => closing = true,
        }
        if let Some((_, buf)) = broker.as_mut() {
            held = from_broker(buf, &mut out, &limits, &to_broker, &mut on_behalf);
        }
        let mut last = false;
        while let Some(due) = waiting.remove(&next) {
            out.extend_from_slice(due.reply.as_bytes());
            next += 1;
            if due.reply.is_disconnect() {
                // Nothing may follow a DISCONNECT.
                last = true;
                break;
            }
        }
        if !out.is_empty() {
            // Flushed, or TLS would keep the last acknowledgement in its buffer.
            if to_device.write_all(&out).await.is_err() || to_device.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        let owes_nothing = waiting.is_empty() && (all_due || (closing && replies.is_empty()));
        if last || (owes_nothing && closing) {
            let _ = to_device.shutdown().await;
            return;
        }
        if owes_nothing && broker.is_none() && !attach_open {
            // The reader has ended the connection and everything owed is written; the
            // connection closes after a moment for the device to read it (see `serve`).
            return;
        }
    }
}

/// Moves the broker's whole packets from `buf` to `out` as far as the device's limits allow;
/// `true` when the next one must wait for the device to acknowledge a message.
fn from_broker(
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    limits: &Limits,
    to_broker: &mpsc::UnboundedSender<Reply>,
    on_behalf: &mut HashSet<u16>,
) -> bool {
    while let Ok(Some(frame)) = packet::frame(buf, usize::MAX) {
        let bytes = &buf[..frame.len];
        match frame.kind {
            // Every PINGREQ the broker gets is the guard's own; the device's are answered by
            // the guard.
            packet::PINGRESP => {}
            packet::PUBLISH => {
                let (qos, id) = packet::publish_id(bytes, frame).unwrap_or((0, None));
                if frame.len > limits.max_packet {
                    // MQTT 5 §3.1.2.11.4: dropped, and handled as if the device had it.
                    match (qos, id) {
                        (1, Some(id)) => {
                            let _ = to_broker.send(Reply::new(packet::PUBACK, id, 0, true));
                        }
                        (2, Some(id)) => {
                            on_behalf.insert(id);
                            let _ = to_broker.send(Reply::new(packet::PUBREC, id, 0, true));
                        }
                        _ => {}
                    }
                } else {
                    if let Some(id) = id {
                        if !limits.outbound.admit(id) {
                            return true;
                        }
                    }
                    out.extend_from_slice(bytes);
                }
            }
            packet::PUBREL => match packet::packet_id(bytes, frame) {
                Ok(id) if on_behalf.remove(&id) => {
                    let _ = to_broker.send(Reply::new(packet::PUBCOMP, id, reason::SUCCESS, true));
                }
                _ => out.extend_from_slice(bytes),
            },
            _ => out.extend_from_slice(bytes),
        }
        buf.advance(frame.len);
    }
    false
}
