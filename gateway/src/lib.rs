//! Telemetry gateway: MQTT in, InfluxDB line protocol out, nothing dropped silently.
//!
//! The stages, in the order data flows through them:
//!
//! 1. [`ingest`]: MQTT messages from the embedded broker (rumqttd).
//! 2. [`decode`]: CBOR or JSON payload → readings → [`line_protocol`] lines, each bad reading
//!    refused with a reason.
//! 3. [`queue`]: bounded in readings and bytes; a full queue makes ingest wait.
//! 4. [`batch`]: lines → batches by size or linger, a bounded number in flight.
//! 5. [`deliver`] and [`sink`]: write to InfluxDB, [`retry`] what is worth retrying, account
//!    for every reading in [`metrics`], served by [`admin`].
//!
//! [`run`] wires them together; the binary and the tests both call it.

pub mod ack;
pub mod admin;
pub mod batch;
pub mod config;
pub mod decode;
pub mod deliver;
pub mod dlq;
pub mod ingest;
pub mod line_protocol;
pub mod metrics;
pub mod queue;
pub mod redrive;
pub mod retry;
pub mod seglog;
pub mod selfmetrics;
pub mod sink;
pub mod wal;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use config::{Config, MqttMode, WhenFull};
use metrics::{Ledger, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Start-up failed; nothing was accepted. Fix the named setting and start again.
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Sink(#[from] sink::BuildError),
    #[error("mqtt.topic: {0}")]
    Topic(#[from] decode::topic::PatternError),
    #[error("dlq.dir: {0}")]
    Dlq(#[from] dlq::DlqError),
    #[error(transparent)]
    Wal(#[from] wal::WalError),
}

/// How long device connections may take to receive their last acknowledgements at shutdown.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The running ingest mode.
enum Ingest {
    Embedded(ingest::embedded::Embedded),
    External(ingest::external::External),
}

/// Opens the dead-letter queue for writing, reporting what recovery found.
fn open_dlq(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<dlq::SharedDlq>, dlq::DlqError> {
    let (queue, recovery) = dlq::Dlq::open(&config.dlq.dir, dlq::options(&config.dlq), true)?;
    recovery.report("dead-letter queue");
    if recovery.records > 0 {
        warn!(records = recovery.records, dir = %config.dlq.dir.display(), "the dead-letter queue holds records");
    }
    Ok(dlq::SharedDlq::new(queue, metrics))
}

/// Runs the gateway until `shutdown` completes, then stops taking input, flushes what it
/// holds (for at most `shutdown.timeout`), parks what it could not write, and reports the ledger.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Ledger, RunError> {
    let metrics = Arc::new(Metrics::new());
    let pattern = decode::TopicPattern::parse(&config.mqtt.topic)?;
    let sink = sink::Sink::new(&config.sink)?;
    let dead_letters = open_dlq(&config, metrics.clone())?;
    let s = &config.sink;
    // The running gateway holds batches when the DLQ is full, and leaves probing a down sink
    // to redrive when that is on.
    let external = config.mqtt.mode == MqttMode::External;
    let policy = deliver::Policy {
        // External mode: the broker is the buffer while the sink is down.
        retry_forever: external,
        ..deliver::Policy::new(s, true, config.dlq.redrive && !external)
    };
    let self_metrics_sink = sink.clone();
    let deliverer = Arc::new(deliver::Deliverer::new(
        sink,
        metrics.clone(),
        dead_letters.clone(),
        policy,
    ));
    // Nothing has failed yet: the sink counts as reachable until a write says otherwise.
    metrics.sink_up.set(1);

    let admin_stop = CancellationToken::new();
    let admin = admin::serve(
        config.admin.listen,
        config.admin.token.clone(),
        metrics.clone(),
        admin_stop.clone(),
    )
    .await?;

    let (queue_tx, queue_rx) = queue::bounded(
        config.queue.max_readings,
        config.queue.max_bytes.as_u64() as usize,
        metrics.clone(),
    );
    let limits = batch::BatchLimits {
        max_readings: config.batch.max_readings,
        max_bytes: config.batch.max_bytes.as_u64() as usize,
        linger: config.batch.linger,
        max_in_flight: s.max_in_flight,
    };
    let drain = CancellationToken::new();
    let cut_batch = Arc::new(tokio::sync::Notify::new());
    let batcher = tokio::spawn(batch::run(
        queue_rx,
        limits,
        deliverer.clone(),
        drain.clone(),
        cut_batch.clone(),
    ));

    let background_stop = CancellationToken::new();
    if config.self_metrics.enabled {
        let sm = &config.self_metrics;
        let instance = if sm.instance.is_empty() {
            config.mqtt.client_id.clone()
        } else {
            sm.instance.clone()
        };
        let sm_config = selfmetrics::SelfMetricsConfig {
            interval: sm.interval,
            measurement: sm.measurement.clone(),
            instance,
        };
        tokio::spawn(selfmetrics::run(
            self_metrics_sink,
            metrics.clone(),
            sm_config,
            background_stop.clone(),
        ));
    }
    let redrive = config.dlq.redrive.then(|| {
        let redrive_config = redrive::RedriveConfig {
            interval: config.dlq.redrive_interval,
            max_interval: s.retry_max.max(config.dlq.redrive_interval),
            rate: config.dlq.redrive_rate,
        };
        let task = redrive::run(
            deliverer.clone(),
            dead_letters.clone(),
            redrive_config,
            background_stop.clone(),
        );
        tokio::spawn(task)
    });
    // The oldest record's age grows by itself: keep its gauge current, and apply retention.
    tokio::spawn({
        let (queue, stop) = (dead_letters.clone(), background_stop.clone());
        let retention = config.dlq.retention;
        async move {
            let tick = std::time::Duration::from_secs(1);
            while tokio::time::timeout(tick, stop.cancelled()).await.is_err() {
                if !retention.is_zero() {
                    if let Err(e) = queue.expire(retention).await {
                        error!(error = %e, "cannot apply dlq.retention");
                    }
                }
                queue.refresh();
            }
        }
    });

    let rejects = (config.dlq.rejected_input_per_device > 0).then(|| {
        ingest::rejects::Rejects::start(
            dead_letters.clone(),
            config.dlq.rejected_input_per_device,
            metrics.clone(),
        )
    });
    let ack = config.ack();
    if ack == config::AckMode::Received {
        warn!("ingest.ack = \"received\": messages are acknowledged before they are safe; what is in memory is lost if the gateway crashes");
    }
    let feed_stop = CancellationToken::new();
    let (safe, mut wal) = match ack {
        config::AckMode::Durable => {
            let (wal, committer) = wal::Wal::open(config.wal(), queue_tx.clone(), metrics.clone())?;
            let feeder = tokio::spawn(wal.clone().feed(queue_tx.clone(), feed_stop.clone()));
            info!(dir = %config.wal.dir.display(), commit_interval = ?config.wal.commit_interval, "acknowledging once in the write-ahead log and synced");
            (
                ingest::Safe::Durable(wal.clone()),
                Some((wal, committer, feeder)),
            )
        }
        config::AckMode::Written => (ingest::Safe::Written, None),
        config::AckMode::Received => (ingest::Safe::Received, None),
    };
    let limiter = (config.limits.device_rate > 0).then(|| {
        ingest::limit::RateLimiter::new(config.limits.device_rate, config.limits.device_burst)
    });
    let filter = pattern.filter();
    let intake = ingest::Intake::new(
        config.limits(),
        pattern,
        queue_tx,
        safe,
        config.queue.when_full != WhenFull::DropNewest,
        metrics.clone(),
        rejects,
        limiter,
    );
    let ingest_stop = CancellationToken::new();
    let mut ingest = match config.mqtt.mode {
        MqttMode::Embedded => Ingest::Embedded(
            ingest::embedded::start(&config, Arc::new(intake), metrics.clone()).await?,
        ),
        MqttMode::External => Ingest::External(ingest::external::start(
            &config,
            intake,
            filter,
            metrics.clone(),
            ingest_stop.clone(),
            cut_batch,
        )?),
    };
    info!(sink = %s.url, api = ?s.api, admin = %config.admin.listen, ack = ?ack, "gateway running");

    // Shutdown, in the reverse order of the flow: stop taking input; sync and acknowledge what
    // was taken; drain the queue into the sink (parking what cannot be written by the
    // deadline); release what was written; then close the device connections and the broker
    // session, which carry the last acknowledgements.
    match &mut ingest {
        Ingest::Embedded(_) => {
            shutdown.await;
            info!("shutdown requested: no more input, flushing what is held");
        }
        Ingest::External(external) => tokio::select! {
            _ = shutdown => info!("shutdown requested: no more input, flushing what is held"),
            _ = &mut external.intake => error!("ingest stopped on its own; flushing what is held"),
        },
    }
    match &mut ingest {
        Ingest::Embedded(embedded) => embedded.stop_reading().await,
        Ingest::External(external) => {
            ingest_stop.cancel();
            let _ = (&mut external.intake).await;
        }
    }
    let flush_deadline = tokio::time::Instant::now() + config.shutdown.timeout;
    if let Some((wal, _, feeder)) = &mut wal {
        // What is on disk and not yet in the queue stays there for the next start; the last
        // group is synced and acknowledged.
        feed_stop.cancel();
        let _ = feeder.await;
        wal.close().await;
    }
    drain.cancel();
    let mut batcher = batcher;
    // External mode: what is not written by the deadline is not parked in this replica's
    // dead-letter queue. With `written` it was never acknowledged, so the broker delivers it
    // again (to this group); with `durable` it stays in the write-ahead log for the next
    // start. Either way stopping need not wait for the sink.
    let give_back = external && ack == config::AckMode::Written;
    let cut_at_deadline = external && ack != config::AckMode::Received;
    if tokio::time::timeout_at(flush_deadline, &mut batcher)
        .await
        .is_err()
    {
        if cut_at_deadline {
            warn!(timeout = ?config.shutdown.timeout, "flush is taking too long; what is not written is kept (by the broker, or in the write-ahead log)");
            // Dropping the batcher drops its writes in flight and the queue: their messages
            // are never acknowledged, their log records never released.
            batcher.abort();
            let _ = batcher.await;
        } else {
            warn!(timeout = ?config.shutdown.timeout, "flush is taking too long; retries stop now");
            deliverer.stop_retrying();
            let _ = tokio::time::timeout(s.timeout * 2, &mut batcher).await;
        }
    }
    if let Some((wal, committer, _)) = wal {
        // The tombstones of what the drain wrote.
        wal.finish();
        let _ = tokio::task::spawn_blocking(move || committer.join()).await;
    }
    background_stop.cancel();
    if let Some(redrive) = redrive {
        // A record being redriven is finished, not cut: at most one write per part.
        let _ = tokio::time::timeout(s.timeout * 2, redrive).await;
    }
    dead_letters.refresh();
    let ledger = metrics.ledger();
    if !ledger.balanced() {
        error!(
            ?ledger,
            "the ledger does not balance: accepted + inherited differs from where the readings are"
        );
    } else if ledger.queued + ledger.in_flight > 0 && ack == config::AckMode::Durable {
        warn!(?ledger, wal = %config.wal.dir.display(), "stopped with readings neither written nor parked; they are still in the write-ahead log and are written first at the next start");
    } else if ledger.queued + ledger.in_flight > 0 && give_back {
        info!(?ledger, "stopped; the readings not yet written were never acknowledged, and the broker delivers them again");
    } else if ledger.queued + ledger.in_flight > 0 {
        error!(
            ?ledger,
            "stopped with readings neither written nor parked (see the errors above)"
        );
    } else if ledger.in_dlq + ledger.in_log > 0 {
        warn!(?ledger, dlq = %config.dlq.dir.display(), wal = %config.wal.dir.display(), "stopped; some readings wait in the dead-letter queue or the write-ahead log (written first at the next start)");
    } else {
        info!(?ledger, "stopped: every accepted reading was written");
    }
    match ingest {
        Ingest::Embedded(embedded) => embedded.close(CLOSE_GRACE).await,
        Ingest::External(mut external) => {
            // The last acknowledgements are due by now: send them, then leave the session.
            external.finish.cancel();
            if tokio::time::timeout(CLOSE_GRACE, &mut external.link)
                .await
                .is_err()
            {
                warn!("the broker did not take the last acknowledgements in time; it delivers those messages again");
                external.link.abort();
            }
        }
    }
    admin_stop.cancel();
    let _ = admin.await;
    Ok(ledger)
}
