//! Acknowledge only when safe (external mode): an MQTT message is acknowledged to its broker
//! once every reading it carried is written to the sink, parked in the dead-letter queue,
//! spilled to disk, or refused with a reason. Until then the broker keeps it and gives it again
//! to this gateway (or another member of its group) if this one goes away.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// Sends a message's acknowledgement.
pub type Done = Box<dyn FnOnce() + Send>;

/// A message's acknowledgement, shared by the pieces its readings travel in.
#[derive(Clone)]
pub struct Ack(Arc<Inner>);

struct Inner {
    remaining: AtomicU32,
    done: Mutex<Option<Done>>,
    metrics: Arc<Metrics>,
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
    /// An acknowledgement due after `readings` readings are settled; `done` sends it.
    pub fn new(readings: u32, metrics: Arc<Metrics>, done: impl FnOnce() + Send + 'static) -> Self {
        metrics.unacked_messages.inc();
        Self(Arc::new(Inner {
            remaining: AtomicU32::new(readings),
            done: Mutex::new(Some(Box::new(done))),
            metrics,
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
                self.0.metrics.unacked_messages.dec();
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
        let metrics = Arc::new(Metrics::new());
        let acked = Arc::new(AtomicBool::new(false));
        let flag = acked.clone();
        let ack = Ack::new(10, metrics.clone(), move || {
            assert!(!flag.swap(true, Ordering::SeqCst), "acked twice")
        });
        assert_eq!(metrics.unacked_messages.get(), 1);
        let piece = ack.clone();
        ack.settle(4);
        assert!(!acked.load(Ordering::SeqCst));
        piece.settle(6);
        assert!(acked.load(Ordering::SeqCst));
        assert_eq!(metrics.unacked_messages.get(), 0);
        piece.settle(1);
    }
}
