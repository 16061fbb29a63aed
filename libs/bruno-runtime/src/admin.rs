//! The admin server every part runs: `/live`, `/ready`, `/metrics`.
//!
//! Live is not ready: `/live` answers 200 while the process runs; `/ready`
//! answers 503 until every dependency check passes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// Named readiness checks.
#[derive(Default)]
pub struct Readiness {
    checks: Vec<(String, Check)>,
}

impl Readiness {
    /// No checks yet (ready).
    pub fn new() -> Self {
        Self::default()
    }
    /// Add a check.
    pub fn check(
        mut self,
        name: impl Into<String>,
        f: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        self.checks.push((name.into(), Box::new(f)));
        self
    }
    /// Names of the failing checks.
    pub fn failing(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|(_, f)| !f())
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

struct AdminState {
    registry: Arc<Mutex<Registry>>,
    readiness: Readiness,
}

/// The admin router.
pub fn router(registry: Arc<Mutex<Registry>>, readiness: Readiness) -> Router {
    let state = Arc::new(AdminState {
        registry,
        readiness,
    });
    Router::new()
        .route("/live", get(|| async { "live" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn ready(State(state): State<Arc<AdminState>>) -> Response {
    let failing = state.readiness.failing();
    if failing.is_empty() {
        (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "failing": failing})),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut body = String::new();
    let encoded = match state.registry.lock() {
        Ok(registry) => prometheus_client::encoding::text::encode(&mut body, &registry),
        Err(_) => Err(std::fmt::Error),
    };
    match encoded {
        Ok(()) => {
            let mut r = body.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Serve `router` on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    // No Nagle delay: a streamed answer writes many small frames (SSE
    // deltas), and each would otherwise wait up to the peer's delayed ACK
    // (~40 ms) behind the one before.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    let handle = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    });
    Ok((bound, handle))
}
