//! Logging: JSON lines (or human-readable text) filtered by `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber; `json` picks JSON lines. Safe to call twice.
pub fn init(json: bool, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}
