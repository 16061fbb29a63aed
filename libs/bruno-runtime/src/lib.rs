//! The worker runtime every Bruno part runs on.
//!
//! A part is a [`Handler`]: a typed event (or an [`inputs!`] enum of
//! several) in, events out, or a [`HandlerError`] whose [`ErrorCode`]
//! decides retry versus dead letter (in one place,
//! [`ErrorCode::is_permanent`]; library errors carry their code through
//! [`Classify`]), with lifecycle hooks that default to nothing. The runtime owns the rest: pull
//! mode ([`run_pull`], an AMQP consumer with acks, retries, dead letters,
//! spans and metrics), push mode ([`push_router`], a Knative Trigger
//! subscriber), the admin server ([`admin`]), layered config ([`config`])
//! and shutdown ([`shutdown`]).
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
mod handler;
pub mod http_events;
pub mod keys;
pub mod problem;
mod push;
pub mod shutdown;
pub mod telemetry;

pub use bruno_broker::Broker;
pub use bruno_core::{Classify, ErrorCode, Secret};
pub use handler::{Context, FromEvent, Handler, HandlerError, Incoming, Raw, run_pull};
pub use problem::Problem;
pub use push::{PING_TARGET, PING_TYPE, PushPart, from_ping, push_part, push_router};

/// What the [`inputs!`] macro expands to; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use bruno_events::{AttributesReader, Event, EventData};
}
