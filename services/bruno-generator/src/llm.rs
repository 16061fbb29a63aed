//! Streaming chat completions from Ollama (`/api/chat`, NDJSON) and
//! OpenAI-compatible servers (`/v1/chat/completions`, Server-Sent Events).

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// One chat message sent to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with `role`.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
        }
    }
}

/// `[generator.llm]`: which server, which model.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum LlmConfig {
    /// Ollama: `POST {url}/api/chat`.
    Ollama {
        /// Base URL (`http://127.0.0.1:11434`).
        url: String,
        /// Model name.
        model: String,
    },
    /// OpenAI-compatible: `POST {url}/v1/chat/completions`.
    Openai {
        /// Base URL (`https://api.openai.com`, `http://vllm:8000`).
        url: String,
        /// Model name.
        model: String,
        /// Bearer token.
        #[serde(default)]
        api_key: Option<bruno_core::Secret>,
    },
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self::Ollama {
            url: "http://127.0.0.1:11434".into(),
            model: "llama3.2".into(),
        }
    }
}

impl LlmConfig {
    /// The model name.
    pub fn model(&self) -> &str {
        match self {
            Self::Ollama { model, .. } | Self::Openai { model, .. } => model,
        }
    }
}

/// Options of one completion.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Most completion tokens.
    pub max_tokens: Option<u32>,
}

/// What a finished completion reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens (as the server counted them).
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
}

/// A completion that did not finish.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// Cannot connect, 5xx, 429, or the stream broke.
    #[error("LLM unavailable: {0}")]
    Unavailable(String),
    /// No progress within the timeout.
    #[error("LLM timed out after {0:?}")]
    Timeout(Duration),
    /// The server answered something that is not its protocol.
    #[error("LLM answered badly: {0}")]
    BadResponse(String),
}

/// A client for the configured server.
#[derive(Clone)]
pub struct Llm {
    client: reqwest::Client,
    config: LlmConfig,
    /// Longest wait for the first byte and between chunks.
    idle: Duration,
}

