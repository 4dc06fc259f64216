//! The running gateway: its stages started from the sink back to the devices, so that each
//! stage's consumer runs before it gets input, watched while they run, and stopped from the
//! devices to the sink, so that what is in the pipeline flows out before its consumer goes.
//!
//! ```text
//! devices ─▶ ingest (guard + rumqttd, or the external broker link)
//!              └─▶ intake: decode ─▶ [write-ahead log] ─▶ queue ─▶ batcher ─▶ deliver ─▶ sink
//!                                                                                 └─▶ DLQ ─▶ redrive
//! ```

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, AckMode, Config, MqttMode, WhenFull};
use crate::metrics::{Ledger, Metrics};
use crate::tasks::{Task, TaskFailed, Tasks};
use crate::{admin, batch, decode, deliver, dlq, ingest, queue, redrive, selfmetrics, sink, wal};

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
    /// A stage failed while running; the gateway stopped as it does at shutdown, so what it
    /// had accepted is written, parked or kept. Its log says why; start it again.
    #[error(transparent)]
    Task(#[from] TaskFailed),
}

/// How long device connections may take to receive their last acknowledgements at shutdown.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The running ingest mode.
enum Ingest {
    Embedded(ingest::embedded::Embedded),
    External(ingest::external::External),
}

/// The write-ahead log while it runs (`ingest.ack = "durable"`).
struct WalStage {
    wal: Arc<wal::Wal>,
    committer: std::thread::JoinHandle<()>,
    feeder: Task,
    stop_feeding: CancellationToken,
}

