//! Admin HTTP: `GET /metrics` (Prometheus text), `/healthz` (alive), `/readyz` (ingest up and
//! the sink reachable on its last try).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::config::Secret;
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

/// Binds now (so a taken port fails start-up); the future returned serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    token: Secret,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, AdminError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AdminError::Bind { addr, source })?;
    let guarded = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(ready))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let token = token.clone();
                async move { bearer(&token, request, next).await }
            },
        ));
    let app = guarded
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    Ok(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    })
}

/// With a token configured, only requests that carry it get through.
async fn bearer(token: &Secret, request: Request, next: Next) -> Response {
    if token.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time: the comparison does not tell how much of a guess was right.
    let ok = presented.is_some_and(|p| {
        let (a, b) = (p.as_bytes(), token.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    });
    if ok {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "admin.token required\n",
        )
            .into_response()
    }
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
