//! External mode: the gateway subscribes to an existing broker (cluster) as a member of an
//! MQTT 5 shared-subscription group, so that several replicas split the load.
//!
//! Delivery: the session is persistent (`clean_start = false`, a session expiry) and a message
//! is acknowledged only when every reading in it is safe as `ingest.ack` says (by default
//! written, or parked in the dead-letter queue), or refused with a reason ([`super::Intake`]);
//! until then the broker keeps it, and gives it again (dup) to this gateway when it
//! reconnects, or to another member.
//!
//! Memory stays bounded whatever the broker does. At most `mqtt.receive_maximum` messages are
//! between receipt and their acknowledgement on the wire; the gateway asks the broker for
//! that limit, and enforces it itself by not reading the connection while it is reached
//! (mosquitto ignores the receive maximum). An acknowledgement due is a packet id, not the
//! message. Acknowledgements and pings have a writer of their own, so that they leave as
//! soon as they are due however busy the reading side is ([`link`]).

mod link;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{IngestError, Intake};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::tasks::{Task, Tasks};

pub use link::parse_url;

/// Messages read from the broker and not yet taken by the intake task. Small on purpose: a
/// message waiting here holds its payload, and a full channel stops the reading (push back
/// to the broker's TCP connection) without holding up acknowledgements.
const INTAKE_DEPTH: usize = 32;

/// The running connection: the intake task ends when input stops; the link goes on until
/// `finish` so that acknowledgements of what is still being written get out.
pub struct External {
    pub intake: Task,
    pub link: Task,
    pub finish: CancellationToken,
}

/// A message from the broker, on its way to the intake task.
struct Message {
    topic: Bytes,
    payload: Bytes,
    content_type: Option<String>,
    /// QoS 1: what its acknowledgement needs.
    ack: Option<Pending>,
}

/// A message that the broker waits to have acknowledged: its packet id on the connection
/// that delivered it, and its place in the window of `mqtt.receive_maximum` (given back once
/// the acknowledgement is on the wire, or when the message is given back to the broker
/// unacknowledged).
struct Pending {
    pkid: u16,
    connection: u64,
    /// Its place in the order of receipt on its connection: acknowledgements leave in that
    /// order (MQTT-4.6.0-2).
    seq: u64,
    _slot: super::Unacked,
}

/// Acknowledgements due, by packet id, for the link's writer to send.
struct Acks {
    state: Mutex<AckState>,
    ready: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct AckState {
    /// The connection now up (or the next one): a message from an earlier connection is
    /// never acknowledged on a later one, where its packet id may name another message; the
    /// broker sends it again instead.
    connection: u64,
    /// Due, by place in the order of receipt; sent from `next` on, without gaps.
    due: BTreeMap<u64, Pending>,
    next: u64,
}

impl Acks {
    fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            state: Mutex::new(AckState::default()),
            ready: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, AckState> {
        // Each change leaves the state consistent; a panic cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn connection(&self) -> u64 {
        self.lock().connection
    }

    /// The message is safe or refused: its acknowledgement is due.
    fn due(&self, pending: Pending) {
        let mut state = self.lock();
        if pending.connection != state.connection {
            return;
        }
        state.due.insert(pending.seq, pending);
        drop(state);
        self.metrics.acks_pending.inc();
        self.ready.notify_one();
    }

    /// What may be sent now, in order of receipt: every acknowledgement due up to the first
    /// message that is not safe yet. Later ones wait for it (a batch written ahead of an
    /// earlier one waits for it; they are all in the window meanwhile).
    fn take(&self) -> Vec<Pending> {
        let mut state = self.lock();
        let mut ready = Vec::new();
        loop {
            let next = state.next;
            let Some(pending) = state.due.remove(&next) else {
                break;
            };
            ready.push(pending);
            state.next += 1;
        }
        ready
    }

    /// The acknowledgements are on the wire.
    fn sent(&self, n: usize) {
        self.metrics.acks_pending.dec_by(n as i64);
    }

