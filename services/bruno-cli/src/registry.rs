//! The part registry: every part of the fleet, declared once.
//!
//! An entry names the part, says what it takes (derived from its handler's
//! input type, so the bindings cannot disagree with the code), whether it
//! consumes a queue or serves HTTP, what it needs loaded, its place in the
//! shutdown order, and how to build it from the config. `bruno <part>`,
//! `bruno dev [--parts a,b]`, the broker topology, the AsyncAPI document,
//! `deploy/rabbitmq/topology.yaml` and the part table in
//! `docs/architecture.md` all read this one list. Adding a part is one
//! crate plus one entry here.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use bruno_backup::{BackupMetrics, BackupService};
use bruno_broker::{Broker, PartSpec};
use bruno_embed::AnyEmbedder;
use bruno_embedder::{EmbedderMetrics, EmbedderService};
use bruno_gateway::{Gateway, GatewayMetrics};
use bruno_generator::{Generator, GeneratorMetrics};
use bruno_ingress::{Ingress, IngressMetrics};
use bruno_retriever::{Retriever, RetrieverMetrics};
use bruno_runtime::admin::Readiness;
use bruno_runtime::{FromEvent, Handler};
use bruno_store::Store;
use bruno_writer::{Writer, WriterMetrics};
use futures_util::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::Config;

/// When a part stops on shutdown: every part of a stage has stopped before
/// the next stage is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// HTTP fronts: stop taking requests first.
    Front,
    /// Consumers: finish their in-flight messages.
    Worker,
    /// The writer: commits what the workers handed it, then stops.
    Store,
}

/// How a part runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Consumes its own queue (pull mode); a Knative Trigger in push mode.
    Consumer {
        /// One active consumer at a time (the others are hot standbys).
        single_active: bool,
        /// Its work is requests a caller awaits: a classic queue with a
        /// request TTL instead of a quorum queue (ADR 17).
        interactive: bool,
    },
    /// Serves HTTP (a Knative Service).
    Http,
}

/// What a part's build gets: the config and everything shared in the process.
pub struct Build<'a> {
    /// The whole config.
    pub config: &'a Config,
    /// The process's broker connection.
    pub broker: &'a Broker,
    /// Where the part registers its metrics.
    pub metrics: &'a mut Registry,
    /// The process's readiness checks; a part adds its own.
    pub readiness: &'a mut Readiness,
    /// Fires when this part is told to stop (its stage's turn).
    pub stop: CancellationToken,
    pub(crate) model: Option<&'a Arc<AnyEmbedder>>,
    pub(crate) store: Option<&'a Store>,
}

impl Build<'_> {
    /// The embedding model (loaded because the entry says it needs it).
    pub fn model(&self) -> anyhow::Result<Arc<AnyEmbedder>> {
        self.model
            .cloned()
            .context("part needs the model but its entry does not say so")
    }
    /// The store (opened because the entry says it needs it).
    pub fn store(&self) -> anyhow::Result<Store> {
        self.store
            .cloned()
            .context("part needs the store but its entry does not say so")
    }
    /// Consume `name`'s queue with `handler` until this part is told to
    /// stop; or, with `consumers.push_listen` set, serve it as a Knative
    /// Trigger subscriber on that address (push mode).
    pub fn consumer<H: Handler>(&self, name: &str, concurrency: u16, handler: H) -> Started {
        let (broker, stop) = (self.broker.clone(), self.stop.clone());
        if let Some(addr) = self.config.consumers.push_listen {
            let part = bruno_runtime::push_part(
                name,
                Some(broker),
                Arc::new(handler),
                self.config.consumers.push_max_body_bytes,
                stop,
            );
            return Started::Http {
                listen: ("consumers.push_listen", addr),
                router: part.router,
                after: Some(part.finish),
            };
        }
        let name = name.to_owned();
        Started::Consumer(Box::pin(async move {
            bruno_runtime::run_pull(broker, &name, concurrency, Arc::new(handler), stop).await;
        }))
    }
    /// Add a readiness check.
    pub fn ready_when(&mut self, name: &str, check: impl Fn() -> bool + Send + Sync + 'static) {
        let readiness = std::mem::take(self.readiness);
        *self.readiness = readiness.check(name, check);
    }
}

