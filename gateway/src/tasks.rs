//! The gateway's long-running tasks, each named and watched. A task that panics, or ends
//! while the gateway still needs it, is reported once, by name, and the gateway stops with
//! that error instead of running on without the stage. A leaf module: the stages spawn
//! through it, and `run` waits on it.

use std::future::Future;

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A stage's task ended while the gateway still needed it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("the {task} task {how}; the gateway stopped")]
pub struct TaskFailed {
    pub task: &'static str,
    pub how: String,
}

/// The watched tasks of one running gateway.
pub struct Tasks {
    tracker: TaskTracker,
    failed_tx: mpsc::UnboundedSender<TaskFailed>,
    failed: mpsc::UnboundedReceiver<TaskFailed>,
    /// Cancelled when shutdown begins: from then on a task that ends was asked to.
    stopping: CancellationToken,
}

/// One watched task. Waiting for it waits for the task; aborting it aborts the task.
pub struct Task {
    /// `None` once the task is known to have ended.
    watcher: Option<JoinHandle<()>>,
    abort: AbortHandle,
}

/// Reports failures from outside the runtime (a thread of its own).
#[derive(Clone)]
pub struct Reporter {
    failed: mpsc::UnboundedSender<TaskFailed>,
    stopping: CancellationToken,
}

impl Default for Tasks {
    fn default() -> Self {
        let (failed_tx, failed) = mpsc::unbounded_channel();
        Self {
            tracker: TaskTracker::new(),
            failed_tx,
            failed,
            stopping: CancellationToken::new(),
        }
    }
}

impl Tasks {
    /// Spawns `task` under `name` and watches how it ends.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> Task
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let inner = tokio::spawn(failpoint(name, task));
        let abort = inner.abort_handle();
        let (failed, stopping) = (self.failed_tx.clone(), self.stopping.clone());
        let watcher = self.tracker.spawn(async move {
            let how = match inner.await {
                Ok(()) if stopping.is_cancelled() => return,
                Ok(()) => "ended on its own".to_owned(),
                Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
                // Aborted by the shutdown.
                Err(_) => return,
            };
            tracing::error!(task = name, %how, "a task of the gateway failed; stopping");
            let _ = failed.send(TaskFailed { task: name, how });
        });
        Task {
            watcher: Some(watcher),
            abort,
        }
    }

    /// For a task that runs on a thread of its own.
    pub fn reporter(&self) -> Reporter {
        Reporter {
            failed: self.failed_tx.clone(),
            stopping: self.stopping.clone(),
        }
    }

    /// The first task to fail; pending for as long as none does.
    pub async fn failed(&mut self) -> TaskFailed {
        match self.failed.recv().await {
            Some(failure) => failure,
            // `self` holds a sender: the channel never closes while it waits.
            None => std::future::pending().await,
        }
    }

    /// Shutdown has begun: the tasks that end from now on were asked to.
    pub fn stopping(&self) {
        self.stopping.cancel();
    }

    /// The first failure reported and not yet taken, if any.
    pub fn first_failure(&mut self) -> Option<TaskFailed> {
        self.failed.try_recv().ok()
    }

    /// How many watched tasks have not ended.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }
}

impl Task {
    /// Waits for the task to end.
    pub async fn join(&mut self) {
        if let Some(watcher) = self.watcher.as_mut() {
            let _ = watcher.await;
            self.watcher = None;
        }
    }

    /// Waits for the task to end until `deadline`; false if it had not by then.
    pub async fn join_until(&mut self, deadline: tokio::time::Instant) -> bool {
        let Some(watcher) = self.watcher.as_mut() else {
            return true;
        };
        if tokio::time::timeout_at(deadline, watcher).await.is_err() {
            return false;
        }
        self.watcher = None;
        true
    }

    /// Waits for the task to end, for at most `within`; false if it had not by then.
    pub async fn join_within(&mut self, within: std::time::Duration) -> bool {
        self.join_until(tokio::time::Instant::now() + within).await
    }

    /// Stops the task where it is, and waits until it has.
    pub async fn abort(&mut self) {
        self.abort.abort();
        self.join().await;
    }
}

impl Reporter {
    /// The task `task` ended (`how`); a failure unless shutdown asked for it.
    pub fn ended(&self, task: &'static str, how: String) {
        if self.stopping.is_cancelled() {
            return;
        }
        tracing::error!(task, %how, "a task of the gateway failed; stopping");
        let _ = self.failed.send(TaskFailed { task, how });
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |s| (*s).to_owned()),
    }
}

/// Test failpoint `task_panic=<name>` (builds with the `failpoints` feature): the task of
/// that name panics as it starts.
#[cfg(feature = "failpoints")]
async fn failpoint<F: Future<Output = ()>>(name: &'static str, task: F) {
    let armed = std::env::var("FAILPOINTS").unwrap_or_default();
    if armed
        .split(',')
        .any(|item| item.trim() == format!("task_panic={name}"))
    {
        panic!("failpoint task_panic={name}");
    }
    task.await;
}

#[cfg(not(feature = "failpoints"))]
fn failpoint<F: Future<Output = ()>>(_: &'static str, task: F) -> F {
    task
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_task_that_panics_is_reported_by_name() {
        let mut tasks = Tasks::default();
        let _ok = tasks.spawn("quiet", std::future::pending());
        let _bad = tasks.spawn("batcher", async { panic!("out of cheese") });
        let failed = tokio::time::timeout(Duration::from_secs(5), tasks.failed())
            .await
            .expect("reported");
        assert_eq!(
            failed,
            TaskFailed {
                task: "batcher",
                how: "panicked: out of cheese".into()
            }
        );
        assert_eq!(
            failed.to_string(),
            "the batcher task panicked: out of cheese; the gateway stopped"
        );
    }

    #[tokio::test]
    async fn a_task_that_ends_before_shutdown_fails_and_one_asked_to_stop_does_not() {
        let mut tasks = Tasks::default();
        let stop = CancellationToken::new();
        let mut early = tasks.spawn("redrive", async {});
        early.join().await;
        assert_eq!(
            tasks.first_failure().map(|f| f.how),
            Some("ended on its own".to_owned())
        );
        let mut asked = tasks.spawn("admin", {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        });
        let mut cut = tasks.spawn("feeder", std::future::pending());
        tasks.stopping();
        stop.cancel();
        asked.join().await;
        assert!(!cut.join_within(Duration::from_millis(10)).await);
        cut.abort().await;
        assert_eq!(tasks.first_failure(), None);
        assert_eq!(tasks.running(), 0);
        tasks.reporter().ended("committer", "panicked: late".into());
        assert_eq!(tasks.first_failure(), None, "asked to stop");
    }
}
