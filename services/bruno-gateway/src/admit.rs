//! What a request must pass before it is published: the API key, the
//! per-key rate limit, the body size and a well-formed body.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use bruno_runtime::Problem;
use bruno_runtime::keys::Caller;
use http::{HeaderMap, StatusCode, header};

use crate::Gateway;

/// Parse a JSON body; a bad one is a 400 naming the offending field.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        Problem::invalid(field, e.inner().to_string())
    })
}

impl Gateway {
    /// Check the API key (401) and the key's rate limit (429 + Retry-After).
    pub(crate) fn admit(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let caller = self.keys.check(headers).ok_or_else(|| {
            Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is required",
            )
        })?;
        if let Some(limiter) = &self.limiter {
            let key = match caller {
                Caller::Anonymous => "anonymous".to_owned(),
                Caller::Key(k) => k,
            };
            if let Err(not_until) = limiter.check_key(&key) {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                let secs = u32::try_from(wait.as_secs() + 1).unwrap_or(u32::MAX);
                return Err(Problem {
                    retry_after: Some(secs),
                    ..Problem::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate-limited",
                        "too many requests for this key",
                    )
                });
            }
        }
        Ok(())
    }

    /// A message or query must not be blank nor over `max_message_chars`.
    pub(crate) fn check_text(&self, field: &str, text: &str) -> Result<(), Problem> {
        if text.trim().is_empty() {
            return Err(Problem::invalid(field, "must not be empty"));
        }
        let n = text.chars().count();
        if n > self.config.max_message_chars {
            return Err(Problem::invalid(
                field,
                format!(
                    "{n} characters exceeds the limit of {} (gateway.max_message_chars)",
                    self.config.max_message_chars
                ),
            ));
        }
        Ok(())
    }
}

/// Middleware: a body over `max_body_bytes` (declared, or found while
/// reading) is a 413 problem+json.
pub(crate) async fn too_large(
    gw: Arc<Gateway>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = gw.config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("body over {limit} bytes (gateway.max_body_bytes)"),
        )
        .into_response();
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("body over {limit} bytes (gateway.max_body_bytes)"),
        )
        .into_response();
    }
    response
}
