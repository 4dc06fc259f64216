//! Admin HTTP: `GET /metrics` (Prometheus text), `/healthz` (alive), `/readyz` (ingest up and
//! the sink reachable on its last try).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Change admin.listen.
    #[error("cannot listen on {addr} (admin.listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Binds now (so a taken port fails start-up), serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics);
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    }))
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

async fn ready(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    let ingest = metrics.ingest_up.get() == 1;
    let sink = metrics.sink_up.get() == 1;
    let status = if ingest && sink {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("ingest: {}\nsink: {}\n", up(ingest), up(sink)),
    )
}

fn up(ok: bool) -> &'static str {
    if ok {
        "up"
    } else {
        "down"
    }
}
