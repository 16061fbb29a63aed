//! Streamed turns: deltas put in order, and the SSE helpers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::Event as SseEvent;
use bruno_events::payload::ChatDelta;
use bruno_runtime::Problem;
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde_json::json;

use crate::Gateway;
use crate::correlate::{ChatAnswer, Next, Pending};

/// Deltas in `seq` order (duplicates dropped, gaps waited for), then the end.
struct Ordered {
    next_seq: u64,
    held: BTreeMap<u64, String>,
    streamed: String,
}

impl Ordered {
    fn new() -> Self {
        Self {
            next_seq: 0,
            held: BTreeMap::new(),
            streamed: String::new(),
        }
    }

    fn push(&mut self, delta: ChatDelta) -> Vec<String> {
        if delta.seq >= self.next_seq {
            self.held.insert(delta.seq, delta.text);
        }
        let mut out = Vec::new();
        while let Some(text) = self.held.remove(&self.next_seq) {
            self.next_seq += 1;
            self.streamed.push_str(&text);
            out.push(text);
        }
        out
    }

    /// What the final answer adds to what was streamed (all of it for a
    /// fallback answer that had no deltas).
    fn rest(&mut self, answer: &str) -> Option<String> {
        let rest = answer
            .strip_prefix(self.streamed.as_str())
            .unwrap_or(answer);
        (!rest.is_empty()).then(|| rest.to_owned())
    }
}

/// One server-sent event of a response stream.
pub(crate) type SseItem = Result<SseEvent, Infallible>;

fn sse_json(name: &str, value: &impl Serialize) -> SseEvent {
    SseEvent::default()
        .event(name)
        .data(serde_json::to_string(value).unwrap_or_default())
}

/// What a streamed turn yields, in order: text as the answer grows, then
/// how it ended.
pub(crate) enum Piece {
    Text(String),
    Done(Box<ChatAnswer>),
    Failed(Problem),
}

/// A turn's replies as [`Piece`]s: deltas in `seq` order, then whatever of
/// the final answer was not streamed, then the end. Records the turn time.
pub(crate) fn pieces(
    gw: Arc<Gateway>,
    pending: Pending,
    started: Instant,
) -> impl Stream<Item = Piece> {
    futures_util::stream::unfold(Some((pending, Ordered::new())), move |state| {
        let gw = gw.clone();
        async move {
            let (mut pending, mut order) = state?;
            loop {
                match pending.next().await {
                    Next::Delta(d) => {
                        let texts = order.push(d);
                        if texts.is_empty() {
                            continue;
                        }
                        let out: Vec<Piece> = texts.into_iter().map(Piece::Text).collect();
                        return Some((futures_util::stream::iter(out), Some((pending, order))));
                    }
                    Next::Search(_) => continue,
                    Next::Done(done) => {
                        gw.metrics
                            .turn_seconds
                            .observe(started.elapsed().as_secs_f64());
                        let mut out = Vec::new();
                        if let Some(rest) = order.rest(&done.answer) {
                            out.push(Piece::Text(rest));
                        }
                        out.push(Piece::Done(Box::new(Gateway::answer(&pending, *done))));
                        return Some((futures_util::stream::iter(out), None));
                    }
                    Next::Failed(p) => {
                        return Some((futures_util::stream::iter(vec![Piece::Failed(p)]), None));
                    }
                }
            }
        }
    })
    .flatten()
}

/// Bruno's SSE: `delta` events, then `done` with the answer (or `error`).
pub(crate) fn stream_events(
    gw: Arc<Gateway>,
    pending: Pending,
    started: Instant,
) -> impl Stream<Item = SseItem> {
    pieces(gw, pending, started).map(|piece| {
        Ok(match piece {
            Piece::Text(t) => sse_json("delta", &json!({ "text": t })),
            Piece::Done(answer) => sse_json("done", &answer),
            Piece::Failed(p) => sse_json("error", &p),
        })
    })
}
