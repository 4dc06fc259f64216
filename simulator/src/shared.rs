//! What the parts of a run share: the clock, the live counters, the record of what went out,
//! and the settings every device reads. A leaf: it names no other stage of the simulator.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Settings;
use crate::connect::Access;

/// Monotonic time with a wall-clock anchor: readings are stamped from it, so that a wall
/// clock step during a run cannot reorder or repeat a device's timestamps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_ms: i64,
}

impl Clock {
    pub fn start() -> Result<Clock> {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?;
        Ok(Clock {
            origin: Instant::now(),
            origin_ms: i64::try_from(wall.as_millis()).context("the clock is too far ahead")?,
        })
    }

    /// The instant `offset` after the start of the run.
    pub fn at(&self, offset: Duration) -> Instant {
        self.origin + offset
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Milliseconds since the epoch, now.
    pub fn now_ms(&self) -> i64 {
        self.origin_ms + self.origin.elapsed().as_millis() as i64
    }

    pub fn origin_ms(&self) -> i64 {
        self.origin_ms
    }
}

/// Live figures for the progress display; exact figures come from the device reports.
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub acked: AtomicU64,
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub verifying: AtomicBool,
    pub expected: AtomicU64,
    pub seen: AtomicU64,
}

/// A message that went out, for the latency tracker: the timestamps of its readings and when
/// it was written to the connection.
#[derive(Debug)]
pub struct Sent {
    pub device: u32,
    pub ts: Vec<i64>,
    pub at: Instant,
}

/// What every device of a run shares.
pub struct Shared {
    pub settings: Settings,
    pub run_id: String,
    pub clock: Clock,
    pub counters: Arc<Counters>,
    /// To the latency tracker, when the run is verified.
    pub sent: Option<mpsc::UnboundedSender<Sent>>,
    pub access: Access,
}
