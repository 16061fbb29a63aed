//! Logs and traces.
//!
//! - **Logs**: one line per event on stderr, JSON (with the trace and span
//!   ids of the current span) or text (coloured only on a terminal), passed
//!   through [`redact`] so secrets and personal data never reach a log line.
//! - **Traces**: `tracing` spans become OpenTelemetry spans
//!   (`tracing-opentelemetry`); the W3C context travels in every event (see
//!   `bruno_broker::trace`). They are exported by OTLP/HTTP when an endpoint
//!   is configured (`telemetry.otlp_endpoint` or the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT`); otherwise spans still carry ids, so
//!   logs and propagated contexts line up, but nothing is exported.

use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::LazyLock;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use regex::Regex;
use serde::Deserialize;
use tracing::{Level, Subscriber};
use tracing_subscriber::fmt::format::{FmtSpan, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets};

/// `[telemetry]`: trace export.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL, e.g. `http://otel-collector:4318`
    /// (`/v1/traces` is appended). Unset: no export, unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (a sampled parent is always followed).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    /// The traces endpoint, if export is on.
    pub fn traces_endpoint(&self) -> Option<String> {
        let base = self
            .otlp_endpoint
            .clone()
            .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
            .filter(|s| !s.trim().is_empty())?;
        let base = base.trim_end_matches('/');
        Some(if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        })
    }
}

/// How to log.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// JSON lines instead of text.
    pub json: bool,
    /// The filter when `RUST_LOG` is unset.
    pub filter: String,
}

/// Flushes and stops trace export when dropped (keep it alive in `main`).
#[must_use = "traces are flushed when the guard drops"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Install the global subscriber for process `service` (the OpenTelemetry
/// `service.name`). Calling it again keeps the first subscriber.
pub fn init(log: &LogSettings, telemetry: &TelemetryConfig, service: &str) -> TelemetryGuard {
    let (dispatch, guard, exporting) = build(log, telemetry, service);
    if dispatch.try_init().is_err() {
        return TelemetryGuard { provider: None };
    }
    if let Some(endpoint) = exporting {
        tracing::info!(%endpoint, service, "exporting traces");
    }
    guard
}

/// The subscriber [`init`] installs, as a [`tracing::Dispatch`] to install
/// elsewhere (per thread, as benchmarks comparing modes do).
pub fn dispatch(
    log: &LogSettings,
    telemetry: &TelemetryConfig,
    service: &str,
) -> (tracing::Dispatch, TelemetryGuard) {
    let (dispatch, guard, _) = build(log, telemetry, service);
    (dispatch, guard)
}

fn build(
    log: &LogSettings,
    telemetry: &TelemetryConfig,
    service: &str,
) -> (tracing::Dispatch, TelemetryGuard, Option<String>) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(|| Redacting(std::io::stderr()))
        .with_span_events(FmtSpan::NONE);
    let fmt = if log.json {
        fmt.fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(JsonLines)
            .boxed()
    } else {
        fmt.with_ansi(std::io::stderr().is_terminal()).boxed()
    };

    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            telemetry.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        );
    let mut exporting = None;
    if let Some(endpoint) = telemetry.traces_endpoint() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(endpoint.clone())
            .build()
        {
            Ok(exporter) => {
                builder = builder.with_batch_exporter(exporter);
                exporting = Some(endpoint);
            }
            Err(e) => eprintln!("bruno: cannot export traces to {endpoint}: {e}"),
        }
    }
    let provider = builder.build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("bruno"))
        .with_location(false)
        .with_threads(false)
        .with_filter(Fresh(Targets::new().with_target("bruno", Level::INFO)));
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(fmt.with_filter(Fresh(filter)))
            .with(otel),
    );
    let guard = TelemetryGuard {
        provider: Some(provider),
    };
    (dispatch, guard, exporting)
}

/// A per-layer filter whose decisions are never cached as "always".
///
/// `tracing-subscriber` hands each per-layer filter's decision from
/// `enabled` to `on_new_span`/`on_event` through a thread-local bitmap. A
/// callsite every filter enables is cached as "always", and its spans skip
/// `enabled`: they then read whatever the last `enabled` call on that
/// thread left there. LanceDB logs through the `log` crate, whose
/// `log_enabled!` checks call `enabled` with no span or event after them,
/// so a consumer's `process` span created next on that thread was dropped
/// by both layers: the writer's commit of a chat turn's memory then started
/// a trace of its own (tokio-rs/tracing#2519). "Sometimes" makes `enabled`
/// run before every span and event, so the bitmap is always fresh.
struct Fresh<F>(F);

impl<S, F: tracing_subscriber::layer::Filter<S>> tracing_subscriber::layer::Filter<S> for Fresh<F> {
    fn enabled(
        &self,
        meta: &tracing::Metadata<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.0.enabled(meta, cx)
    }

