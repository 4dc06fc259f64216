//! A scripted sink for in-process tests of delivery, batching and redrive: it answers from a
//! script first, then by a rule over the body, and keeps every body it was sent.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;

use super::{SinkError, Write, WriteFuture};

type Rule = Box<dyn Fn(&str) -> Result<(), SinkError> + Send + Sync>;

pub struct Scripted {
    script: Mutex<VecDeque<Result<(), SinkError>>>,
    rule: Rule,
    /// Every body sent, in order, with whether it was taken.
    sent: Mutex<Vec<(String, bool)>>,
}

impl Scripted {
    /// A sink that takes everything once its script is used up.
    pub fn new(script: Vec<Result<(), SinkError>>) -> Self {
        Self::with_rule(script, |_| Ok(()))
    }

    /// A sink that answers by `rule` once its script is used up.
    pub fn with_rule(
        script: Vec<Result<(), SinkError>>,
        rule: impl Fn(&str) -> Result<(), SinkError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            script: Mutex::new(script.into()),
            rule: Box::new(rule),
            sent: Mutex::new(Vec::new()),
        }
    }

    /// Requests made.
    pub fn requests(&self) -> usize {
        self.sent.lock().map_or(0, |s| s.len())
    }

    /// The lines the sink took, in the order it took them.
    pub fn written(&self) -> Vec<String> {
        self.bodies()
            .iter()
            .flat_map(|body| body.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    /// The bodies of the requests the sink took.
    pub fn bodies(&self) -> Vec<String> {
        self.sent.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                s.iter()
                    .filter(|(_, ok)| *ok)
                    .map(|(b, _)| b.clone())
                    .collect()
            },
        )
    }
}

impl Write for Scripted {
    fn write(&self, body: Bytes) -> WriteFuture<'_> {
        let text = String::from_utf8_lossy(&body).into_owned();
        let scripted = self.script.lock().ok().and_then(|mut s| s.pop_front());
        let answer = scripted.unwrap_or_else(|| (self.rule)(&text));
        if let Ok(mut sent) = self.sent.lock() {
            sent.push((text, answer.is_ok()));
        }
        Box::pin(async move { answer })
    }
}

/// A 503, with a Retry-After when given.
pub fn unavailable(retry_after: Option<Duration>) -> SinkError {
    SinkError::from_status(503, "unavailable".into(), retry_after)
}

/// A connection that failed.
pub fn unreachable() -> SinkError {
    SinkError::Retryable {
        status: None,
        retry_after: None,
        detail: "connection refused".into(),
    }
}
