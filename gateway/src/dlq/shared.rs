//! The dead-letter queue as the running gateway shares it: one [`Dlq`] behind a mutex, its disk
//! work on the blocking pool, its gauges kept current.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Dlq, DlqError, Kind, Meta};
use crate::metrics::{KindLabel, Metrics};

pub struct SharedDlq {
    dlq: Mutex<Dlq>,
    metrics: Arc<Metrics>,
    /// Accepted readings of records being redriven right now: counted in flight, not in the
    /// queue, so the ledger balances while a record is between the two.
    redriving: AtomicU64,
    /// Ids a redrive or retention is working on: each record has one owner at a time, so a
    /// record is never both redriven and expired.
    claimed: Mutex<std::collections::HashSet<String>>,
    /// Records redriven (written, or parked again) whose delete failed, with their accepted
    /// readings: still on disk, so they stay claimed (never redriven or expired again in this
    /// run), out of the gauges, and their delete is tried again before each redrive round.
    undeleted: Mutex<std::collections::HashMap<String, u32>>,
}

/// Runs disk work on the blocking pool; a panic there is reported as one, not as I/O.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, DlqError> + Send + 'static,
) -> Result<T, DlqError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| DlqError::Panicked {
            what: "dead-letter queue",
            detail: e.to_string(),
        })?
}

impl SharedDlq {
    pub fn new(dlq: Dlq, metrics: Arc<Metrics>) -> Arc<Self> {
        let inherited = dlq.stats().accepted_readings;
        metrics.dlq_inherited_readings.set(inherited as i64);
        let shared = Arc::new(Self {
            dlq: Mutex::new(dlq),
            metrics,
            redriving: AtomicU64::new(0),
            claimed: Mutex::new(Default::default()),
            undeleted: Mutex::new(Default::default()),
        });
        shared.refresh();
        shared
    }

    fn lock(&self) -> MutexGuard<'_, Dlq> {
        // A panic while holding the lock leaves the index as it was before the failed call
        // (appends and deletes update it only after the disk did), so it is safe to go on.
        self.dlq
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends durably (on the blocking pool) and counts it.
    pub async fn append(self: &Arc<Self>, meta: Meta, data: Vec<u8>) -> Result<String, DlqError> {
        let this = self.clone();
        let kind = meta.kind;
        let readings = meta.readings;
        let id = blocking(move || this.lock().append(&meta, &data)).await?;
        self.metrics
            .dlq_parked_readings
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc_by(u64::from(readings));
        self.refresh();
        Ok(id)
    }

    pub async fn delete(self: &Arc<Self>, ids: Vec<String>) -> Result<(), DlqError> {
        let this = self.clone();
        blocking(move || this.lock().delete(&ids)).await?;
        self.refresh();
        Ok(())
    }

    pub async fn read(self: &Arc<Self>, id: String) -> Result<(Meta, Vec<u8>), DlqError> {
        let this = self.clone();
        blocking(move || this.lock().read(&id)).await
    }

    /// Ids of the oldest records of `kind` that nothing has claimed, at most `limit`.
    pub fn oldest(&self, kind: Kind, limit: usize) -> Vec<(String, u32)> {
        let claimed = self.claimed();
        self.lock()
            .entries()
            .filter(|e| e.meta.kind == kind && !claimed.contains(&e.id))
            .take(limit)
            .map(|e| (e.id.clone(), e.meta.readings))
            .collect()
    }

    fn claimed(&self) -> MutexGuard<'_, std::collections::HashSet<String>> {
        self.claimed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims a record for redrive and moves its readings from "in the queue" to "in flight"
    /// for the ledger. False when retention (or another redrive) has it.
    pub fn begin_redrive(&self, id: &str, readings: u32) -> bool {
        if !self.claimed().insert(id.to_owned()) {
            return false;
        }
        self.redriving
            .fetch_add(u64::from(readings), Ordering::Relaxed);
        self.metrics.readings_in_flight.inc_by(i64::from(readings));
        self.refresh();
        true
    }

    /// Ends a redrive whose readings are back in the record (not written).
    pub fn end_redrive(&self, id: &str, readings: u32) {
        self.claimed().remove(id);
        self.redriving
            .fetch_sub(u64::from(readings), Ordering::Relaxed);
        self.refresh();
    }

    /// Ends a redrive whose readings are written or parked again: the record goes. If its
    /// delete fails it is drained all the same: it keeps its claim and stays out of the
    /// gauges until [`Self::retry_deletes`] gets it off the disk. Its readings are never
    /// written twice in one run; a restart before the delete lands writes them again (the
    /// same points, which the sink stores once).
    pub async fn drained(self: &Arc<Self>, id: String, readings: u32) {
        if let Err(e) = self.delete(vec![id.clone()]).await {
            tracing::error!(%id, error = %e, "cannot delete a redriven dead-letter record; it stays drained and the delete is tried again");
            self.undeleted().insert(id, readings);
            self.refresh();
            return;
        }
        self.end_redrive(&id, readings);
    }

