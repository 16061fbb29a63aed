use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bruno_broker::{Broker, Delivered, Disposition, Processor, consume};
use bruno_core::{Classify, ErrorCode};
use bruno_events::{AttributesReader, Event, EventData, decode_data};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// What a handler gets besides the event.
#[derive(Clone, Debug)]
pub struct Context {
    /// The part's name (`embedder`, ...).
    pub part: String,
    /// CloudEvent `source` for events this part emits.
    pub source: String,
    /// Fires when the process is shutting down (stop taking new work).
    pub shutdown: CancellationToken,
    broker: Option<Broker>,
    /// Pull mode: the returned events are published together, in order.
    pull: bool,
    tasks: TaskTracker,
    /// Fires once the part has drained and its `stop` hook has run.
    stopped: CancellationToken,
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
            pull: false,
            shutdown,
            tasks: TaskTracker::new(),
            stopped: CancellationToken::new(),
        }
    }

    /// Publish `events` now, before the handler's final outcome (the
    /// generator's streamed deltas). Returns once the broker confirmed all
    /// of them, so they are durable before the input is acknowledged. Push
    /// mode without a broker has nowhere to send them: they are dropped
    /// (Knative takes one reply event, the final one).
    pub async fn emit(&self, events: &[Event]) -> Result<(), HandlerError> {
        match &self.broker {
            Some(broker) => Ok(broker.publish_all(events).await?),
            None => {
                debug!(
                    n = events.len(),
                    "no broker in push mode: streamed events dropped"
                );
                Ok(())
            }
        }
    }

    /// Whether the events a handler returns are published together and in
    /// order through the broker (pull mode), so a handler may return its
    /// last streamed events with its outcome instead of emitting them
    /// first. Not in push mode: Knative takes one reply event, the final
    /// one.
    pub fn returns_stream(&self) -> bool {
        self.pull
    }

    /// Run long-lived work of the part (a batcher, say) under the runtime.
    /// `work` gets a token that fires after the part stopped consuming,
    /// every in-flight message settled and the `stop` hook ran; the runtime
    /// waits for `work` to return before the part counts as stopped.
    pub fn spawn<F, Fut>(&self, work: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work(self.stopped.clone()));
    }

    pub(crate) fn broker(&self) -> Option<&Broker> {
        self.broker.as_ref()
    }

    /// End the part's background work and wait for it.
    pub(crate) async fn finish(&self) {
        self.stopped.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// A handler's failure. Its code alone decides retry versus dead letter
/// ([`ErrorCode::is_permanent`]). Any library error that implements
/// [`Classify`] converts into one with `?`, keeping its own code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HandlerError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable reason (goes into the DLQ headers).
    pub message: String,
}

impl<E: Classify> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self::new(e.code(), e.to_string())
    }
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
    /// An event of a type the handler does not take.
    pub fn unknown_type(got: &str, expected: &[&str]) -> Self {
        Self::new(
            ErrorCode::UnknownType,
            format!("expected {}, got {got}", expected.join(" or ")),
        )
    }
    /// True when no later attempt can succeed.
    pub fn is_permanent(&self) -> bool {
        self.code.is_permanent()
    }
}

/// An input a handler can take: decoded and checked from an event.
pub trait FromEvent: Sized + Send + 'static {
    /// The event types it is decoded from: the part's bindings. Empty means
    /// any type (observers and tests).
    fn types() -> Vec<&'static str>;

    /// Decode; the error's code is `unknown_type` or `invalid_payload`.
    fn from_event(event: &Event) -> Result<Self, HandlerError>;
}

impl<T: EventData> FromEvent for T {
    fn types() -> Vec<&'static str> {
        vec![T::TYPE]
    }

    fn from_event(event: &Event) -> Result<Self, HandlerError> {
        if event.ty() != T::TYPE {
            return Err(HandlerError::unknown_type(event.ty(), &[T::TYPE]));
        }
        let data: T =
            decode_data(event).map_err(|e| HandlerError::invalid_payload(e.to_string()))?;
        data.check()
            .map_err(|e| HandlerError::invalid_payload(e.to_string()))?;
        Ok(data)
    }
}