/// Runs the gateway until `shutdown` completes (or a stage fails), then stops taking input,
/// flushes what it holds (for at most `shutdown.timeout`), parks what it could not write, and
/// reports the ledger. A failed stage stops it the same way and is returned as the error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<Ledger, RunError> {
    let mut tasks = Tasks::default();
    let metrics = Arc::new(Metrics::new());
    let pattern = decode::TopicPattern::parse(&config.mqtt.topic)?;
    let external = config.mqtt.mode == MqttMode::External;
    let ack = config.ack();
    let s = &config.sink;

    // Start 1: the admin endpoint, so that health and metrics answer from the first moment.
    let admin_stop = CancellationToken::new();
    let mut admin = tasks.spawn(
        "admin",
        admin::serve(
            config.admin.listen,
            config.admin.token.clone(),
            metrics.clone(),
            admin_stop.clone(),
        )
        .await?,
    );

    // Start 2: the sink and the failure path behind it: delivery, the dead-letter queue,
    // redrive, retention, self-metrics.
    let sink = sink::Sink::new(&config.sink)?;
    let dead_letters = open_dlq(&config, metrics.clone())?;
    let policy = deliver::Policy {
        // External mode: the broker is the buffer while the sink is down.
        live_retries: if external {
            deliver::LiveRetries::Forever
        } else {
            deliver::LiveRetries::MaxAttempts
        },
        ..deliver::Policy::new(
            s,
            deliver::WhenDlqFull::Hold,
            if config.dlq.redrive && !external {
                deliver::WhileSinkDown::Park
            } else {
                deliver::WhileSinkDown::Write
            },
        )
    };
    let self_metrics_sink = sink.clone();
    let deliverer = Arc::new(deliver::Deliverer::new(
        Arc::new(sink),
        metrics.clone(),
        dead_letters.clone(),
        policy,
    ));
    // Nothing has failed yet: the sink counts as reachable until a write says otherwise.
    metrics.sink_up.set(1);
    let background_stop = CancellationToken::new();
    let mut redrive = config.dlq.redrive.then(|| {
        let redrive_config = redrive::RedriveConfig {
            interval: config.dlq.redrive_interval,
            max_interval: s.retry_max.max(config.dlq.redrive_interval),
            rate: config.dlq.redrive_rate,
        };
        tasks.spawn(
            "redrive",
            redrive::run(
                deliverer.clone(),
                dead_letters.clone(),
                redrive_config,
                background_stop.clone(),
            ),
        )
    });
    let mut upkeep = tasks.spawn(
        "dlq upkeep",
        dlq_upkeep(
            dead_letters.clone(),
            config.dlq.retention,
            background_stop.clone(),
        ),
    );
    let mut self_metrics = config.self_metrics.enabled.then(|| {
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
        tasks.spawn(
            "self-metrics",
            selfmetrics::run(
                self_metrics_sink,
                metrics.clone(),
                sm_config,
                background_stop.clone(),
            ),
        )
    });

    // Start 3: the queue and the batcher that empties it into delivery.
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
    let cut_batch = Arc::new(Notify::new());
    let mut batcher = tasks.spawn(
        "batcher",
        batch::run(
            queue_rx,
            limits,
            {
                let deliverer = deliverer.clone();
                move |batch| {
                    let deliverer = deliverer.clone();
                    async move { deliverer.deliver(batch).await }
                }
            },
            drain.clone(),
            cut_batch.clone(),
        ),
    );

    // Start 4: the write-ahead log in front of the queue, and what the earlier run left in it.
    if ack == AckMode::Received {
        warn!("ingest.ack = \"received\": messages are acknowledged before they are safe; what is in memory is lost if the gateway crashes");
    }
    let (safe, mut wal) = match ack {
        AckMode::Durable => {
            let (wal, committer) = wal::Wal::open(
                wal::WalConfig::from_config(&config),
                queue_tx.clone(),
                metrics.clone(),
            )?;
            let stop_feeding = CancellationToken::new();
            let feeder = tasks.spawn(
                "wal feeder",
                wal.clone().feed(queue_tx.clone(), stop_feeding.clone()),
            );
            info!(dir = %config.wal.dir.display(), commit_interval = ?config.wal.commit_interval, "acknowledging once in the write-ahead log and synced");
            (
                ingest::Safe::Durable(wal.clone()),
                Some(WalStage {
                    wal,
                    committer,
                    feeder,
                    stop_feeding,
                }),
            )
        }
        AckMode::Written => (ingest::Safe::Written, None),
        AckMode::Received => (ingest::Safe::Received, None),
    };

    // Start 5: intake (decode, limits, refusals) and the devices' side.
    let rejects = (config.dlq.rejected_input_per_device > 0).then(|| {
        ingest::rejects::Rejects::start(
            dead_letters.clone(),
            config.dlq.rejected_input_per_device,
            metrics.clone(),
            &tasks,
        )
    });
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
    let stop_input = CancellationToken::new();
    let mut ingest = match config.mqtt.mode {
        MqttMode::Embedded => Ingest::Embedded(
            ingest::embedded::start(&config, Arc::new(intake), metrics.clone(), &tasks).await?,
        ),
        MqttMode::External => Ingest::External(ingest::external::start(
            &config,
            intake,
            filter,
            metrics.clone(),
            stop_input.clone(),
            cut_batch,
            &tasks,
        )?),
    };
    info!(sink = %s.url, api = ?s.api, admin = %config.admin.listen, ack = ?ack, "gateway running");

    let mut failed = tokio::select! {
        _ = shutdown => {
            info!("shutdown requested: no more input, flushing what is held");
            None
        }
        failure = tasks.failed() => {
            error!(error = %failure, "flushing what is held");
            Some(failure)
        }
    };
    tasks.stopping();

    // Stop 1: no more input from devices or the broker.
    match &mut ingest {
        Ingest::Embedded(embedded) => embedded.stop_reading().await,
        Ingest::External(external) => {
            stop_input.cancel();
            external.intake.join().await;
        }
    }
    // Stop 2: the log's last group is synced and acknowledged; what is on disk and not yet in
    // the queue stays there for the next start.
    let flush_deadline = tokio::time::Instant::now() + config.shutdown.timeout;
    if let Some(w) = &mut wal {
        w.stop_feeding.cancel();
        w.feeder.join().await;
        w.wal.close().await;
    }
    // Stop 3: the queue drains into the sink until the deadline. External mode: what is not
    // written by then is not parked in this replica's dead-letter queue. With `written` it was
    // never acknowledged, so the broker delivers it again (to this group); with `durable` it
    // stays in the write-ahead log for the next start. Either way stopping need not wait for
    // the sink. Otherwise retries stop at the deadline and what is left is parked.
    drain.cancel();
    let give_back = external && ack == AckMode::Written;
    let cut_at_deadline = external && ack != AckMode::Received;
    if !batcher.join_until(flush_deadline).await {
        if cut_at_deadline {
            warn!(timeout = ?config.shutdown.timeout, "flush is taking too long; what is not written is kept (by the broker, or in the write-ahead log)");
            // Dropping the batcher drops its writes in flight and the queue: their messages
            // are never acknowledged, their log records never released.
            batcher.abort().await;
        } else {
            warn!(timeout = ?config.shutdown.timeout, "flush is taking too long; retries stop now");
            deliverer.stop_retrying();
            if !batcher.join_within(s.timeout * 2).await {
                batcher.abort().await;
            }
        }
    }
    // Stop 4: the tombstones of what the drain wrote.
    if let Some(w) = wal {
        w.wal.finish();
        let joined = tokio::task::spawn_blocking(move || w.committer.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            failed.get_or_insert(TaskFailed {
                task: "wal committer",
                how: "panicked".to_owned(),
            });
        }
    }
    // Stop 5: the failure path. A record being redriven is finished, not cut: at most one
    // write per part.
    background_stop.cancel();
    if let Some(redrive) = &mut redrive {
        if !redrive.join_within(s.timeout * 2).await {
            redrive.abort().await;
        }
    }
    upkeep.join().await;
    if let Some(self_metrics) = &mut self_metrics {
        if !self_metrics.join_within(s.timeout * 2).await {
            self_metrics.abort().await;
        }
    }
    dead_letters.refresh();
    let ledger = metrics.ledger();
    report(&ledger, &config, ack, give_back);
    // Stop 6: the device connections and the broker session, which carry the last
    // acknowledgements.
    match ingest {
        Ingest::Embedded(embedded) => embedded.close(CLOSE_GRACE).await,
        Ingest::External(mut external) => {
            external.finish.cancel();
            if !external.link.join_within(CLOSE_GRACE).await {
                warn!("the broker did not take the last acknowledgements in time; it delivers those messages again");
                external.link.abort().await;
            }
        }
    }
    // Stop 7: the admin endpoint, last, so that the stop can be watched.
    admin_stop.cancel();
    admin.join().await;
    match failed.or_else(|| tasks.first_failure()) {
        Some(failure) => Err(failure.into()),
        None => Ok(ledger),
    }
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

