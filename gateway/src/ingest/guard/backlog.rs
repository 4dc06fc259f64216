//! Push-back for the embedded broker: rumqttd acknowledges a publish before the gateway reads
//! it and, when the gateway falls further behind than its log holds, drops the oldest
//! messages. The guard sees every publish going in and the link reader every message coming
//! out, so between them they know how much of the broker's log is unread. Past half of the
//! log, the guard stops reading from devices: their TCP windows fill and they wait, instead
//! of their messages being dropped later.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

pub struct Backlog {
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    /// Read by the link, or dropped by the broker (counted too, so that a loss cannot leave
    /// the guard waiting for messages that will never come).
    consumed: AtomicU64,
    /// Unread bytes above which devices wait.
    limit: u64,
    /// The link reader is waiting for the broker (not for the queue).
    reader_idle: AtomicBool,
    room: Notify,
}

/// How long a paused device waits before it looks again, in case a wake-up was missed.
const RECHECK: Duration = Duration::from_millis(50);
/// A link that reads nothing for this long while devices wait is idle, not slow.
const STALLED: Duration = Duration::from_secs(5);

impl Backlog {
    /// `broker_log_bytes`: the broker's log, as rumqttd counts it (topic + payload + 4).
    pub fn new(broker_log_bytes: u64) -> Self {
        Self {
            forwarded: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            limit: broker_log_bytes / 2,
            reader_idle: AtomicBool::new(true),
            room: Notify::new(),
        }
    }

    /// A publish of `bytes` (topic + payload) went to the broker.
    pub fn forwarded(&self, bytes: u64) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(bytes + 4, Ordering::Relaxed);
    }

    /// `n` messages left the broker's log (read, or dropped).
    pub fn consumed(&self, n: u64) {
        self.consumed.fetch_add(n, Ordering::Relaxed);
        if self.unread_bytes() <= self.limit / 2 {
            self.room.notify_waiters();
        }
    }

    /// The link reader waits for the broker (`true`) or works and pushes to the queue.
    pub fn reader_idle(&self, idle: bool) {
        self.reader_idle.store(idle, Ordering::Relaxed);
    }

    /// Unread messages times the mean size of what went in.
    pub fn unread_bytes(&self) -> u64 {
        let forwarded = self.forwarded.load(Ordering::Relaxed);
        let unread = forwarded.saturating_sub(self.consumed.load(Ordering::Relaxed));
        if unread == 0 {
            return 0;
        }
        unread.saturating_mul(self.forwarded_bytes.load(Ordering::Relaxed) / forwarded.max(1))
    }

    /// Returns at once while the broker's log has room; otherwise when the link has caught up
    /// to half the limit. `true` when it had to wait.
    pub async fn room(&self) -> bool {
        if self.unread_bytes() <= self.limit {
            return false;
        }
        let mut last = self.consumed.load(Ordering::Relaxed);
        let mut still_since = tokio::time::Instant::now();
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.unread_bytes() <= self.limit / 2 {
                return true;
            }
            let _ = tokio::time::timeout(RECHECK, notified).await;
            let now = self.consumed.load(Ordering::Relaxed);
            if now != last {
                (last, still_since) = (now, tokio::time::Instant::now());
            } else if still_since.elapsed() >= STALLED && self.reader_idle.load(Ordering::Relaxed) {
                // The link waits for the broker with "unread" messages in its log: the count
                // has drifted (a publish the broker refused after the guard passed it). Start
                // counting afresh rather than hold every device forever. (A reader waiting for
                // room in the queue is push-back working, and devices keep waiting.)
                tracing::warn!(
                    unread = self.unread_bytes(),
                    "push-back count out of step with the broker; reset"
                );
                self.consumed
                    .store(self.forwarded.load(Ordering::Relaxed), Ordering::Relaxed);
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_past_the_limit_until_the_reader_catches_up() {
        let b = std::sync::Arc::new(Backlog::new(2000));
        for _ in 0..10 {
            b.forwarded(96);
        }
        assert_eq!(b.unread_bytes(), 1000);
        assert!(!b.room().await, "at the limit, not past it");
        b.forwarded(96);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "past the limit: waits");
        b.consumed(5);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "600 unread is above half the limit");
        b.consumed(2);
        assert!(waiter.await.expect("joined"), "400 unread: room again");
    }
}