/// A built part, ready to run.
pub enum Started {
    /// A consumer loop (ends after its stop token fired and it drained).
    Consumer(BoxFuture<'static, ()>),
    /// An HTTP service to serve on `listen` (stops taking requests on shutdown).
    Http {
        /// Config key and address to bind.
        listen: (&'static str, SocketAddr),
        /// Its routes.
        router: Router,
        /// Awaited once the server has drained (a push-mode part's stop hook).
        after: Option<BoxFuture<'static, ()>>,
    },
}

/// One part of the fleet.
pub struct PartEntry {
    /// Its name: the subcommand, the queue, the `bruno/<name>` source.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Queue consumer, HTTP service, or queue only.
    pub role: Role,
    /// Its place in the shutdown order.
    pub stage: Stage,
    /// Event types it consumes from its queue (its handler's input types).
    pub consumes: fn() -> Vec<&'static str>,
    /// Reply event types it awaits on its own inbox (the gateway).
    pub awaits: &'static [&'static str],
    /// It needs the embedding model loaded.
    pub needs_model: bool,
    /// It needs the LanceDB store opened.
    pub needs_store: bool,
    /// Build it.
    pub build: fn(&mut Build<'_>) -> anyhow::Result<Started>,
}

impl PartEntry {
    /// How it runs, in words.
    pub fn role_label(&self) -> &'static str {
        match self.role {
            Role::Consumer {
                single_active: true,
                ..
            } => "queue consumer, single active",
            Role::Consumer {
                interactive: true, ..
            } => "queue consumer, interactive requests",
            Role::Consumer { .. } => "queue consumer",
            Role::Http => "HTTP service",
        }
    }

    /// When it stops, in words.
    pub fn stage_label(&self) -> &'static str {
        match self.stage {
            Stage::Front => "1st",
            Stage::Worker => "2nd",
            Stage::Store => "3rd",
        }
    }
}

impl std::fmt::Debug for PartEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartEntry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn types_of<H: Handler>() -> Vec<&'static str> {
    <H::Input as FromEvent>::types()
}

fn none() -> Vec<&'static str> {
    Vec::new()
}