impl Llm {
    /// A client; `idle` bounds the wait for the response and between chunks.
    pub fn new(config: LlmConfig, idle: Duration) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self {
            client,
            config,
            idle,
        }
    }

    /// The model name.
    pub fn model(&self) -> &str {
        self.config.model()
    }

    /// Stream a completion: `on_delta` gets each piece of text in order.
    /// The call is a client span (OpenTelemetry GenAI conventions) with the
    /// token counts the server reported.
    pub async fn stream(
        &self,
        messages: &[Message],
        options: &Options,
        on_delta: impl FnMut(String),
    ) -> Result<Usage, LlmError> {
        use tracing::Instrument;
        let system = match &self.config {
            LlmConfig::Ollama { .. } => "ollama",
            LlmConfig::Openai { .. } => "openai",
        };
        let span = tracing::info_span!(
            "llm",
            otel.name = %format_args!("chat {}", self.model()),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            "gen_ai.operation.name" = "chat",
            "gen_ai.system" = system,
            "gen_ai.request.model" = %self.model(),
            "gen_ai.request.max_tokens" = options.max_tokens,
            "gen_ai.usage.input_tokens" = tracing::field::Empty,
            "gen_ai.usage.output_tokens" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
        );
        let result = self
            .stream_untraced(messages, options, on_delta)
            .instrument(span.clone())
            .await;
        match &result {
            Ok(usage) => {
                span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
                span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
            }
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", e.to_string());
            }
        }
        result
    }

    async fn stream_untraced(
        &self,
        messages: &[Message],
        options: &Options,
        mut on_delta: impl FnMut(String),
    ) -> Result<Usage, LlmError> {
        let (request, ollama) = match &self.config {
            LlmConfig::Ollama { url, model } => {
                let mut opts = serde_json::Map::new();
                if let Some(t) = options.temperature {
                    opts.insert("temperature".into(), json!(t));
                }
                if let Some(n) = options.max_tokens {
                    opts.insert("num_predict".into(), json!(n));
                }
                let body =
                    json!({"model": model, "messages": messages, "stream": true, "options": opts});
                (
                    self.client
                        .post(format!("{}/api/chat", url.trim_end_matches('/')))
                        .json(&body),
                    true,
                )
            }
            LlmConfig::Openai {
                url,
                model,
                api_key,
            } => {
                let mut body = json!({
                    "model": model, "messages": messages, "stream": true,
                    "stream_options": {"include_usage": true},
                });
                if let Some(t) = options.temperature {
                    body["temperature"] = json!(t);
                }
                if let Some(n) = options.max_tokens {
                    body["max_tokens"] = json!(n);
                }
                let mut r = self
                    .client
                    .post(format!("{}/v1/chat/completions", url.trim_end_matches('/')))
                    .json(&body);
                if let Some(key) = api_key {
                    r = r.bearer_auth(key.expose());
                }
                (r, false)
            }
        };
        let response = tokio::time::timeout(self.idle, request.send())
            .await
            .map_err(|_| LlmError::Timeout(self.idle))?
            .map_err(|e| LlmError::Unavailable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body: String = response
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            return Err(if status.is_server_error() || status.as_u16() == 429 {
                LlmError::Unavailable(format!("{status}: {body}"))
            } else {
                LlmError::BadResponse(format!("{status}: {body}"))
            });
        }
        let mut body = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let mut usage = Usage::default();
        loop {
            let chunk = match tokio::time::timeout(self.idle, body.next()).await {
                Err(_) => return Err(LlmError::Timeout(self.idle)),
                Ok(None) => {
                    return Err(LlmError::Unavailable(
                        "the stream ended before it was done".into(),
                    ));
                }
                Ok(Some(Err(e))) => return Err(LlmError::Unavailable(e.to_string())),
                Ok(Some(Ok(c))) => c,
            };
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let done = if ollama {
                    ollama_line(line, &mut usage, &mut on_delta)?
                } else {
                    openai_line(line, &mut usage, &mut on_delta)?
                };
                if done {
                    return Ok(usage);
                }
            }
        }
    }
}

/// One NDJSON object of Ollama's `/api/chat` stream; `true` once done.
fn ollama_line(
    line: &str,
    usage: &mut Usage,
    on_delta: &mut impl FnMut(String),
) -> Result<bool, LlmError> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| LlmError::BadResponse(format!("{e}: {line}")))?;
    if let Some(error) = v.get("error").and_then(Value::as_str) {
        return Err(LlmError::Unavailable(error.to_owned()));
    }
    if let Some(text) = v.pointer("/message/content").and_then(Value::as_str)
        && !text.is_empty()
    {
        on_delta(text.to_owned());
    }
    if v.get("done").and_then(Value::as_bool) == Some(true) {
        usage.prompt_tokens = v
            .get("prompt_eval_count")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        usage.completion_tokens = v.get("eval_count").and_then(Value::as_u64).unwrap_or(0);
        return Ok(true);
    }
    Ok(false)
}

/// One line of an OpenAI-compatible SSE stream; `true` at `[DONE]`.
fn openai_line(
    line: &str,
    usage: &mut Usage,
    on_delta: &mut impl FnMut(String),
) -> Result<bool, LlmError> {
    let Some(data) = line.strip_prefix("data:") else {
        return Ok(false); // comments, `event:` and `id:` lines
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(true);
    }
    let v: Value =
        serde_json::from_str(data).map_err(|e| LlmError::BadResponse(format!("{e}: {data}")))?;
    if let Some(error) = v.get("error") {
        return Err(LlmError::Unavailable(error.to_string()));
    }
    if let Some(text) = v
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
        && !text.is_empty()
    {
        on_delta(text.to_owned());
    }
    if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
        usage.prompt_tokens = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
        usage.completion_tokens = u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0);
    }
    Ok(false)
}
