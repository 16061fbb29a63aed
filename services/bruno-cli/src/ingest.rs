//! `bruno ingest`: files and directories of text/markdown become
//! `document.submitted` events POSTed to the ingress.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use bruno_events::EventData;
use bruno_events::payload::{DocFormat, DocumentSubmitted};
use futures_util::StreamExt;
use serde::Serialize;

/// One file to send.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The file.
    pub path: PathBuf,
    /// Text or markdown (from the extension).
    pub format: DocFormat,
}

/// What happened to one file.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// The file.
    pub path: String,
    /// The document id it was sent as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doc_id: Option<String>,
    /// `accepted`, `skipped` or `failed`.
    pub status: &'static str,
    /// Why it was skipped or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    /// Files the ingress accepted.
    pub accepted: usize,
    /// Files not sent (not text, not UTF-8, empty).
    pub skipped: usize,
    /// Files the ingress refused or that could not be sent.
    pub failed: usize,
    /// Per file.
    pub files: Vec<FileReport>,
}

fn format_of(path: &Path) -> Option<DocFormat> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("md" | "markdown" | "mdx") => Some(DocFormat::Markdown),
        Some("txt" | "text" | "rst" | "adoc" | "org") => Some(DocFormat::Text),
        _ => None,
    }
}

/// The text and markdown files under `paths` (directories are walked,
/// hidden entries skipped), sorted, each once; other files named directly
/// are an error, found in directories they are ignored.
pub fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for root in paths {
        let meta = std::fs::metadata(root).with_context(|| format!("{}", root.display()))?;
        if meta.is_file() {
            let format = format_of(root).with_context(|| {
                format!(
                    "{}: not a text or markdown file (.txt, .md, ...)",
                    root.display()
                )
            })?;
            out.push(Candidate {
                path: root.clone(),
                format,
            });
            continue;
        }
        let walk = walkdir::WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'));
        for entry in walk {
            let entry = entry.with_context(|| format!("walking {}", root.display()))?;
            if entry.file_type().is_file()
                && let Some(format) = format_of(entry.path())
            {
                out.push(Candidate {
                    path: entry.into_path(),
                    format,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok(out)
}

/// The title: the first markdown `# heading`, else the file stem.
pub fn title_of(path: &Path, format: DocFormat, text: &str) -> String {
    if format == DocFormat::Markdown
        && let Some(h) = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix("# "))
        && !h.trim().is_empty()
    {
        return h.trim().to_owned();
    }
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The document a file becomes: its id is its path (as given), so ingesting
/// the same tree again replaces each document's previous version.
pub fn document(candidate: &Candidate, source: &str) -> Result<DocumentSubmitted, String> {
    let bytes = std::fs::read(&candidate.path).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    if text.trim().is_empty() {
        return Err("empty".into());
    }
    let doc_id = candidate.path.to_string_lossy().into_owned();
    Ok(DocumentSubmitted {
        title: Some(title_of(&candidate.path, candidate.format, &text)),
        doc_id,
        source: source.to_owned(),
        text,
        format: candidate.format,
        metadata: Default::default(),
    })
}

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// The ingress URL (`http://127.0.0.1:8080/`).
    pub url: String,
    /// An API key, if the ingress wants one.
    pub api_key: Option<String>,
    /// The documents' `source`.
    pub source: String,
    /// Requests in flight.
    pub concurrency: usize,
    /// `replyto` and `correlationid` for every document, so that their
    /// `document.indexed` reach a [`Watch`].
    pub reply: Option<(String, String)>,
}

async fn send(
    client: &reqwest::Client,
    target: &Target,
    doc: &DocumentSubmitted,
) -> Result<(), String> {
    let body = serde_json::to_vec(doc).map_err(|e| e.to_string())?;
    let id = uuid::Uuid::new_v4().to_string();
    for attempt in 0..5u32 {
        let mut request = client
            .post(&target.url)
            .header("ce-specversion", "1.0")
            .header("ce-id", &id)
            .header("ce-type", DocumentSubmitted::TYPE)
            .header("ce-source", "bruno/cli/ingest")
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(key) = &target.api_key {
            request = request.bearer_auth(key);
        }
        if let Some((inbox, correlation)) = &target.reply {
            request = request
                .header("ce-replyto", inbox)
                .header("ce-correlationid", correlation);
        }
        match request.send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            // The ingress cannot reach the broker right now: it says when to retry.
            Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE && attempt < 4 => {
                let wait = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait.min(10))).await;
            }
            Ok(r) => {
                let status = r.status();
                let detail = r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                return Err(format!("ingress answered {status}: {detail}"));
            }
            Err(e) if attempt < 4 => {
                tracing::debug!(error = %e, "retrying");
                tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
            }
            Err(e) => return Err(format!("cannot reach the ingress at {}: {e}", target.url)),
        }
    }
    Err("ingress kept answering 503".into())
}

