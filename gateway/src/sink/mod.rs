//! Sink: batches of line protocol to InfluxDB over HTTP (docs/contract.md §2, §3).
//!
//! `v2` goes through the `influxdb2` crate's `write_line_protocol`; `v1` is a plain POST to
//! `/write`. Both answer with a [`SinkError`] sorted by what the caller must do with the batch.

#[cfg(test)]
pub mod fake;
mod v1;
mod v2;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::{SinkApi, SinkConfig};

/// What went wrong with one write request, sorted by what the caller does next.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Try again later: connection errors, timeouts, 429 and 5xx.
    #[error("sink unavailable ({}): {detail}", status.map_or("no response".to_string(), |s| s.to_string()))]
    Retryable {
        status: Option<u16>,
        retry_after: Option<Duration>,
        detail: String,
    },
    /// 413: the batch is too large; split it and send the halves.
    #[error("sink says the batch is too large (413): {body}")]
    TooLarge { body: String },
    /// 400, 422: the sink refused points in the batch (422: InfluxDB 2's partial write, for
    /// points outside the retention period); resending the same lines cannot help.
    #[error("sink rejected points ({status}): {body}")]
    Rejected { status: u16, body: String },
    /// 401, 403, 404 and other statuses: the gateway's configuration (token, database, URL) is
    /// wrong; an operator must fix it.
    #[error(
        "sink refused the request ({status}), check sink.url, credentials and database: {body}"
    )]
    Refused { status: u16, body: String },
}

impl SinkError {
    /// Sorts an HTTP status other than success.
    pub fn from_status(status: u16, body: String, retry_after: Option<Duration>) -> Self {
        match status {
            429 | 500..=599 => SinkError::Retryable {
                status: Some(status),
                retry_after,
                detail: body,
            },
            413 => SinkError::TooLarge { body },
            400 | 422 => SinkError::Rejected { status, body },
            _ => SinkError::Refused { status, body },
        }
    }

    /// The `outcome` label of `gateway_sink_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            SinkError::Retryable { status: None, .. } => "unreachable",
            SinkError::Retryable {
                status: Some(429), ..
            } => "throttled",
            SinkError::Retryable { .. } => "server_error",
            SinkError::TooLarge { .. } => "too_large",
            SinkError::Rejected { .. } => "rejected",
            SinkError::Refused { .. } => "refused",
        }
    }
}

/// Problems building the sink client: fix the config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("sink.url {url:?} is not a usable URL: {detail}")]
    Url { url: String, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Sends one body per call; retries are the caller's.
#[derive(Clone)]
pub enum Sink {
    V1(v1::V1),
    V2(v2::V2),
}

impl Sink {
    pub fn new(config: &SinkConfig) -> Result<Self, BuildError> {
        reqwest::Url::parse(&config.url).map_err(|e| BuildError::Url {
            url: config.url.clone(),
            detail: e.to_string(),
        })?;
        Ok(match config.api {
            SinkApi::V1 => Sink::V1(v1::V1::new(config)?),
            SinkApi::V2 => Sink::V2(v2::V2::new(config)?),
        })
    }

    /// Writes `body` (line protocol, gzip-compressed when `sink.gzip` is on).
    pub async fn write(&self, body: bytes::Bytes) -> Result<(), SinkError> {
        match self {
            Sink::V1(s) => s.write(body).await,
            Sink::V2(s) => s.write(body).await,
        }
    }
}

/// Where delivery writes a body: the InfluxDB client ([`Sink`]), or in unit tests a scripted
/// fake ([`fake::Scripted`]). Boxed so that delivery can hold either behind one pointer.
pub trait Write: Send + Sync {
    fn write(&self, body: bytes::Bytes) -> WriteFuture<'_>;
}

pub type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

impl Write for Sink {
    fn write(&self, body: bytes::Bytes) -> WriteFuture<'_> {
        Box::pin(Sink::write(self, body))
    }
}

/// Sorts a transport failure: all of them are worth retrying.
fn transport_error(e: &reqwest::Error) -> SinkError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    // reqwest's Display names the URL, which carries no secret (tokens travel in headers).
    SinkError::Retryable {
        status: None,
        retry_after: None,
        detail: format!("{what}: {e}"),
    }
}

/// The common reqwest client: one timeout for the whole request, no redirects to follow
/// somewhere the token should not go.
fn http_client(config: &SinkConfig, headers: reqwest::header::HeaderMap) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(config.max_in_flight)
        .default_headers(headers)
}

fn gzip_headers(config: &SinkConfig) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if config.gzip {
        headers.insert(
            reqwest::header::CONTENT_ENCODING,
            reqwest::header::HeaderValue::from_static("gzip"),
        );
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_by_what_to_do() {
        let o = |s| SinkError::from_status(s, String::new(), None).outcome();
        assert_eq!(o(429), "throttled");
        assert_eq!(o(500), "server_error");
        assert_eq!(o(503), "server_error");
        assert_eq!(o(413), "too_large");
        assert_eq!(o(400), "rejected");
        assert_eq!(
            o(422),
            "rejected",
            "InfluxDB 2's partial write: the lines, not the setup"
        );
        assert_eq!(o(401), "refused");
        assert_eq!(o(403), "refused");
        assert_eq!(o(404), "refused");
        assert_eq!(
            o(200),
            "refused",
            "v2 answers 204; anything else is unexpected"
        );
    }
}