/// A handler input over several event types: an enum with one variant per
/// payload type, decoded by type, with the unknown-type answer in one place.
///
/// ```
/// use bruno_events::payload::{ChatCompleted, DocumentSubmitted};
/// use bruno_runtime::FromEvent;
///
/// bruno_runtime::inputs! {
///     /// What the embedder takes.
///     pub enum EmbedderInput {
///         /// A document to split and embed.
///         Document(DocumentSubmitted),
///         /// A finished chat turn to remember.
///         Turn(ChatCompleted),
///     }
/// }
///
/// assert_eq!(
///     EmbedderInput::types(),
///     ["bruno.document.submitted.v1", "bruno.chat.completed.v1"]
/// );
/// ```
#[macro_export]
macro_rules! inputs {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident($ty:ty) ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant($ty) ),+
        }

        impl $crate::FromEvent for $name {
            fn types() -> ::std::vec::Vec<&'static str> {
                ::std::vec![$( <$ty as $crate::__private::EventData>::TYPE ),+]
            }

            fn from_event(
                event: &$crate::__private::Event,
            ) -> ::std::result::Result<Self, $crate::HandlerError> {
                use $crate::__private::AttributesReader as _;
                $(
                    if event.ty() == <$ty as $crate::__private::EventData>::TYPE {
                        return <$ty as $crate::FromEvent>::from_event(event).map(Self::$variant);
                    }
                )+
                Err($crate::HandlerError::unknown_type(
                    event.ty(),
                    &<Self as $crate::FromEvent>::types(),
                ))
            }
        }
    };
}

/// Any event, undecoded (for observers and tests).
#[derive(Debug, Clone)]
pub struct Raw;

impl FromEvent for Raw {
    fn types() -> Vec<&'static str> {
        Vec::new()
    }

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

/// The one trait every part implements: business logic only. The runtime
/// owns decoding, acks, retries, dead letters, spans, metrics and the
/// lifecycle; the hooks default to nothing.
pub trait Handler: Send + Sync + 'static {
    /// The payload it takes: one catalogue type, or an [`inputs!`] enum.
    type Input: FromEvent;

    /// Handle one event; return the events to emit (published and confirmed
    /// before the input is acknowledged), or an error. Events that must go
    /// out before the end (streamed pieces) go through [`Context::emit`].
    fn handle(
        &self,
        input: Incoming<Self::Input>,
        ctx: &Context,
    ) -> impl Future<Output = Result<Vec<Event>, HandlerError>> + Send;

    /// Before the first message: start background work with
    /// [`Context::spawn`].
    fn start(&self, _ctx: &Context) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// How often [`Handler::tick`] runs while the part consumes (`None`: never).
    fn tick_every(&self) -> Option<Duration> {
        None
    }

    /// Periodic work (maintenance); runs beside message handling.
    fn tick(&self, _ctx: &Context) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// After the part stopped consuming and every in-flight message settled;
    /// then the work started with [`Context::spawn`] is told to end.
    fn stop(&self, _ctx: &Context) -> impl Future<Output = ()> + Send {
        async {}
    }
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
            Err(e) => Disposition::failed(e.code, e.message),
        }
    }
}

/// Run the ticker of `handler` until `until` fires.
pub(crate) async fn ticks<H: Handler>(handler: Arc<H>, ctx: Context, until: CancellationToken) {
    let Some(every) = handler.tick_every() else {
        return;
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = until.cancelled() => return,
            _ = tick.tick() => handler.tick(&ctx).await,
        }
    }
}

/// Run a handler in pull mode on its part's queue until `shutdown` fires,
/// with `concurrency` messages in flight (the prefetch): its `start` hook,
/// then consuming (with its ticks beside), then on shutdown: stop taking
/// messages, settle the in-flight ones, the `stop` hook, and the end of its
/// background work.
pub async fn run_pull<H: Handler>(
    broker: Broker,
    part: &str,
    concurrency: u16,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let mut ctx = Context::new(part, Some(broker.clone()), shutdown.clone());
    ctx.pull = true;
    handler.start(&ctx).await;
    let tick_stop = shutdown.child_token();
    let ticker = tokio::spawn(ticks(handler.clone(), ctx.clone(), tick_stop.clone()));
    let adapter = Arc::new(Adapter {
        handler: handler.clone(),
        ctx: ctx.clone(),
    });
    consume(broker, part.to_owned(), concurrency, adapter, shutdown).await;
    tick_stop.cancel();
    let _ = ticker.await;
    handler.stop(&ctx).await;
    ctx.finish().await;
}