    fn callsite_enabled(
        &self,
        meta: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        let interest = self.0.callsite_enabled(meta);
        if interest.is_always() {
            tracing::subscriber::Interest::sometimes()
        } else {
            interest
        }
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        cx: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        self.0.event_enabled(event, cx)
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }

    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_new_span(attrs, id, cx);
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        cx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        self.0.on_record(id, values, cx);
    }

    fn on_enter(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_enter(id, cx);
    }

    fn on_exit(&self, id: &tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_exit(id, cx);
    }

    fn on_close(&self, id: tracing::span::Id, cx: tracing_subscriber::layer::Context<'_, S>) {
        self.0.on_close(id, cx);
    }
}

/// Axum middleware: a `server` span per request (not for `/live` and
/// `/ready`), child of the W3C `traceparent` header or of a binary-mode
/// CloudEvent's `ce-traceparent`.
pub async fn http_span(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let path = request.uri().path();
    if path == "/live" || path == "/ready" {
        return next.run(request).await;
    }
    let method = request.method();
    let span = tracing::info_span!(
        "http",
        otel.name = %format_args!("{method} {path}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        "http.request.method" = %method,
        "url.path" = %path,
        "http.response.status_code" = tracing::field::Empty,
    );
    // With no subscriber (or tracing off) the span is disabled and there
    // is no parent to adopt: skip the header lookups.
    if !span.is_disabled() {
        bruno_broker::trace::adopt_headers(&span, |name| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
    }
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// A JSON line per event: time, level, target, the event's fields, the
/// fields of the spans it happened in (innermost wins), and the current
/// span's OpenTelemetry `trace_id` and `span_id`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::{Map, Value};
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_owned()));
        if let Some(scope) = ctx.event_scope() {
            let mut spans = Vec::new();
            for span in scope.from_root() {
                spans.push(Value::String(span.name().to_owned()));
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(fields)
                {
                    line.extend(map);
                }
            }
            line.insert("spans".into(), Value::Array(spans));
        }
        let mut fields = FieldsVisitor(Map::new());
        event.record(&mut fields);
        line.extend(fields.0);
        // The innermost span that is traced (library spans, such as
        // lance's, are not exported and have no context of their own).
        let ids: Vec<tracing::span::Id> = ctx
            .event_scope()
            .map(|scope| scope.map(|s| s.id()).collect())
            .unwrap_or_default();
        let traced = tracing::dispatcher::get_default(|d| {
            ids.iter().find_map(|id| {
                let cx = tracing_opentelemetry::get_otel_context(id, d)?;
                let sc = cx.span().span_context().clone();
                sc.is_valid().then_some(sc)
            })
        });
        if let Some(sc) = traced {
            line.insert("trace_id".into(), Value::String(sc.trace_id().to_string()));
            line.insert("span_id".into(), Value::String(sc.span_id().to_string()));
        }
        // Span fields of tracing-opentelemetry's own vocabulary are not log data.
        line.retain(|k, _| !k.starts_with("otel."));
        writeln!(writer, "{}", Value::Object(line))
    }
}

