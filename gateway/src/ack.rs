//! Something due once a number of readings is settled (written to the sink or parked in the
//! dead-letter queue): a message's acknowledgement with `ingest.ack = "written"`, or the
//! release of a write-ahead log record. The readings travel in pieces (a message can be split
//! over batches, a batch bisected), each holding a clone; the last piece settled fires it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

/// How a message ended, as its acknowledgement reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its readings are safe (as `ingest.ack` defines safe); refused readings inside it are
    /// counted, but the message itself was taken.
    Accepted,
    /// Refused whole, for this reason (a `gateway_messages_rejected_total` reason). MQTT 5
    /// devices learn it from the PUBACK's reason code.
    Refused(crate::events::Rejection),
}

/// Sends a message's acknowledgement.
pub type Done = Box<dyn FnOnce(Verdict) + Send>;

/// Fires once, when every reading it stands for is settled.
pub type WhenSettled = Box<dyn FnOnce() + Send>;

/// A message's acknowledgement, shared by the pieces its readings travel in.
#[derive(Clone)]
pub struct Ack(Arc<Inner>);

struct Inner {
    remaining: AtomicU32,
    done: Mutex<Option<WhenSettled>>,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Ack({} readings outstanding)",
            self.0.remaining.load(Ordering::Relaxed)
        )
    }
}

impl Ack {
    /// Due after `readings` readings are settled; `done` is what is due.
    pub fn new(readings: u32, done: impl FnOnce() + Send + 'static) -> Self {
        Self(Arc::new(Inner {
            remaining: AtomicU32::new(readings),
            done: Mutex::new(Some(Box::new(done))),
        }))
    }

    /// `readings` of the message are safe; the last of them sends the acknowledgement.
    pub fn settle(&self, readings: u32) {
        let before = self
            .0
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(readings))
            })
            .unwrap_or(0);
        if before > 0 && before <= readings {
            let done = self.0.done.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(done) = done {
                done();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn acknowledged_once_when_every_piece_is_settled() {
        let acked = Arc::new(AtomicBool::new(false));
        let flag = acked.clone();
        let ack = Ack::new(10, move || {
            assert!(!flag.swap(true, Ordering::SeqCst), "acked twice")
        });
        let piece = ack.clone();
        ack.settle(4);
        assert!(!acked.load(Ordering::SeqCst));
        piece.settle(6);
        assert!(acked.load(Ordering::SeqCst));
        piece.settle(1);
    }
}