static PARTS: &[PartEntry] = &[
    PartEntry {
        name: "ingress",
        about: "HTTP CloudEvents in, published with confirms",
        role: Role::Http,
        stage: Stage::Front,
        consumes: none,
        awaits: &[],
        needs_model: false,
        needs_store: false,
        build: |b| {
            let metrics = IngressMetrics::default();
            metrics.register(b.metrics);
            let config = &b.config.ingress;
            let ingress = Arc::new(Ingress::new(config, b.broker.clone(), metrics)?);
            Ok(Started::Http {
                listen: ("ingress.listen", config.listen),
                router: bruno_ingress::router(ingress),
                after: None,
            })
        },
    },
    PartEntry {
        name: "embedder",
        about: "documents and finished turns → chunks → vectors → memory.write",
        role: Role::Consumer {
            single_active: false,
            interactive: false,
        },
        stage: Stage::Worker,
        consumes: types_of::<EmbedderService>,
        awaits: &[],
        needs_model: true,
        needs_store: true,
        build: |b| {
            let metrics = EmbedderMetrics::default();
            metrics.register(b.metrics);
            let config = b.config;
            let handler = EmbedderService::new(
                b.model()?,
                Some(b.store()?),
                config.chunking.clone(),
                metrics,
            );
            Ok(b.consumer("embedder", config.consumers.embedder, handler))
        },
    },
    PartEntry {
        name: "writer",
        about: "the one LanceDB writer: batched commits, compaction",
        role: Role::Consumer {
            single_active: true,
            interactive: false,
        },
        stage: Stage::Store,
        consumes: types_of::<Writer>,
        awaits: &[],
        needs_model: false,
        needs_store: true,
        build: |b| {
            let metrics = WriterMetrics::default();
            metrics.register(b.metrics);
            let config = &b.config.writer;
            let handler = Writer::new(b.store()?, config, metrics);
            Ok(b.consumer("writer", config.concurrency, handler))
        },
    },
    PartEntry {
        name: "retriever",
        about: "hybrid search replies and chat context",
        role: Role::Consumer {
            single_active: false,
            interactive: true,
        },
        stage: Stage::Worker,
        consumes: types_of::<Retriever>,
        awaits: &[],
        needs_model: true,
        needs_store: true,
        build: |b| {
            let metrics = RetrieverMetrics::default();
            metrics.register(b.metrics);
            let config = b.config;
            config
                .retriever
                .ranking
                .check()
                .map_err(anyhow::Error::msg)?;
            let handler = Retriever::new(b.model()?, b.store()?, config.retriever.clone(), metrics);
            Ok(b.consumer("retriever", config.consumers.retriever, handler))
        },
    },
    PartEntry {
        name: "generator",
        about: "the LLM: streamed chat.delta, chat.completed, circuit breaker",
        role: Role::Consumer {
            single_active: false,
            interactive: true,
        },
        stage: Stage::Worker,
        consumes: types_of::<Generator>,
        awaits: &[],
        needs_model: false,
        needs_store: false,
        build: |b| {
            let metrics = GeneratorMetrics::default();
            metrics.register(b.metrics);
            let config = b.config;
            let handler = Generator::new(config.generator.clone(), metrics);
            Ok(b.consumer("generator", config.consumers.generator, handler))
        },
    },
    PartEntry {
        name: "gateway",
        about: "HTTP chat, search and OpenAI-compatible APIs over correlated replies",
        role: Role::Http,
        stage: Stage::Front,
        consumes: none,
        awaits: &bruno_gateway::REPLY_TYPES,
        needs_model: false,
        needs_store: false,
        build: |b| {
            let metrics = GatewayMetrics::default();
            metrics.register(b.metrics);
            let config = &b.config.gateway;
            let gateway = Arc::new(Gateway::new(
                config.clone(),
                b.broker.clone(),
                metrics,
                b.stop.clone(),
            )?);
            let ready = gateway.clone();
            b.ready_when("reply-queue", move || ready.is_ready());
            Ok(Started::Http {
                listen: ("gateway.listen", config.listen),
                router: bruno_gateway::router(gateway),
                after: None,
            })
        },
    },
    PartEntry {
        name: "backup",
        about: "encrypted LanceDB backups, verified by a restore; retention",
        role: Role::Consumer {
            single_active: true,
            interactive: false,
        },
        stage: Stage::Worker,
        consumes: types_of::<BackupService>,
        awaits: &[],
        needs_model: false,
        needs_store: true,
        build: |b| {
            let metrics = BackupMetrics::default();
            metrics.register(b.metrics);
            let config = &b.config.backup;
            let engine = config.engine(b.store()?)?;
            let handler = BackupService::new(engine, config.clone(), metrics);
            Ok(b.consumer("backup", 1, handler))
        },
    },
];

/// Every part.
pub fn entries() -> &'static [PartEntry] {
    PARTS
}

/// A part by name.
pub fn find(name: &str) -> Option<&'static PartEntry> {
    PARTS.iter().find(|p| p.name == name)
}

/// The names of every part (what `bruno dev` runs).
pub fn runnable() -> Vec<&'static str> {
    PARTS.iter().map(|p| p.name).collect()
}

/// The parts named, in registry order; an unknown name is an error.
pub fn select(names: &[&str]) -> anyhow::Result<Vec<&'static PartEntry>> {
    for name in names {
        if find(name).is_none() {
            anyhow::bail!(
                "unknown part {name:?}; the parts are {}",
                runnable().join(", ")
            );
        }
    }
    Ok(PARTS.iter().filter(|p| names.contains(&p.name)).collect())
}

/// The broker topology's parts: one queue per consuming part, bound on the
/// types its handler takes.
pub fn part_specs() -> Vec<PartSpec> {
    PARTS
        .iter()
        .filter_map(|p| match p.role {
            Role::Http => None,
            Role::Consumer {
                single_active,
                interactive,
            } => {
                let mut spec = PartSpec::on_types(p.name, &(p.consumes)());
                spec.single_active_consumer = single_active;
                spec.interactive = interactive;
                Some(spec)
            }
        })
        .collect()
}

/// Notification types: catalogue types no part's queue takes. They reach
/// requesters' inboxes and observers; when nobody listens they are kept
/// briefly in the observed queue, not in the unroutable one (ADR 12).
pub fn observed_types() -> Vec<&'static str> {
    bruno_events::catalogue()
        .iter()
        .map(|e| e.ty)
        .filter(|ty| !PARTS.iter().any(|p| (p.consumes)().contains(ty)))
        .collect()
}