struct FieldsVisitor(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for FieldsVisitor {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            serde_json::Value::String(format!("{value:?}")),
        );
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(
            field.name().to_owned(),
            serde_json::Value::String(value.to_owned()),
        );
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

/// stderr with every line passed through [`redact`]. The formatter writes
/// each event as one `write_all`, so a whole line is redacted at once.
struct Redacting<W>(W);

impl<W: Write> Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

struct Rule {
    pattern: Regex,
    replacement: &'static str,
}

fn rule(pattern: &str, replacement: &'static str) -> Rule {
    Rule {
        // The patterns are constants, checked by the tests below.
        pattern: Regex::new(pattern).unwrap_or_else(|e| panic!("redaction pattern: {e}")),
        replacement,
    }
}

/// Secrets first (they may contain an `@` or digits), then personal data.
static RULES: LazyLock<Vec<Rule>> = LazyLock::new(|| {
    vec![
        // Passwords in URLs: scheme://user:password@host
        rule(
            r"(?i)\b([a-z][a-z0-9+.-]*://[^:/@\s]*):[^@/\s]+@",
            "${1}:[REDACTED]@",
        ),
        // Authorization headers and bearer tokens.
        rule(
            r"(?i)\b(bearer|basic)(\s+|%20)[A-Za-z0-9._~+/=-]{4,}",
            "${1}${2}[REDACTED]",
        ),
        // key = value pairs whose key names a secret (text, JSON, query strings).
        rule(
            r#"(?i)\b((?:[a-z0-9_-]*(?:api[_-]?key|apikey|secret[_-]?key|access[_-]?key|token|secret|password|passwd|pwd)|authorization)\\?"?\s*[:=]\s*\\?"?)([^\s",}&\\]+)"#,
            "${1}[REDACTED]",
        ),
        // Well-known key shapes, wherever they appear.
        rule(
            r"\b(?:sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,})\b",
            "[REDACTED]",
        ),
        // E-mail addresses.
        rule(
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            "[EMAIL]",
        ),
        // IPv4 addresses except loopback and the unspecified address (the
        // process's own listen addresses).
        rule(
            r"\b(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
            "$0",
        ),
        // IPv6 addresses: full, or compressed with at least three groups (so
        // that Rust paths such as `a::b` in log targets stay).
        rule(
            r"(?i)\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b|\b(?:[0-9a-f]{1,4}:){2,6}:[0-9a-f:]*[0-9a-f]\b|\b[0-9a-f]{1,4}::(?:[0-9a-f]{1,4}:){1,5}[0-9a-f]{1,4}\b",
            "[IP]",
        ),
    ]
});

fn own_address(ip: &str) -> bool {
    ip.starts_with("127.") || ip == "0.0.0.0"
}

/// `text` with secrets (passwords in URLs, bearer tokens, values of keys
/// named like secrets, well-known API key shapes) and personal data
/// (e-mail and IP addresses) replaced by placeholders.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    for rule in RULES.iter() {
        if !rule.pattern.is_match(&out) {
            continue;
        }
        let replaced = if rule.replacement == "$0" {
            rule.pattern
                .replace_all(&out, |c: &regex::Captures<'_>| {
                    if own_address(&c[0]) {
                        c[0].to_owned()
                    } else {
                        "[IP]".to_owned()
                    }
                })
                .into_owned()
        } else {
            rule.pattern
                .replace_all(&out, rule.replacement)
                .into_owned()
        };
        out = Cow::Owned(replaced);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_personal_data_are_replaced() {
        let cases = [
            (
                "error sending request for url (http://ada:hunter2@llm.internal:11434/api/chat)",
                "hunter2",
            ),
            ("amqps://bruno:s3cr3t-pw@rabbitmq:5671/%2f", "s3cr3t-pw"),
            ("Authorization: Bearer abcDEF123.tok-en_", "abcDEF123"),
            (r#"{"api_key":"k-123456789"}"#, "k-123456789"),
            (r#"{\"api_key\":\"k-987654321\"}"#, "k-987654321"),
            ("request failed: api_key=zzz-secret-1&x=1", "zzz-secret-1"),
            ("password: correct-horse", "correct-horse"),
            ("client_secret=shh-1234", "shh-1234"),
            (
                "using key sk-proj-ABCDEFGHIJKLMNOPqrstuv",
                "sk-proj-ABCDEFGHIJKLMNOPqrstuv",
            ),
            ("aws AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
            ("mail ada.lovelace+bruno@example.co.uk now", "ada.lovelace"),
            ("from 203.0.113.7:5123", "203.0.113.7"),
            ("from 2001:db8::8a2e:370:7334", "2001:db8::8a2e:370:7334"),
            (
                "from fe80:0:0:0:200:f8ff:fe21:67cf",
                "fe80:0:0:0:200:f8ff:fe21:67cf",
            ),
        ];
        for (input, secret) in cases {
            let out = redact(input);
            assert!(!out.contains(secret), "{input:?} -> {out:?}");
            assert!(
                out.contains("[REDACTED]") || out.contains("[EMAIL]") || out.contains("[IP]"),
                "{out}"
            );
        }
    }

    #[test]
    fn ordinary_lines_are_untouched() {
        for line in [
            r#"{"timestamp":"2026-11-26T02:33:00.123Z","level":"INFO","message":"listening","addr":"127.0.0.1:8080"}"#,
            "trace 0af7651916cd43dd8448eb211c80319c span b7ad6b7169203331",
            "listening on 0.0.0.0:9090",
            "doc 3f2a9c1e-1b2c-4d5e-8f90-123456789abc indexed, 12 chunks",
            "token count 42 for model all-MiniLM-L6-v2",
            "input_tokens=100 output_tokens=7 max_tokens=512",
            r#"{"target":"bruno_store::chunks","spans":["process"]}"#,
        ] {
            assert_eq!(redact(line), line);
        }
    }

    /// A check of whether some library's logs are on (LanceDB's
    /// `log_enabled!` through tracing-log does exactly this: `enabled` with
    /// no span or event after it) must not hide the next span from the
    /// layers: before `Fresh`, the second `process` span below had no
    /// OpenTelemetry context, and what it parented started traces of their
    /// own.
    #[test]
    fn a_log_level_check_does_not_hide_the_next_span_from_the_layers() {
        let log = LogSettings {
            json: true,
            filter: "info".into(),
        };
        let (dispatch, _guard) = super::dispatch(&log, &TelemetryConfig::default(), "test");
        tracing::dispatcher::with_default(&dispatch, || {
            let traced = |span: &tracing::Span| {
                use tracing_opentelemetry::OpenTelemetrySpanExt;
                span.context().span().span_context().is_valid()
            };
            let process = || tracing::info_span!(target: "bruno_test", "process");
            // The first span registers its callsite: every filter enables it.
            assert!(traced(&process()), "a bruno span is traced");
            for _ in 0..3 {
                // Enabled for the log lines, not for the traces: the
                // filters disagree, and `enabled` runs with nothing after it.
                let logged = tracing::enabled!(target: "lance::io", Level::INFO);
                assert!(logged, "the log filter keeps info lines");
                assert!(traced(&process()), "the span after a level check is traced");
            }
        });
    }
}
