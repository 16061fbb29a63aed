//! What the `bruno` binary runs, as a library so tests can run it too.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bruno_broker::{Broker, BrokerConfig, BrokerMetrics, Topology};
use bruno_embed::{AnyEmbedder, EmbedderConfig};
use bruno_embedder::{ChunkingConfig, EmbedderMetrics, EmbedderService};
use bruno_gateway::{Gateway, GatewayConfig, GatewayMetrics};
use bruno_generator::{Generator, GeneratorConfig, GeneratorMetrics};
use bruno_ingress::{Ingress, IngressConfig, IngressMetrics};
use bruno_retriever::{Retriever, RetrieverConfig, RetrieverMetrics};
use bruno_runtime::admin::{self, Readiness, serve};
use bruno_store::{Store, StoreConfig};
use bruno_writer::{Writer, WriterConfig, WriterMetrics};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub mod ingest;

/// The whole configuration: defaults < `--config` file < `BRUNO_*` env.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// RabbitMQ.
    pub broker: BrokerConfig,
    /// The admin server (`/live`, `/ready`, `/metrics`).
    pub admin: AdminConfig,
    /// The HTTP ingress.
    pub ingress: IngressConfig,
    /// The chat gateway.
    pub gateway: GatewayConfig,
    /// LanceDB.
    pub store: StoreConfig,
    /// The embedding model (used by the embedder and the retriever).
    pub embedder: EmbedderConfig,
    /// How documents are split.
    pub chunking: ChunkingConfig,
    /// The writer's batching and maintenance.
    pub writer: WriterConfig,
    /// The retriever.
    pub retriever: RetrieverConfig,
    /// The generator (the LLM, the prompt, the circuit breaker).
    pub generator: GeneratorConfig,
    /// Messages each consumer works on at once.
    pub consumers: ConsumersConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[consumers]`: concurrency (the prefetch) of each consuming part.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumersConfig {
    /// Documents embedded at once (CPU-bound: about the core count).
    pub embedder: u16,
    /// Searches at once.
    pub retriever: u16,
    /// Chat turns generated at once.
    pub generator: u16,
}

impl Default for ConsumersConfig {
    fn default() -> Self {
        Self {
            embedder: 2,
            retriever: 16,
            generator: 16,
        }
    }
}

/// A part this process can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The HTTP ingress.
    Ingress,
    /// document.submitted / chat.completed → memory.write.
    Embedder,
    /// memory.write → LanceDB.
    Writer,
    /// search.requested / chat.requested → replies.
    Retriever,
    /// chat.contextualized → the LLM → chat.delta, chat.completed.
    Generator,
    /// The chat gateway (HTTP, awaits correlated replies).
    Gateway,
}

impl Part {
    /// Every part `bruno dev` runs.
    pub const ALL: [Part; 6] = [
        Part::Ingress,
        Part::Embedder,
        Part::Writer,
        Part::Retriever,
        Part::Generator,
        Part::Gateway,
    ];

    fn name(self) -> &'static str {
        match self {
            Part::Ingress => "ingress",
            Part::Embedder => "embedder",
            Part::Writer => "writer",
            Part::Retriever => "retriever",
            Part::Generator => "generator",
            Part::Gateway => "gateway",
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin server.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// JSON lines instead of text.
    pub json: bool,
    /// Default filter when `RUST_LOG` is unset.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            json: false,
            filter: "info,lapin=warn".into(),
        }
    }
}

/// A started broker connection with the fleet's topology and its metrics.
pub fn start_broker(
    config: &BrokerConfig,
    name: &str,
    registry: &mut Registry,
    cancel: CancellationToken,
) -> Broker {
    let metrics = BrokerMetrics::default();
    metrics.register(registry);
    let topology = Topology::new(config, bruno_runtime::fleet::parts());
    Broker::start(config.clone(), topology, name, metrics, cancel)
}

/// Addresses a running process listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The ingress, when it runs here.
    pub ingress: Option<SocketAddr>,
    /// The gateway, when it runs here.
    pub gateway: Option<SocketAddr>,
    /// The admin server.
    pub admin: SocketAddr,
}

/// Run the ingress (and the admin server) until `shutdown`.
pub async fn run_ingress(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    run_parts(config, &[Part::Ingress], shutdown, ready).await
}

/// Run `parts` in this process (with one admin server) until `shutdown`;
/// `ready` gets the bound addresses once everything listens and consumes.
/// Consumers finish their in-flight messages, the writer commits what it
/// holds, and the broker connection closes last.
pub async fn run_parts(
    config: Config,
    parts: &[Part],
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    let name = match parts {
        [one] => format!("bruno-{}", one.name()),
        _ => "bruno-dev".to_owned(),
    };
    let broker_cancel = CancellationToken::new();
    let mut registry = Registry::default();
    let broker = start_broker(&config.broker, &name, &mut registry, broker_cancel.clone());
    let readiness = Readiness::new().check("broker", {
        let broker = broker.clone();
        move || broker.is_connected()
    });
    let needs_model = parts
        .iter()
        .any(|p| matches!(p, Part::Embedder | Part::Retriever));
    let embedder = if needs_model {
        let config = config.embedder.clone();
        let model = tokio::task::spawn_blocking(move || AnyEmbedder::from_config(&config))
            .await?
            .context(
                "loading the embedding model (embedder.*; scripts/fetch-model.sh fetches MiniLM)",
            )?;
        Some(Arc::new(model))
    } else {
        None
    };
    let needs_store = parts
        .iter()
        .any(|p| matches!(p, Part::Embedder | Part::Writer | Part::Retriever));
    let store = if needs_store {
        Some(
            Store::open(config.store.clone())
                .await
                .with_context(|| format!("opening store.uri {}", config.store.uri))?,
        )
    } else {
        None
    };

    let mut consumers = JoinSet::new();
    let consumers_stop = CancellationToken::new();
    let writer_stop = CancellationToken::new();
    for part in parts {
        match (part, &embedder, &store) {
            (Part::Embedder, Some(model), store) => {
                let metrics = EmbedderMetrics::default();
                metrics.register(&mut registry);
                let handler = Arc::new(EmbedderService::new(
                    model.clone(),
                    store.clone(),
                    config.chunking.clone(),
                    metrics,
                ));
                consumers.spawn(bruno_runtime::run_pull(
                    broker.clone(),
                    "embedder",
                    config.consumers.embedder,
                    handler,
                    consumers_stop.clone(),
                ));
            }
            (Part::Writer, _, Some(store)) => {
                let metrics = WriterMetrics::default();
                metrics.register(&mut registry);
                let handler = Arc::new(Writer::start(
                    store.clone(),
                    &config.writer,
                    metrics,
                    writer_stop.clone(),
                ));
                consumers.spawn(bruno_runtime::run_pull(
                    broker.clone(),
                    "writer",
                    config.writer.concurrency,
                    handler,
                    consumers_stop.clone(),
                ));
            }
            (Part::Retriever, Some(model), Some(store)) => {
                let metrics = RetrieverMetrics::default();
                metrics.register(&mut registry);
                let handler = Arc::new(Retriever::new(
                    model.clone(),
                    store.clone(),
                    config.retriever.clone(),
                    metrics,
                ));
                consumers.spawn(bruno_runtime::run_pull(
                    broker.clone(),
                    "retriever",
                    config.consumers.retriever,
                    handler,
                    consumers_stop.clone(),
                ));
            }
            (Part::Generator, _, _) => {
                let metrics = GeneratorMetrics::default();
                metrics.register(&mut registry);
                let handler = Arc::new(Generator::new(config.generator.clone(), metrics));
                consumers.spawn(bruno_runtime::run_pull(
                    broker.clone(),
                    "generator",
                    config.consumers.generator,
                    handler,
                    consumers_stop.clone(),
                ));
            }
            _ => {}
        }
    }
    let mut ingress_addr = None;
    let mut ingress_task = None;
    if parts.contains(&Part::Ingress) {
        let metrics = IngressMetrics::default();
        metrics.register(&mut registry);
        let ingress = Arc::new(Ingress::new(&config.ingress, broker.clone(), metrics)?);
        let router = bruno_ingress::router(ingress, config.ingress.max_body_bytes);
        let (addr, task) = serve(config.ingress.listen, router, shutdown.clone())
            .await
            .with_context(|| format!("binding ingress.listen {}", config.ingress.listen))?;
        ingress_addr = Some(addr);
        ingress_task = Some(task);
    }
    let mut gateway_addr = None;
    let mut gateway_task = None;
    let gateway_stop = CancellationToken::new();
    let mut readiness = readiness;
    if parts.contains(&Part::Gateway) {
        let metrics = GatewayMetrics::default();
        metrics.register(&mut registry);
        let gateway = Arc::new(Gateway::new(
            config.gateway.clone(),
            broker.clone(),
            metrics,
            gateway_stop.clone(),
        )?);
        readiness = readiness.check("reply-queue", {
            let gateway = gateway.clone();
            move || gateway.is_ready()
        });
        let (addr, task) = serve(
            config.gateway.listen,
            bruno_gateway::router(gateway),
            shutdown.clone(),
        )
        .await
        .with_context(|| format!("binding gateway.listen {}", config.gateway.listen))?;
        gateway_addr = Some(addr);
        gateway_task = Some(task);
    }
    let admin_router = admin::router(Arc::new(Mutex::new(registry)), readiness);
    let (admin_addr, admin_task) = serve(config.admin.listen, admin_router, shutdown.clone())
        .await
        .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
    let names: Vec<&str> = parts.iter().map(|p| p.name()).collect();
    info!(parts = ?names, ingress = ?ingress_addr, gateway = ?gateway_addr, %admin_addr, "running");
    if let Some(tx) = ready {
        let _ = tx.send(Bound {
            ingress: ingress_addr,
            gateway: gateway_addr,
            admin: admin_addr,
        });
    }

    shutdown.cancelled().await;
    if let Some(task) = ingress_task {
        task.await??;
    }
    if let Some(task) = gateway_task {
        task.await??;
    }
    gateway_stop.cancel();
    // In-flight messages finish (the writer's wait for their commit) before
    // the consumers return.
    consumers_stop.cancel();
    while consumers.join_next().await.is_some() {}
    writer_stop.cancel();
    admin_task.await??;
    broker_cancel.cancel();
    Ok(())
}

/// Connect for a one-off command; fails if the broker does not answer.
pub async fn connect_for_tool(config: &Config) -> anyhow::Result<(Broker, CancellationToken)> {
    let cancel = CancellationToken::new();
    let broker = start_broker(
        &config.broker,
        "bruno-cli",
        &mut Registry::default(),
        cancel.clone(),
    );
    if !broker.wait_connected(Duration::from_secs(10)).await {
        cancel.cancel();
        anyhow::bail!("cannot reach RabbitMQ at broker.url within 10s");
    }
    Ok((broker, cancel))
}

/// GET `path` on `addr` over plain HTTP/1.0 and require a 200. Used as the
/// container healthcheck, where the runtime image has no curl.
pub async fn probe(addr: &str, path: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        head.truncate(n);
        anyhow::Ok(head)
    };
    let head = tokio::time::timeout(Duration::from_secs(3), exchange)
        .await
        .context("admin server did not answer within 3s")??;
    let status_line = String::from_utf8_lossy(&head);
    anyhow::ensure!(
        status_line.starts_with("HTTP/1.0 200") || status_line.starts_with("HTTP/1.1 200"),
        "{path} answered {:?}",
        status_line.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// The topology as multi-document YAML for `deploy/rabbitmq/topology.yaml`.
pub fn manifests_yaml(topology: &Topology, cluster: &str) -> anyhow::Result<String> {
    let mut out = String::from(
        "# Generated by `bruno topology --manifests`; do not edit (a test checks it is current).\n",
    );
    for doc in bruno_broker::topology_manifests(topology, cluster) {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&doc)?);
    }
    Ok(out)
}
