use std::future::Future;
use std::sync::Arc;

use bruno_broker::{Broker, Delivered, Disposition, ErrorCode, Processor, consume};
use bruno_events::{AttributesReader, Event, EventData, decode_data};
use tokio_util::sync::CancellationToken;

/// What a handler gets besides the event.
#[derive(Clone, Debug)]
pub struct Context {
    /// The part's name (`embedder`, ...).
    pub part: String,
    /// CloudEvent `source` for events this part emits.
    pub source: String,
    /// The broker, for parts that publish besides their outputs.
    pub broker: Option<Broker>,
    /// Fires when the process is shutting down.
    pub shutdown: CancellationToken,
}

impl Context {
    /// A context for `part`, emitting with source `bruno/<part>`.
    pub fn new(
        part: impl Into<String>,
        broker: Option<Broker>,
        shutdown: CancellationToken,
    ) -> Self {
        let part = part.into();
        Self {
            source: format!("bruno/{part}"),
            part,
            broker,
            shutdown,
        }
    }
}

/// A handler's failure. Its code alone decides retry versus dead letter.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable reason (goes into the DLQ headers).
    pub message: String,
}

impl HandlerError {
    /// A failure with a code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    /// The input can never be processed.
    pub fn invalid_payload(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidPayload, message)
    }
    /// A dependency failed; worth retrying.
    pub fn dependency(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Dependency, message)
    }
    /// A bug or unexpected state; retried, then dead-lettered.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// An input a handler can take: decoded and checked from an event.
pub trait FromEvent: Sized + Send + 'static {
    /// Decode; the error's code is `unknown_type` or `invalid_payload`.
    fn from_event(event: &Event) -> Result<Self, HandlerError>;
}

impl<T: EventData> FromEvent for T {
    fn from_event(event: &Event) -> Result<Self, HandlerError> {
        if event.ty() != T::TYPE {
            return Err(HandlerError::new(
                ErrorCode::UnknownType,
                format!("expected {}, got {}", T::TYPE, event.ty()),
            ));
        }
        let data: T =
            decode_data(event).map_err(|e| HandlerError::invalid_payload(e.to_string()))?;
        data.check()
            .map_err(|e| HandlerError::invalid_payload(e.to_string()))?;
        Ok(data)
    }
}

/// Any event, undecoded (for observers and tests).
#[derive(Debug, Clone)]
pub struct Raw;

impl FromEvent for Raw {
    fn from_event(_: &Event) -> Result<Self, HandlerError> {
        Ok(Raw)
    }
}

/// A typed event as a handler receives it.
#[derive(Debug)]
pub struct Incoming<T> {
    /// The whole event (attributes, extensions, raw data).
    pub event: Event,
    /// Its decoded payload.
    pub data: T,
    /// Failed attempts before this one.
    pub attempts: u32,
}

/// The one trait every part implements: business logic only.
pub trait Handler: Send + Sync + 'static {
    /// The payload it takes.
    type Input: FromEvent;

    /// Handle one event; return the events to emit (published and confirmed
    /// before the input is acknowledged), or an error.
    fn handle(
        &self,
        input: Incoming<Self::Input>,
        ctx: &Context,
    ) -> impl Future<Output = Result<Vec<Event>, HandlerError>> + Send;
}

pub(crate) async fn invoke<H: Handler>(
    handler: &H,
    ctx: &Context,
    event: Event,
    attempts: u32,
) -> Result<Vec<Event>, HandlerError> {
    let data = H::Input::from_event(&event)?;
    handler
        .handle(
            Incoming {
                event,
                data,
                attempts,
            },
            ctx,
        )
        .await
}

struct Adapter<H> {
    handler: Arc<H>,
    ctx: Context,
}

impl<H: Handler> Processor for Adapter<H> {
    async fn process(&self, event: Event, delivered: Delivered) -> Disposition {
        match invoke(self.handler.as_ref(), &self.ctx, event, delivered.attempts).await {
            Ok(outputs) => Disposition::Ack(outputs),
            Err(e) => e.code.disposition(e.message),
        }
    }
}

/// Run a handler in pull mode on its part's queue until `shutdown` fires,
/// with `concurrency` messages in flight (the prefetch).
pub async fn run_pull<H: Handler>(
    broker: Broker,
    part: &str,
    concurrency: u16,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let ctx = Context::new(part, Some(broker.clone()), shutdown.clone());
    let adapter = Arc::new(Adapter { handler, ctx });
    consume(broker, part.to_owned(), concurrency, adapter, shutdown).await;
}
