//! Publishing a request and awaiting its correlated replies on the one
//! reply inbox.

use std::time::Duration;

use bruno_broker::reply::{Registration, Reply};
use bruno_events::payload::{
    ChatCompleted, ChatDelta, ChatFailed, ChatOptions, ChatRequested, Citation, SearchCompleted,
    TokenUsage,
};
use bruno_events::{AttributesReader, EventData, ExtensionValue, decode_data, new_event};
use bruno_runtime::Problem;
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::Gateway;

/// What a finished chat turn answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatAnswer {
    /// The answer.
    pub answer: String,
    /// The passages it cites.
    pub citations: Vec<Citation>,
    /// Token usage.
    pub usage: TokenUsage,
    /// The model (`extractive` for a fallback answer).
    pub model: String,
    /// True when the LLM was unavailable and the answer is extractive.
    pub fallback: bool,
    /// The turn's correlation id.
    pub correlation_id: String,
    /// The W3C trace id of the turn.
    pub trace_id: String,
    /// The session.
    pub session_id: String,
}

/// A fresh W3C `traceparent` and its trace id.
fn trace() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    (format!("00-{trace_id}-{span_id}-01"), trace_id)
}

/// A published request and its waiter.
pub(crate) struct Pending {
    registration: Registration,
    pub(crate) correlation: String,
    pub(crate) trace_id: String,
    deadline: tokio::time::Instant,
}

/// The next thing a [`Pending`] request hears.
pub(crate) enum Next {
    Delta(ChatDelta),
    Done(Box<ChatCompleted>),
    Search(SearchCompleted),
    Failed(Problem),
}

impl Pending {
    /// The next reply, or why there will be none (504 on timeout, 503 when
    /// the broker connection was lost, 502 when the turn failed).
    pub(crate) async fn next(&mut self) -> Next {
        loop {
            match tokio::time::timeout_at(self.deadline, self.registration.replies.recv()).await {
                Err(_) => {
                    return Next::Failed(
                        Problem::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            format!("no answer in time; correlation id {}", self.correlation),
                        )
                        .with_correlation(&self.correlation),
                    );
                }
                Ok(None) | Ok(Some(Reply::Lost)) => {
                    return Next::Failed(
                        Problem::unavailable(
                            format!(
                                "the broker connection was lost; correlation id {}",
                                self.correlation
                            ),
                            1,
                        )
                        .with_correlation(&self.correlation),
                    );
                }
                Ok(Some(Reply::Event(e))) => {
                    let decoded = match e.ty() {
                        ChatDelta::TYPE => decode_data::<ChatDelta>(&e).map(Next::Delta),
                        ChatCompleted::TYPE => {
                            decode_data::<ChatCompleted>(&e).map(|d| Next::Done(Box::new(d)))
                        }
                        SearchCompleted::TYPE => {
                            decode_data::<SearchCompleted>(&e).map(Next::Search)
                        }
                        ChatFailed::TYPE => decode_data::<ChatFailed>(&e).map(|f| {
                            Next::Failed(
                                Problem::new(
                                    StatusCode::BAD_GATEWAY,
                                    "chat-failed",
                                    format!(
                                        "{}: {}; correlation id {}",
                                        f.reason, f.message, self.correlation
                                    ),
                                )
                                .with_correlation(&self.correlation),
                            )
                        }),
                        _ => continue,
                    };
                    match decoded {
                        Ok(next) => return next,
                        Err(err) => tracing::warn!(error = %err, "undecodable reply dropped"),
                    }
                }
            }
        }
    }
}

/// The options of a chat turn.
pub(crate) fn options(
    k: Option<u32>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    stream: bool,
) -> ChatOptions {
    ChatOptions {
        model: None,
        temperature,
        max_tokens,
        k,
        stream,
    }
}

impl Gateway {
    /// Publish `data` as a request on the reply inbox; its replies are
    /// awaited for at most `timeout_ms`.
    pub(crate) async fn send<T: EventData>(
        &self,
        data: &T,
        timeout_ms: u64,
    ) -> Result<Pending, Problem> {
        if !self.inbox.is_ready() {
            return Err(Problem::unavailable(
                "the reply queue is not ready (broker unreachable)",
                1,
            ));
        }
        // The turn's trace: the request span's (publishing puts the
        // producer span's context in the event), else a fresh W3C context.
        let mut event = new_event("bruno/gateway", data);
        let trace_id = match bruno_broker::trace::trace_id(&tracing::Span::current()) {
            Some(id) => id,
            None => {
                let (traceparent, fresh) = trace();
                event.set_extension("traceparent", ExtensionValue::String(traceparent));
                fresh
            }
        };
        let (correlation, registration) = self
            .inbox
            .send(&self.broker, event)
            .await
            .map_err(|e| Problem::unavailable(format!("cannot publish: {e}"), 1))?;
        Ok(Pending {
            registration,
            correlation,
            trace_id,
            deadline: tokio::time::Instant::now() + Duration::from_millis(timeout_ms),
        })
    }

    /// Check and publish a chat turn.
    pub(crate) async fn chat(&self, request: ChatRequested) -> Result<Pending, Problem> {
        self.check_text("message", &request.message)?;
        self.check_text("session_id", &request.session_id)?;
        self.send(&request, self.config.chat_timeout_ms).await
    }

    /// The answer of a finished turn.
    pub(crate) fn answer(pending: &Pending, done: ChatCompleted) -> ChatAnswer {
        ChatAnswer {
            answer: done.answer,
            citations: done.citations,
            usage: done.usage,
            model: done.model,
            fallback: done.fallback,
            correlation_id: pending.correlation.clone(),
            trace_id: pending.trace_id.clone(),
            session_id: done.session_id,
        }
    }

    /// Wait for the final reply of a chat turn, ignoring deltas.
    pub(crate) async fn finish(&self, mut pending: Pending) -> Result<ChatAnswer, Problem> {
        loop {
            match pending.next().await {
                Next::Delta(_) | Next::Search(_) => continue,
                Next::Done(done) => return Ok(Self::answer(&pending, *done)),
                Next::Failed(p) => return Err(p),
            }
        }
    }
}