/// The oldest record's age grows by itself: keeps its gauge current, and applies retention.
async fn dlq_upkeep(
    queue: Arc<dlq::SharedDlq>,
    retention: std::time::Duration,
    stop: CancellationToken,
) {
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

/// Says where every accepted reading is as the gateway stops.
fn report(ledger: &Ledger, config: &Config, ack: config::AckMode, give_back: bool) {
    let held = ledger.queued + ledger.in_flight;
    if !ledger.balanced() {
        error!(
            ?ledger,
            "the ledger does not balance: accepted + inherited differs from where the readings are"
        );
    } else if held > 0 && ack == AckMode::Durable {
        warn!(?ledger, wal = %config.wal.dir.display(), "stopped with readings neither written nor parked; they are still in the write-ahead log and are written first at the next start");
    } else if held > 0 && give_back {
        info!(?ledger, "stopped; the readings not yet written were never acknowledged, and the broker delivers them again");
    } else if held > 0 {
        error!(
            ?ledger,
            "stopped with readings neither written nor parked (see the errors above)"
        );
    } else if ledger.in_dlq + ledger.in_log > 0 {
        warn!(?ledger, dlq = %config.dlq.dir.display(), wal = %config.wal.dir.display(), "stopped; some readings wait in the dead-letter queue or the write-ahead log (written first at the next start)");
    } else {
        info!(?ledger, "stopped: every accepted reading was written");
    }
}
