//! A run: brings the fleet up, lets every device play its profile, watches the sink while it
//! does, and gathers the figures.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::{Settings, SinkKind};
use crate::connect::Access;
use crate::device::{self, DeviceReport};
use crate::profile::DevicePlan;
use crate::progress::Progress;
use crate::report::Summary;
use crate::shared::{Clock, Counters, Shared};
use crate::sys;
use crate::tracker::Tracker;
use crate::verify::{self, Sink, Verification};

pub async fn run(settings: Settings) -> Result<Summary> {
    let devices = settings.fleet.devices;
    sys::raise_open_files(u64::from(devices))?;
    let access = Access::new(&settings.broker)?;
    let clock = Clock::start()?;
    let run_id = if settings.fleet.run_id.is_empty() {
        // Milliseconds: two runs in the same second must not share an id, or each would count
        // the other's points as its own.
        format!("{}-{}", settings.fleet.seed, clock.origin_ms())
    } else {
        settings.fleet.run_id.clone()
    };
    let sink = match settings.verify.sink {
        SinkKind::None => None,
        kind => Some(Sink {
            kind,
            url: settings.verify.url.trim_end_matches('/').to_owned(),
            database: settings.verify.database.clone(),
        }),
    };
    let (sent_tx, sent_rx) = match sink {
        Some(_) => {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let counters = Arc::new(Counters::default());
    let bound: Option<u64> = (1..=devices)
        .map(|n| DevicePlan::new(&settings, n).schedule.bound())
        .sum();
    tracing::info!(
        run_id,
        devices,
        profile = ?settings.profile.name,
        "publishing to {}:{}",
        settings.broker.host,
        settings.broker.port
    );
    let progress = Progress::start(Arc::clone(&counters), bound, devices);
    let cpu_before = sys::cpu_time();

    let watcher = match (sink.clone(), sent_rx) {
        (Some(sink), Some(rx)) => {
            let query = verify::Query {
                measurement: settings.fleet.measurement.clone(),
                run_id: run_id.clone(),
            };
            let opts = verify::WatchOptions {
                poll_interval: settings.verify.poll_interval,
                timeout: settings.verify.timeout,
                devices,
            };
            let tracker = Tracker::new(clock.origin());
            let counters = Arc::clone(&counters);
            Some(tokio::spawn(async move {
                verify::watch(&sink, &query, rx, tracker, opts, &counters).await
            }))
        }
        _ => None,
    };

    let shared = Arc::new(Shared {
        settings,
        run_id,
        clock,
        counters: Arc::clone(&counters),
        sent: sent_tx,
        access,
    });
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for n in 1..=devices {
        tasks.spawn(device::run_device(Arc::clone(&shared), n));
    }
    let mut reports: Vec<DeviceReport> = Vec::with_capacity(devices as usize);
    while let Some(joined) = tasks.join_next().await {
        reports.push(joined.context("a device task panicked")?);
    }
    let elapsed = started.elapsed();
    let cpu = match (cpu_before, sys::cpu_time()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    reports.sort_by_key(|r| r.index);
    let (settings, run_id) = (shared.settings.clone(), shared.run_id.clone());
    // With the last sender gone (the drivers ended with their devices), the watcher knows that
    // publishing is over.
    drop(shared);

    counters.verifying.store(true, Ordering::Relaxed);
    let verification: Option<Result<Verification>> = match watcher {
        Some(w) => Some(w.await.context("the verifier panicked")?),
        None => None,
    };
    progress.finish();
    Ok(Summary::new(
        &settings,
        run_id,
        clock.origin_ms(),
        &reports,
        elapsed,
        cpu,
        verification,
    ))
}
