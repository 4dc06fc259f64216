//! Live progress: a bar with the message rate on stderr when stderr is a terminal, else a log
//! line every ten seconds (so that a run redirected to a file still shows it is alive).

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::shared::Counters;

const BAR_TICK: Duration = Duration::from_millis(250);
const LOG_TICK: Duration = Duration::from_secs(10);
/// The rate shown is over this window, long enough to smooth a steady fleet's phases.
const RATE_WINDOW: Duration = Duration::from_secs(2);

pub struct Progress {
    bar: Option<ProgressBar>,
    task: JoinHandle<()>,
}

impl Progress {
    /// `total`: messages the run will send, when the profile bounds it.
    pub fn start(counters: Arc<Counters>, total: Option<u64>, devices: u32) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(t) => ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr()),
                None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            };
            let template = if total.is_some() {
                "{elapsed_precise} [{bar:30}] {pos}/{len} msgs  {msg}"
            } else {
                "{elapsed_precise} {spinner} {pos} msgs  {msg}"
            };
            // The template is a constant, so a style error is a bug; fall back to the default.
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        let task = tokio::spawn(tick(counters, bar.clone(), devices));
        Progress { bar, task }
    }

    pub fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

async fn tick(counters: Arc<Counters>, bar: Option<ProgressBar>, devices: u32) {
    let mut interval = tokio::time::interval(if bar.is_some() { BAR_TICK } else { LOG_TICK });
    let mut window: VecDeque<(Instant, u64)> = VecDeque::new();
    loop {
        interval.tick().await;
        let now = Instant::now();
        let published = counters.published.load(Ordering::Relaxed);
        window.push_back((now, published));
        while window.len() > 2 && now - window[0].0 > RATE_WINDOW {
            window.pop_front();
        }
        let rate = match (window.front(), window.back()) {
            (Some((t0, p0)), Some((t1, p1))) if t1 > t0 => {
                (p1 - p0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let connected = counters.connected.load(Ordering::Relaxed);
        let acked = counters.acked.load(Ordering::Relaxed);
        let failed = counters.failed.load(Ordering::Relaxed);
        let verifying = counters.verifying.load(Ordering::Relaxed);
        let seen = counters.seen.load(Ordering::Relaxed);
        let expected = counters.expected.load(Ordering::Relaxed);
        let status = if verifying {
            format!("verifying: {seen} of {expected} readings in the sink")
        } else {
            let failed = if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            };
            let sink = if expected > 0 {
                format!(", {seen}/{expected} readings in the sink")
            } else {
                String::new()
            };
            format!("{rate:.0} msg/s, {connected}/{devices} connected, {acked} acked{failed}{sink}")
        };
        match &bar {
            Some(bar) => {
                bar.set_position(published);
                bar.set_message(status);
            }
            None => tracing::info!(published, "{status}"),
        }
    }
}