/// The fleet's whole topology under `config`.
/// Parts that `broker.push_parts` names keep their queues (their DLQ takes
/// Knative's dead letters) but no bindings: Knative Triggers serve them, so
/// nothing may pile up in a queue nobody consumes (ADR 15).
pub fn topology(config: &bruno_broker::BrokerConfig) -> bruno_broker::Topology {
    let parts = part_specs()
        .into_iter()
        .map(|mut p| {
            if config.push_parts.contains(&p.name) {
                p.bindings.clear();
            }
            p
        })
        .collect();
    bruno_broker::Topology::new(config, parts).with_observed(observed_types())
}

/// The parts Knative Triggers serve in push mode: every consumer but the
/// writer, which stays a single-active consumer of its own queue (ADR 13,
/// ADR 15).
pub fn push_parts() -> Vec<&'static str> {
    PARTS
        .iter()
        .filter(|p| matches!(p.role, Role::Consumer { .. }) && p.stage != Stage::Store)
        .map(|p| p.name)
        .collect()
}

/// A DNS-label slug of an event type: `bruno.document.submitted.v1` →
/// `document-submitted-v1`.
fn slug(ty: &str) -> String {
    ty.strip_prefix("bruno.")
        .unwrap_or(ty)
        .replace(['.', '_'], "-")
}

/// The Knative Triggers of push mode (ADR 15), on the `bruno` Broker:
/// - one per binding of each push part ([`push_parts`]), filtered on
///   exactly that binding's attributes, delivering to the part's Knative
///   Service, retried `broker.max_attempts - 1` times with exponential
///   backoff from the first retry tier, dead letters to the bridge's
///   `/dead-letters/<part>` (so `bruno dlq` sees them);
/// - one per binding of each pull part (the writer), delivering to the
///   bridge, which publishes into `bruno.events` and so into its queue;
/// - one per other type someone awaits (replies for the gateway's and the
///   CLI's inboxes, notifications), delivering to the bridge.
pub fn knative_triggers(config: &bruno_broker::BrokerConfig) -> Vec<serde_json::Value> {
    use serde_json::json;
    let push = push_parts();
    let service = |name: &str| json!({"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": name});
    let delivery = |part: &str| {
        let first = config.retry_delays_ms.first().copied().unwrap_or(1_000);
        json!({
            "retry": config.max_attempts.saturating_sub(1).max(1),
            "backoffPolicy": "exponential",
            "backoffDelay": format!("PT{}S", (first / 1000).max(1)),
            "deadLetterSink": {"ref": service("bruno-bridge"), "uri": format!("/dead-letters/{part}")},
        })
    };
    let trigger = |name: String,
                   part: &str,
                   filter: &std::collections::BTreeMap<String, String>,
                   subscriber: serde_json::Value,
                   delivery: serde_json::Value| {
        json!({
            "apiVersion": "eventing.knative.dev/v1",
            "kind": "Trigger",
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/part-of": "bruno", "bruno.dev/part": part},
            },
            "spec": {
                "broker": "bruno",
                "filter": {"attributes": filter},
                "subscriber": subscriber,
                "delivery": delivery,
            },
        })
    };
    let mut out = Vec::new();
    let mut to_bridge = std::collections::BTreeSet::new();
    for spec in part_specs() {
        let pushed = push.contains(&spec.name.as_str());
        for binding in &spec.bindings {
            let ty = binding.get("type").map_or("any", String::as_str);
            let subscriber = if pushed {
                json!({"ref": service(&format!("bruno-{}", spec.name))})
            } else {
                to_bridge.insert(ty.to_owned());
                json!({"ref": service("bruno-bridge")})
            };
            out.push(trigger(
                format!("bruno-{}-{}", spec.name, slug(ty)),
                &spec.name,
                binding,
                subscriber,
                delivery(&spec.name),
            ));
        }
    }
    let mut awaited: Vec<&str> = PARTS
        .iter()
        .flat_map(|p| p.awaits.iter().copied())
        .collect();
    awaited.extend(observed_types());
    awaited.sort_unstable();
    awaited.dedup();
    for ty in awaited.into_iter().filter(|t| !to_bridge.contains(*t)) {
        out.push(trigger(
            format!("bruno-reply-{}", slug(ty)),
            "bridge",
            &std::collections::BTreeMap::from([("type".to_owned(), ty.to_owned())]),
            json!({"ref": service("bruno-bridge")}),
            json!({"retry": 2, "backoffPolicy": "exponential", "backoffDelay": "PT1S"}),
        ));
    }
    out
}