/// Send every candidate; `progress` is told after each file.
pub async fn run(
    candidates: Vec<Candidate>,
    target: &Target,
    progress: impl Fn(&FileReport),
) -> IngestReport {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_default();
    let mut report = IngestReport::default();
    let mut results = futures_util::stream::iter(candidates)
        .map(|c| {
            let client = &client;
            async move {
                let path = c.path.display().to_string();
                match tokio::task::spawn_blocking({
                    let c = c.clone();
                    let source = target.source.clone();
                    move || document(&c, &source)
                })
                .await
                {
                    Ok(Ok(doc)) => match send(client, target, &doc).await {
                        Ok(()) => FileReport {
                            path,
                            doc_id: Some(doc.doc_id),
                            status: "accepted",
                            reason: None,
                        },
                        Err(reason) => FileReport {
                            path,
                            doc_id: Some(doc.doc_id),
                            status: "failed",
                            reason: Some(reason),
                        },
                    },
                    Ok(Err(reason)) => FileReport {
                        path,
                        doc_id: None,
                        status: "skipped",
                        reason: Some(reason),
                    },
                    Err(e) => FileReport {
                        path,
                        doc_id: None,
                        status: "failed",
                        reason: Some(e.to_string()),
                    },
                }
            }
        })
        .buffered(target.concurrency.max(1));
    while let Some(file) = results.next().await {
        match file.status {
            "accepted" => report.accepted += 1,
            "skipped" => report.skipped += 1,
            _ => report.failed += 1,
        }
        progress(&file);
        report.files.push(file);
    }
    report
}

/// What became of the documents `bruno ingest --wait` sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WaitReport {
    /// Documents the ingress accepted.
    pub sent: usize,
    /// Documents committed (or unchanged, so already searchable).
    pub indexed: usize,
    /// Documents dead-lettered on the way, with the reason.
    pub failed: Vec<(String, String)>,
    /// Documents neither indexed nor failed when the wait ended.
    pub pending: Vec<String>,
}

/// The parts of long documents indexed so far: a long document is written
/// in parts, each answered by its own `document.indexed`; a redelivered part
/// is answered again and counted once.
#[derive(Default)]
struct Parts(std::collections::BTreeMap<String, std::collections::BTreeMap<u64, u64>>);

impl Parts {
    /// Note `done`; whether its document is now wholly indexed.
    fn whole(&mut self, done: &bruno_events::payload::DocumentIndexed) -> bool {
        if done.whole() {
            self.0.remove(&done.doc_id);
            return true;
        }
        let seen = self.0.entry(done.doc_id.clone()).or_default();
        seen.insert(done.first_chunk, done.chunks_written);
        if seen.values().sum::<u64>() >= done.chunk_count {
            self.0.remove(&done.doc_id);
            return true;
        }
        false
    }
}

/// Follows the documents of one `bruno ingest` run: their `document.indexed`
/// come to a reply inbox under one correlation id; the ones dead-lettered
/// by the embedder or the writer are found in those parts' DLQs by the
/// same correlation id.
pub struct Watch {
    broker: bruno_broker::Broker,
    cancel: tokio_util::sync::CancellationToken,
    inbox: bruno_broker::reply::Inbox,
    registration: bruno_broker::reply::Registration,
    correlation: String,
}