    /// The connection is gone: what is due on it is never sent (the broker delivers those
    /// messages again), and what settles later for it is dropped.
    fn connection_lost(&self) {
        let mut state = self.lock();
        state.connection += 1;
        state.next = 0;
        let dropped = std::mem::take(&mut state.due);
        drop(state);
        self.metrics.acks_pending.dec_by(dropped.len() as i64);
    }
}

pub fn start(
    config: &Config,
    intake: Intake,
    filter: String,
    metrics: Arc<Metrics>,
    stop_input: CancellationToken,
    cut_batch: Arc<Notify>,
    tasks: &Tasks,
) -> Result<External, IngestError> {
    let settings = link::Settings::new(config, &filter)?;
    let acks = Arc::new(Acks::new(metrics.clone()));
    let window = Arc::new(Semaphore::new(usize::from(config.mqtt.receive_maximum)));
    let (tx, mut rx) = mpsc::channel::<Message>(INTAKE_DEPTH);

    let stop = stop_input.clone();
    let acks_for_intake = acks.clone();
    let full = window.clone();
    let intake_task = tasks.spawn("mqtt intake", async move {
        loop {
            let message = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
            };
            let done = message.ack.map(|pending| {
                let acks = acks_for_intake.clone();
                // Refused or safe, the broker is answered: a refused message is not sent again.
                Box::new(move |_| acks.due(pending)) as crate::ack::Done
            });
            let topic = message.topic;
            let accepted = intake.accept(
                &topic,
                &message.payload,
                message.content_type.as_deref(),
                done,
            );
            // Intake::accept can be dropped at any await: what it had not taken stays
            // unacknowledged, and the broker delivers it again. Input stops at once even when
            // the queue is full because the sink is down.
            let closed = tokio::select! {
                biased;
                _ = stop.cancelled() => true,
                r = accepted => r.is_err(),
            };
            if closed {
                break;
            }
            // The window is full and everything received is in the pipeline: nothing more
            // comes until acknowledgements go out, so the batch waiting to fill goes now. (With
            // small messages a batch holds more readings than the window; it would otherwise
            // wait its whole linger.)
            if rx.is_empty() && full.available_permits() == 0 {
                cut_batch.notify_one();
            }
        }
    });

    let finish = CancellationToken::new();
    let link_task = tasks.spawn(
        "broker link",
        link::run(
            settings,
            link::Shared {
                tx,
                acks,
                window,
                metrics,
                stop_input,
                finish: finish.clone(),
            },
        ),
    );
    Ok(External {
        intake: intake_task,
        link: link_task,
        finish,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Message `seq` of connection `connection`, with packet id 100 + seq.
    fn pending(window: &Arc<Semaphore>, seq: u64, connection: u64) -> Pending {
        let metrics = Arc::new(Metrics::new());
        let slot = window
            .clone()
            .try_acquire_owned()
            .expect("room in the window");
        Pending {
            pkid: 100 + seq as u16,
            connection,
            seq,
            _slot: super::super::Unacked::new(slot, metrics),
        }
    }

    fn ids(sent: &[Pending]) -> Vec<u16> {
        sent.iter().map(|p| p.pkid).collect()
    }

    #[test]
    fn an_acknowledgement_due_holds_its_slot_until_sent_and_never_crosses_connections() {
        let metrics = Arc::new(Metrics::new());
        let acks = Acks::new(metrics.clone());
        let window = Arc::new(Semaphore::new(3));
        acks.due(pending(&window, 0, 0));
        acks.due(pending(&window, 1, 0));
        assert_eq!(metrics.acks_pending.get(), 2);
        assert_eq!(
            window.available_permits(),
            1,
            "due, not sent: the slots stay taken"
        );

        let late = pending(&window, 2, 0);
        acks.connection_lost();
        assert_eq!(metrics.acks_pending.get(), 0);
        assert_eq!(
            window.available_permits(),
            2,
            "the lost connection's acks are dropped"
        );
        acks.due(late);
        assert!(
            acks.take().is_empty(),
            "settled after its connection was lost"
        );
        assert_eq!(window.available_permits(), 3);

        acks.due(pending(&window, 0, 1));
        let sent = acks.take();
        assert_eq!(ids(&sent), [100], "the new connection counts from 0");
        acks.sent(sent.len());
        drop(sent);
        assert_eq!(metrics.acks_pending.get(), 0);
        assert_eq!(window.available_permits(), 3);
    }

    #[test]
    fn acknowledgements_leave_in_the_order_their_messages_arrived() {
        let acks = Acks::new(Arc::new(Metrics::new()));
        let window = Arc::new(Semaphore::new(10));
        acks.due(pending(&window, 2, 0));
        acks.due(pending(&window, 1, 0));
        assert!(acks.take().is_empty(), "message 0 is not safe yet");
        acks.due(pending(&window, 0, 0));
        acks.due(pending(&window, 4, 0));
        assert_eq!(ids(&acks.take()), [100, 101, 102]);
        acks.due(pending(&window, 3, 0));
        assert_eq!(ids(&acks.take()), [103, 104]);
    }
}