    fn undeleted(&self) -> MutexGuard<'_, std::collections::HashMap<String, u32>> {
        self.undeleted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Deletes the records redriven earlier whose delete failed.
    pub async fn retry_deletes(self: &Arc<Self>) -> Result<(), DlqError> {
        let held: Vec<(String, u32)> = self.undeleted().drain().collect();
        if held.is_empty() {
            return Ok(());
        }
        // One that an operator purged meanwhile would make the whole delete fail.
        let ids: Vec<String> = {
            let dlq = self.lock();
            held.iter()
                .filter(|(id, _)| dlq.get(id).is_some())
                .map(|(id, _)| id.clone())
                .collect()
        };
        if let Err(e) = self.delete(ids).await {
            self.undeleted().extend(held);
            return Err(e);
        }
        for (id, readings) in held {
            self.end_redrive(&id, readings);
        }
        Ok(())
    }

    /// Deletes records whose first failure is older than `retention`, and says so.
    pub async fn expire(self: &Arc<Self>, retention: std::time::Duration) -> Result<(), DlqError> {
        let cutoff = super::now_ms()
            .saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let expired: Vec<(String, Kind, u32)> = {
            let mut claimed = self.claimed();
            // Not take_while: records parked again keep their first failure but sit at the end.
            let expired: Vec<(String, Kind, u32)> = self
                .lock()
                .entries()
                .filter(|e| e.meta.first_failure_ms < cutoff && !claimed.contains(&e.id))
                .map(|e| (e.id.clone(), e.meta.kind, e.meta.readings))
                .collect();
            claimed.extend(expired.iter().map(|(id, _, _)| id.clone()));
            expired
        };
        if expired.is_empty() {
            return Ok(());
        }
        let readings: u64 = expired
            .iter()
            .filter(|(_, k, _)| k.accepted())
            .map(|(_, _, n)| u64::from(*n))
            .sum();
        let ids: Vec<String> = expired.into_iter().map(|(id, _, _)| id).collect();
        let records = ids.len();
        let deleted = self.delete(ids.clone()).await;
        {
            let mut claimed = self.claimed();
            for id in &ids {
                claimed.remove(id);
            }
        }
        deleted?;
        self.metrics.dlq_expired_readings.inc_by(readings);
        tracing::warn!(
            records,
            readings,
            "dead-letter records passed dlq.retention and were deleted"
        );
        Ok(())
    }

    /// Sets the DLQ gauges from the queue's own counts.
    pub fn refresh(&self) {
        let s = self.lock().stats();
        let m = &self.metrics;
        let undeleted = self.undeleted().len() as u64;
        m.dlq_records
            .set(s.records.saturating_sub(undeleted) as i64);
        let redriving = self.redriving.load(Ordering::Relaxed);
        m.dlq_readings
            .set(s.accepted_readings.saturating_sub(redriving) as i64);
        m.dlq_rejected_inputs.set(s.rejected_inputs as i64);
        m.dlq_bytes.set(s.disk_bytes as i64);
        let age = s
            .oldest_failure_ms
            .map_or(0.0, |t| (super::now_ms() - t).max(0) as f64 / 1000.0);
        m.dlq_oldest_age_seconds.set(age);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(readings: u32) -> Meta {
        crate::seglog::log::tests::meta(Kind::RetriesExhausted, readings)
    }

    #[tokio::test]
    async fn a_panic_in_disk_work_is_reported_as_a_panic_not_as_io() {
        let err = blocking::<()>(|| panic!("a bug"))
            .await
            .expect_err("panicked");
        assert!(matches!(err, DlqError::Panicked { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("the task working on the dead-letter queue panicked"),
            "{err}"
        );
    }

    /// A redriven record whose delete the disk refuses is drained all the same: never handed
    /// out for redrive again, out of the gauges (its readings are written), and deleted by
    /// the next try.
    #[tokio::test]
    async fn a_record_whose_delete_fails_is_never_redriven_twice() {
        let dir = tempfile::tempdir().expect("tmp");
        let (dlq, _) =
            Dlq::open(dir.path(), super::super::options_for(1 << 20, 4096), true).expect("open");
        let metrics = Arc::new(Metrics::new());
        let shared = SharedDlq::new(dlq, metrics.clone());
        let a = shared
            .append(meta(3), b"m v=1 1\n".to_vec())
            .await
            .expect("a");
        let b = shared
            .append(meta(2), b"m v=2 2\n".to_vec())
            .await
            .expect("b");
        assert_eq!(shared.oldest(Kind::RetriesExhausted, 64).len(), 2);
        assert!(shared.begin_redrive(&a, 3));
        shared.lock().fail_next_deletes(1);
        shared.drained(a.clone(), 3).await;
        assert!(shared.lock().get(&a).is_some(), "still on disk");
        assert_eq!(
            shared.oldest(Kind::RetriesExhausted, 64),
            vec![(b.clone(), 2)],
            "not handed out again"
        );
        assert!(!shared.begin_redrive(&a, 3), "still claimed");
        assert_eq!(
            (metrics.dlq_records.get(), metrics.dlq_readings.get()),
            (1, 2),
            "only b in the gauges"
        );
        shared.retry_deletes().await.expect("deleted now");
        assert!(shared.lock().get(&a).is_none(), "gone");
        assert_eq!(
            (metrics.dlq_records.get(), metrics.dlq_readings.get()),
            (1, 2)
        );
        assert!(shared.begin_redrive(&b, 2), "b is free");
    }
}
