//! Push mode: the same handlers served as a Knative Trigger subscriber.
//!
//! Knative's data-plane contract: `POST /` with one CloudEvent (binary or
//! structured); 200 with the reply event in the body, 202 with none; 4xx for
//! events that can never succeed (Knative sends them to the dead-letter
//! sink), 5xx or 429 for ones worth retrying.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, StatusCode};

use crate::handler::invoke;
use crate::http_events::{Mode, parse};
use crate::{Context, ErrorCode, Handler, Problem};

/// A part served in push mode, with the same lifecycle as pull mode.
pub struct PushPart {
    /// `POST /` for the Trigger's deliveries; they wait until the part's
    /// `start` hook has run.
    pub router: Router,
    /// To await once the HTTP server has drained: ends the ticks, runs the
    /// `stop` hook and waits for the part's background work.
    pub finish: futures_util::future::BoxFuture<'static, ()>,
}

/// Serve `handler` as part `part` in push mode (a Knative Trigger
/// subscriber): its `start` hook first, its ticks beside, outputs beyond
/// the one reply published through `broker`, then [`PushPart::finish`].
pub fn push_part<H: Handler>(
    part: &str,
    broker: Option<crate::Broker>,
    handler: Arc<H>,
    max_body_bytes: usize,
    shutdown: tokio_util::sync::CancellationToken,
) -> PushPart {
    let ctx = Context::new(part, broker, shutdown.clone());
    let (started_tx, started) = tokio::sync::watch::channel(false);
    let lifecycle = {
        let (handler, ctx) = (handler.clone(), ctx.clone());
        tokio::spawn(async move {
            handler.start(&ctx).await;
            let _ = started_tx.send(true);
            crate::handler::ticks(handler, ctx.clone(), ctx.shutdown.clone()).await;
        })
    };
    // A Knative Service probes its serving port only: `/live`, and `/ready`
    // once the start hook has run.
    let ready = {
        let started = started.clone();
        move || {
            let up = *started.borrow();
            async move {
                if up {
                    (StatusCode::OK, "ready").into_response()
                } else {
                    Problem::unavailable("the part is starting", 1).into_response()
                }
            }
        }
    };
    let route = {
        let (handler, ctx) = (handler.clone(), ctx.clone());
        move |headers: HeaderMap, body: Bytes| {
            let (handler, ctx, mut started) = (handler.clone(), ctx.clone(), started.clone());
            async move {
                if started.wait_for(|s| *s).await.is_err() {
                    return Problem::unavailable("the part is stopping", 1).into_response();
                }
                deliver(handler.as_ref(), &ctx, &headers, &body).await
            }
        }
    };
    let router = Router::new()
        .route("/", post(route))
        .route("/live", axum::routing::get(|| async { "live" }))
        .route("/ready", axum::routing::get(ready))
        .layer(DefaultBodyLimit::max(max_body_bytes));
    let finish = Box::pin(async move {
        let _ = lifecycle.await;
        handler.stop(&ctx).await;
        ctx.finish().await;
    });
    PushPart { router, finish }
}

/// A router serving `handler` on `POST /`.
pub fn push_router<H: Handler>(handler: Arc<H>, ctx: Context, max_body_bytes: usize) -> Router {
    let route = move |headers: HeaderMap, body: Bytes| {
        let handler = handler.clone();
        let ctx = ctx.clone();
        async move { deliver(handler.as_ref(), &ctx, &headers, &body).await }
    };
    Router::new()
        .route("/", post(route))
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// The type of a Knative `PingSource`'s events.
pub const PING_TYPE: &str = "dev.knative.sources.ping";
/// The extension a `PingSource` sets (`ceOverrides`) to name the Bruno
/// event type its ticks stand for (`bruno.backup.requested.v1`).
pub const PING_TARGET: &str = "brunotype";

/// A ping with a [`PING_TARGET`] extension becomes an event of that type
/// with the ping's data (a PingSource cannot set the type itself); any
/// other event is left as it is.
pub fn from_ping(mut event: bruno_events::Event) -> bruno_events::Event {
    use bruno_events::{AttributesReader, AttributesWriter};
    if event.ty() == PING_TYPE
        && let Some(target) = bruno_events::ext_str(&event, PING_TARGET).map(str::to_owned)
    {
        event.set_type(target);
    }
    event
}

async fn deliver<H: Handler>(
    handler: &H,
    ctx: &Context,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let (mode, mut events) = match parse(headers, body) {
        Ok(parsed) => parsed,
        Err(p) => return p.into_response(),
    };
    if mode == Mode::Batch || events.len() != 1 {
        return Problem::invalid("body", "push mode takes exactly one event").into_response();
    }
    let Some(event) = events.pop() else {
        return Problem::invalid("body", "no event").into_response();
    };
    let event = from_ping(event);
    let span = bruno_broker::trace::process_span("push", "knative-trigger", &event, 1);
    let outcome =
        tracing::Instrument::instrument(invoke(handler, ctx, event, 0), span.clone()).await;
    if outcome.is_err() {
        bruno_broker::trace::failed(&span);
    }
    match outcome {
        Ok(mut outputs) => match outputs.len() {
            0 => StatusCode::ACCEPTED.into_response(),
            1 => match outputs.pop() {
                Some(reply) => (StatusCode::OK, reply).into_response(),
                None => StatusCode::ACCEPTED.into_response(),
            },
            _ => match ctx.broker() {
                // Knative takes one reply event; more go through the broker.
                Some(broker) => match broker.publish_all(&outputs).await {
                    Ok(()) => StatusCode::ACCEPTED.into_response(),
                    Err(e) => Problem::unavailable(e.to_string(), 1).into_response(),
                },
                None => Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "too-many-replies",
                    format!(
                        "handler produced {} events and no broker is configured",
                        outputs.len()
                    ),
                )
                .into_response(),
            },
        },
        Err(e) if e.is_permanent() => {
            Problem::new(StatusCode::BAD_REQUEST, e.code.as_str(), e.message).into_response()
        }
        Err(e) => match e.code {
            ErrorCode::Timeout => {
                Problem::new(StatusCode::GATEWAY_TIMEOUT, e.code.as_str(), e.message)
                    .into_response()
            }
            ErrorCode::Dependency => Problem::unavailable(e.message, 1).into_response(),
            _ => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.code.as_str(),
                e.message,
            )
            .into_response(),
        },
    }
}