impl Watch {
    /// Connect and wait until the inbox is bound.
    pub async fn start(config: &crate::Config) -> anyhow::Result<Self> {
        use bruno_events::payload::DocumentIndexed;
        let (broker, cancel) = crate::connect_for_tool(config).await?;
        let inbox = bruno_broker::reply::Inbox::start(
            broker.clone(),
            vec![DocumentIndexed::TYPE.to_owned()],
            cancel.clone(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !inbox.is_ready() {
            if tokio::time::Instant::now() > deadline {
                cancel.cancel();
                anyhow::bail!("the reply queue for --wait was not ready within 10s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let correlation = uuid::Uuid::new_v4().to_string();
        let registration = inbox.register(&correlation);
        Ok(Self {
            broker,
            cancel,
            inbox,
            registration,
            correlation,
        })
    }

    /// `replyto` and `correlationid` for the documents to send.
    pub fn address(&self) -> (String, String) {
        (self.inbox.id().to_owned(), self.correlation.clone())
    }

    /// Wait until every one of `doc_ids` is indexed or failed, or until
    /// `timeout`; `progress(indexed, failed)` is told of each change.
    pub async fn wait(
        mut self,
        doc_ids: &[String],
        timeout: Duration,
        progress: impl Fn(usize, usize),
    ) -> WaitReport {
        use bruno_broker::reply::Reply;
        use bruno_events::payload::DocumentIndexed;
        use std::collections::{BTreeMap, BTreeSet};
        let mut pending: BTreeSet<&str> = doc_ids.iter().map(String::as_str).collect();
        let mut indexed = 0;
        let mut failed: BTreeMap<String, String> = BTreeMap::new();
        let mut parts = Parts::default();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut dlq_check = tokio::time::interval(Duration::from_secs(3));
        dlq_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pending.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                reply = self.registration.replies.recv() => match reply {
                    Some(Reply::Event(event)) => {
                        if let Ok(done) = bruno_events::decode_data::<DocumentIndexed>(&event)
                            && pending.contains(done.doc_id.as_str())
                            && parts.whole(&done)
                        {
                            pending.remove(done.doc_id.as_str());
                            indexed += 1;
                        }
                    }
                    // The connection dropped; the inbox comes back by itself.
                    Some(Reply::Lost) => {}
                    None => break,
                },
                _ = dlq_check.tick() => {
                    for part in ["embedder", "writer"] {
                        let Ok(letters) = bruno_broker::dlq::list(&self.broker, part, 100_000).await else {
                            continue;
                        };
                        for letter in letters {
                            if letter.headers.get("correlationid") != Some(&self.correlation) {
                                continue;
                            }
                            let doc_id = serde_json::from_str::<serde_json::Value>(&letter.data)
                                .ok()
                                .and_then(|v| v["doc_id"].as_str().map(str::to_owned));
                            if let Some(doc_id) = doc_id
                                && pending.remove(doc_id.as_str())
                            {
                                failed.insert(doc_id, format!("{} ({part}): {}", letter.code, letter.reason));
                            }
                        }
                    }
                }
            }
            progress(indexed, failed.len());
        }
        self.cancel.cancel();
        WaitReport {
            sent: doc_ids.len(),
            indexed,
            failed: failed.into_iter().collect(),
            pending: pending.into_iter().map(str::to_owned).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Parts;
    use bruno_events::payload::DocumentIndexed;

    fn part(first: u64, written: u64, count: u64) -> DocumentIndexed {
        DocumentIndexed {
            doc_id: "d".into(),
            chunks_written: written,
            chunks_removed: 0,
            table_version: 1,
            unchanged: false,
            chunk_count: count,
            first_chunk: first,
        }
    }

    #[test]
    fn a_long_document_is_whole_once_every_part_is_in_and_repeats_count_once() {
        let mut parts = Parts::default();
        assert!(!parts.whole(&part(0, 32, 70)));
        assert!(
            !parts.whole(&part(0, 32, 70)),
            "a redelivered part is one part"
        );
        assert!(!parts.whole(&part(64, 6, 70)));
        assert!(parts.whole(&part(32, 32, 70)));
        assert!(parts.0.is_empty());
        // One part, an unchanged document and an older writer's event.
        assert!(parts.whole(&part(0, 5, 5)));
        let mut unchanged = part(0, 0, 0);
        unchanged.unchanged = true;
        assert!(parts.whole(&unchanged));
        assert!(parts.whole(&part(0, 3, 0)));
    }
}