/// The parts that take events of type `ty` (from a queue or an inbox).
pub fn consumers_of(ty: &str) -> Vec<String> {
    PARTS
        .iter()
        .filter(|p| (p.consumes)().contains(&ty) || p.awaits.contains(&ty))
        .map(|p| p.name.to_owned())
        .collect()
}

/// The AsyncAPI document of the catalogue, with each type's consumers.
pub fn asyncapi() -> serde_json::Value {
    bruno_events::asyncapi::document(consumers_of)
}

/// The part table of `docs/architecture.md`.
pub fn markdown_table() -> String {
    let mut out =
        String::from("| part | runs as | consumes | stops | needs |\n|---|---|---|---|---|\n");
    for p in PARTS {
        let role = p.role_label();
        let mut takes: Vec<String> = (p.consumes)().iter().map(|t| format!("`{t}`")).collect();
        takes.extend(p.awaits.iter().map(|t| format!("`{t}` (replies)")));
        let stage = p.stage_label();
        let mut needs = Vec::new();
        if p.needs_model {
            needs.push("model");
        }
        if p.needs_store {
            needs.push("LanceDB");
        }
        out.push_str(&format!(
            "| `{}` | {role} | {} | {stage} | {} |\n",
            p.name,
            if takes.is_empty() {
                "HTTP".to_owned()
            } else {
                takes.join(", ")
            },
            if needs.is_empty() {
                "broker".to_owned()
            } else {
                format!("broker, {}", needs.join(", "))
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_type_is_in_the_catalogue() {
        let mut seen = std::collections::HashSet::new();
        for p in entries() {
            assert!(seen.insert(p.name), "duplicate part {}", p.name);
            for ty in (p.consumes)().iter().chain(p.awaits) {
                assert!(
                    bruno_events::entry(ty).is_some(),
                    "{} takes unknown {ty}",
                    p.name
                );
            }
            match p.role {
                Role::Http => assert!((p.consumes)().is_empty(), "{}", p.name),
                _ => assert!(!(p.consumes)().is_empty(), "{} binds nothing", p.name),
            }
        }
    }

    #[test]
    fn unknown_parts_are_refused_by_name() {
        let err = select(&["ingress", "nope"]).unwrap_err().to_string();
        assert!(err.contains("unknown part \"nope\""), "{err}");
        let picked: Vec<_> = select(&["writer", "ingress"])
            .unwrap()
            .iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(picked, ["ingress", "writer"]);
    }

    /// The committed `docs/asyncapi.json` is what the catalogue and the
    /// registry render. Regenerate with
    /// `cargo run -p bruno-cli --bin bruno -- events asyncapi > docs/asyncapi.json`.
    #[test]
    fn committed_asyncapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/asyncapi.json");
        let committed = std::fs::read_to_string(path).expect("docs/asyncapi.json exists");
        let committed: serde_json::Value = serde_json::from_str(&committed).expect("valid JSON");
        assert!(
            committed == asyncapi(),
            "docs/asyncapi.json is stale; regenerate it with `bruno events asyncapi`"
        );
    }

    /// `docs/architecture.md` shows the registry's part table between its
    /// markers. Regenerate with `bruno parts --markdown`.
    #[test]
    fn the_architecture_doc_shows_the_registry() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/architecture.md");
        let doc = std::fs::read_to_string(path).expect("docs/architecture.md exists");
        let start = doc.find("<!-- parts:begin -->").expect("begin marker");
        let end = doc.find("<!-- parts:end -->").expect("end marker");
        let shown = doc[start + "<!-- parts:begin -->".len()..end].trim();
        assert_eq!(
            shown,
            markdown_table().trim(),
            "run `bruno parts --markdown`"
        );
        // The picture draws every part, and nothing that is not one: its row
        // of parts (the line under the arrows) holds only registry names.
        let picture = doc.split("```").nth(1).expect("the picture");
        for p in entries() {
            assert!(
                picture.contains(p.name),
                "{} missing from the picture",
                p.name
            );
        }
        let row = picture
            .lines()
            .find(|l| l.trim_start().starts_with("embedder"))
            .expect("the row of parts");
        for word in row.split_whitespace() {
            let name = word.trim_matches(|c| c == '(' || c == ')');
            assert!(
                find(name).is_some(),
                "the picture draws {name:?}, which is no part"
            );
        }
    }
}
