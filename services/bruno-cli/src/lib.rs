//! What the `bruno` binary runs, as a library so tests can run it too.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bruno_broker::{Broker, BrokerConfig, BrokerMetrics, Topology};
use bruno_embed::{AnyEmbedder, EmbedderConfig};
use bruno_embedder::ChunkingConfig;
use bruno_gateway::GatewayConfig;
use bruno_generator::GeneratorConfig;
use bruno_ingress::IngressConfig;
use bruno_retriever::RetrieverConfig;
use bruno_runtime::admin::{self, Readiness, serve};
use bruno_store::{Store, StoreConfig};
use bruno_writer::WriterConfig;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub mod backup;
pub mod eval;
pub mod ingest;
pub mod registry;

use registry::{Build, Stage, Started};

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
    /// Backups: target, key, schedule, retention.
    pub backup: bruno_backup::BackupConfig,
    /// Messages each consumer works on at once.
    pub consumers: ConsumersConfig,
    /// Logging.
    pub log: LogConfig,
    /// Trace export.
    pub telemetry: bruno_runtime::telemetry::TelemetryConfig,
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
    /// Push mode: serve the consuming part of this process as a Knative
    /// Trigger subscriber (`POST /`) on this address instead of consuming
    /// its queue. One consuming part per process.
    pub push_listen: Option<SocketAddr>,
    /// Largest event body push mode takes.
    pub push_max_body_bytes: usize,
}

impl Default for ConsumersConfig {
    fn default() -> Self {
        Self {
            embedder: 2,
            retriever: 16,
            generator: 16,
            push_listen: None,
            push_max_body_bytes: 16 << 20,
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
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// JSON lines instead of text.
    pub json: bool,
    /// Filter when `RUST_LOG` is unset. Default: `info,lapin=warn,lance=warn`
    /// (LanceDB logs two INFO lines per search leg and more per commit) for the
    /// parts (`bruno dev`, `bruno <part>`), `warn` for one-shot commands.
    pub filter: Option<String>,
}

impl LogConfig {
    /// The settings for a process that runs parts (`serving`) or a one-shot command.
    pub fn settings(&self, serving: bool) -> bruno_runtime::telemetry::LogSettings {
        let default = if serving {
            "info,lapin=warn,lance=warn"
        } else {
            "warn"
        };
        bruno_runtime::telemetry::LogSettings {
            json: self.json,
            filter: self.filter.clone().unwrap_or_else(|| default.to_owned()),
        }
    }
}

/// Fresh broker metrics, registered in `registry`.
fn registered_metrics(registry: &mut Registry) -> BrokerMetrics {
    let metrics = BrokerMetrics::default();
    metrics.register(registry);
    metrics
}

/// A started broker connection with the fleet's topology and its metrics.
pub fn start_broker(
    config: &BrokerConfig,
    name: &str,
    registry: &mut Registry,
    cancel: CancellationToken,
) -> Broker {
    let metrics = registered_metrics(registry);
    let topology = registry::topology(config);
    Broker::start(config.clone(), topology, name, metrics, cancel)
}

/// The embedded broker of a `bruno dev` (ADR 14), with the endpoint that
/// one-shot commands reach it by; removed again by [`EmbeddedBroker::close`].
pub struct EmbeddedBroker {
    /// The broker handle the parts use.
    pub broker: Broker,
    /// Where one-shot commands reach it.
    pub endpoint: SocketAddr,
    endpoint_file: std::path::PathBuf,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
    _lock: std::fs::File,
}

impl EmbeddedBroker {
    /// Stop serving commands, write what the journal holds, remove the
    /// endpoint file.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.server.await;
        self.broker.sync().await;
        let _ = std::fs::remove_file(&self.endpoint_file);
    }
}

/// Start the embedded broker with the fleet's topology under
/// `broker.embedded_dir` (journal, lock, endpoint file).
pub async fn start_embedded(
    config: &BrokerConfig,
    name: &str,
    registry: &mut Registry,
    cancel: CancellationToken,
) -> anyhow::Result<EmbeddedBroker> {
    let dir = &config.embedded_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating broker.embedded_dir {}", dir.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .with_context(|| format!("opening {}", dir.join("lock").display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another bruno dev runs its embedded broker in {} (broker.embedded_dir); stop it or set another directory",
            dir.display()
        )
    })?;
    let journal = if config.embedded_journal {
        let owned = dir.clone();
        let compact = config.embedded_compact_bytes;
        Some(
            tokio::task::spawn_blocking(move || {
                bruno_broker::embedded::Journal::open(&owned, compact)
            })
            .await?
            .with_context(|| format!("opening the broker journal in {}", dir.display()))?,
        )
    } else {
        None
    };
    if let Some((_, restored)) = &journal
        && !restored.is_empty()
    {
        info!(
            messages = restored.len(),
            "embedded broker restored its journal"
        );
    }
    let metrics = registered_metrics(registry);
    let broker = Broker::embedded(
        config.clone(),
        registry::topology(config),
        name,
        metrics,
        cancel,
        journal,
    );
    let token = bruno_core::Secret::new(format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ));
    let stop = CancellationToken::new();
    let (endpoint, server) = serve(
        config.embedded_listen,
        bruno_broker::remote::router(broker.clone(), &token, stop.clone()),
        stop.clone(),
    )
    .await
    .with_context(|| format!("binding broker.embedded_listen {}", config.embedded_listen))?;
    let endpoint_file = bruno_broker::remote::Endpoint {
        url: format!("http://{endpoint}"),
        token: token.expose().to_owned(),
        pid: std::process::id(),
    }
    .write(dir)
    .with_context(|| format!("writing the endpoint file in {}", dir.display()))?;
    info!(%endpoint, dir = %dir.display(), journal = config.embedded_journal, "embedded broker running");
    Ok(EmbeddedBroker {
        broker,
        endpoint,
        endpoint_file,
        server,
        stop,
        _lock: lock,
    })
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
    run_parts(config, &["ingress"], shutdown, ready).await
}

/// A part running in this process.
struct Running {
    stage: Stage,
    /// An HTTP part's `stop` fires after its server finished its requests
    /// (the gateway's inbox must outlive them); a consumer's fires first.
    http: bool,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Run the named parts (see [`registry`]) in this process, with one broker
/// connection and one admin server, until `shutdown`; `ready` gets the
/// bound addresses once everything listens and consumes. On shutdown the
/// parts stop stage by stage ([`Stage`]): HTTP fronts stop taking
/// requests, consumers finish their in-flight messages, the writer commits
/// what it holds; the broker connection closes last. Needs `broker.url`.
pub fn run_parts(
    config: Config,
    names: &[&str],
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
    let parts = registry::select(names);
    run_selected(config, parts, Source::Amqp, shutdown, ready)
}

/// Like [`run_parts`], on a broker the caller started (tests run a fleet
/// on the embedded broker they also publish to).
pub fn run_parts_on(
    config: Config,
    names: &[&str],
    broker: Broker,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
    let parts = registry::select(names);
    run_selected(config, parts, Source::Given(broker), shutdown, ready)
}

/// Where a process's broker comes from.
enum Source {
    /// RabbitMQ at `broker.url` (required).
    Amqp,
    /// RabbitMQ when `broker.url` is set, else the embedded broker.
    Dev,
    /// One the caller started.
    Given(Broker),
}

/// `bruno dev`: like [`run_parts`], on the embedded broker when
/// `broker.url` is unset (ADR 14).
pub fn run_dev(
    config: Config,
    names: &[&str],
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
    let parts = registry::select(names);
    run_selected(config, parts, Source::Dev, shutdown, ready)
}

async fn run_selected(
    config: Config,
    parts: anyhow::Result<Vec<&'static registry::PartEntry>>,
    source: Source,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    let parts = parts?;
    anyhow::ensure!(!parts.is_empty(), "no part to run");
    let consuming = parts
        .iter()
        .filter(|p| matches!(p.role, registry::Role::Consumer { .. }))
        .count();
    anyhow::ensure!(
        config.consumers.push_listen.is_none() || consuming <= 1,
        "consumers.push_listen (push mode) serves one consuming part per process; this one runs {consuming}"
    );
    let name = match parts.as_slice() {
        [one] => format!("bruno-{}", one.name),
        _ => "bruno-dev".to_owned(),
    };
    let broker_cancel = CancellationToken::new();
    let mut metrics = Registry::default();
    let (broker, embedded) = match (&config.broker.url, source) {
        (_, Source::Given(broker)) => {
            broker.metrics().register(&mut metrics);
            (broker, None)
        }
        (Some(_), _) => (
            start_broker(&config.broker, &name, &mut metrics, broker_cancel.clone()),
            None,
        ),
        (None, Source::Dev) => {
            let e =
                start_embedded(&config.broker, &name, &mut metrics, broker_cancel.clone()).await?;
            (e.broker.clone(), Some(e))
        }
        // A push-mode consumer only publishes, to the Knative Broker.
        (None, Source::Amqp)
            if config
                .broker
                .publish_url
                .as_deref()
                .is_some_and(|u| !u.is_empty())
                && config.consumers.push_listen.is_some() =>
        {
            (
                Broker::sink_only(
                    config.broker.clone(),
                    registry::topology(&config.broker),
                    &name,
                    registered_metrics(&mut metrics),
                    broker_cancel.clone(),
                ),
                None,
            )
        }
        (None, Source::Amqp) => anyhow::bail!(
            "broker.url is not set: `bruno {}` needs RabbitMQ (set broker.url or BRUNO_BROKER__URL, e.g. {}); only `bruno dev` runs an embedded broker",
            parts.first().map_or("dev", |p| p.name),
            BrokerConfig::LOCAL_RABBITMQ
        ),
    };
    let here: Vec<&str> = parts.iter().map(|p| p.name).collect();
    tokio::spawn(bruno_broker::stats::watch(
        broker.clone(),
        bruno_broker::stats::watched(&broker, &here),
        std::time::Duration::from_millis(config.broker.queue_stats_ms),
        broker_cancel.clone(),
    ));
    let mut readiness = Readiness::new().check("broker", {
        let broker = broker.clone();
        move || broker.is_connected()
    });
    let model = if parts.iter().any(|p| p.needs_model) {
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
    let store = if parts.iter().any(|p| p.needs_store) {
        Some(
            Store::open(config.store.clone())
                .await
                .with_context(|| format!("opening store.uri {}", config.store.uri))?,
        )
    } else {
        None
    };

    let mut running = Vec::new();
    let mut bound = Bound {
        ingress: None,
        gateway: None,
        admin: config.admin.listen,
    };
    // HTTP servers stop taking requests when `shutdown` fires (or when the
    // start fails half-way).
    let http_stop = shutdown.child_token();
    let started = async {
        for part in &parts {
            let stop = CancellationToken::new();
            let mut build = Build {
                config: &config,
                broker: &broker,
                metrics: &mut metrics,
                readiness: &mut readiness,
                stop: stop.clone(),
                model: model.as_ref(),
                store: store.as_ref(),
            };
            let built = (part.build)(&mut build);
            let http = matches!(built, Ok(Started::Http { .. }));
            let task = match built.with_context(|| format!("starting the {}", part.name))? {
                Started::Consumer(run) => tokio::spawn(async move {
                    run.await;
                    Ok(())
                }),
                Started::Http {
                    listen: (key, addr),
                    router,
                    after,
                } => {
                    let (addr, task) = serve(addr, router, http_stop.clone())
                        .await
                        .with_context(|| format!("binding {key} {addr}"))?;
                    tracing::info!(part = part.name, %addr, "listening");
                    match part.name {
                        "ingress" => bound.ingress = Some(addr),
                        "gateway" => bound.gateway = Some(addr),
                        _ => {}
                    }
                    tokio::spawn(async move {
                        task.await??;
                        if let Some(after) = after {
                            after.await;
                        }
                        Ok(())
                    })
                }
            };
            running.push(Running {
                stage: part.stage,
                http,
                stop,
                task,
            });
        }
        let admin_router = admin::router(
            Arc::new(Mutex::new(std::mem::take(&mut metrics))),
            std::mem::take(&mut readiness),
        );
        let (admin_addr, admin_task) = serve(config.admin.listen, admin_router, shutdown.clone())
            .await
            .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
        tracing::info!(part = "admin", addr = %admin_addr, "listening");
        anyhow::Ok((admin_addr, admin_task))
    }
    .await;
    let (admin_addr, admin_task) = match started {
        Ok(s) => s,
        Err(e) => {
            // Nothing half-started outlives a failed start.
            http_stop.cancel();
            for r in &running {
                r.stop.cancel();
                r.task.abort();
            }
            broker_cancel.cancel();
            if let Some(e) = embedded {
                e.close().await;
            }
            return Err(e);
        }
    };
    bound.admin = admin_addr;
    let names: Vec<&str> = parts.iter().map(|p| p.name).collect();
    info!(parts = ?names, ingress = ?bound.ingress, gateway = ?bound.gateway, %admin_addr, "running");
    if let Some(tx) = ready {
        let _ = tx.send(bound);
    }

    shutdown.cancelled().await;
    // HTTP servers stop on `shutdown` itself; each stage is then told to
    // stop and waited for before the next.
    for stage in [Stage::Front, Stage::Worker, Stage::Store] {
        let (now, later): (Vec<Running>, Vec<Running>) =
            running.into_iter().partition(|r| r.stage == stage);
        running = later;
        for r in now.iter().filter(|r| !r.http) {
            r.stop.cancel();
        }
        for r in now {
            r.task.await??;
            r.stop.cancel();
        }
    }
    admin_task.await??;
    broker_cancel.cancel();
    if let Some(e) = embedded {
        e.close().await;
    }
    Ok(())
}

/// Connect for a one-off command; fails if the broker does not answer.
/// Without `broker.url`, the embedded broker of the `bruno dev` that runs
/// in `broker.embedded_dir`.
pub async fn connect_for_tool(config: &Config) -> anyhow::Result<(Broker, CancellationToken)> {
    let cancel = CancellationToken::new();
    if config.broker.url.is_none() {
        let dir = &config.broker.embedded_dir;
        let endpoint = bruno_broker::remote::Endpoint::read(dir).map_err(|e| {
            anyhow::anyhow!(
                "no broker: broker.url is not set and no bruno dev runs its embedded broker in {} ({e}); start `bruno dev`, or set broker.url to your RabbitMQ",
                dir.display()
            )
        })?;
        let broker = Broker::remote(
            config.broker.clone(),
            registry::topology(&config.broker),
            &endpoint.url,
            bruno_core::Secret::new(endpoint.token),
            cancel.clone(),
        );
        if !broker.wait_connected(Duration::from_secs(5)).await {
            anyhow::bail!(
                "the bruno dev (pid {}) that wrote {} does not answer at {}; is it still running?",
                endpoint.pid,
                dir.join(bruno_broker::remote::ENDPOINT_FILE).display(),
                endpoint.url
            );
        }
        return Ok((broker, cancel));
    }
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

/// Push mode's Triggers as multi-document YAML for
/// `deploy/components/push-mode/triggers.yaml`.
pub fn knative_yaml(config: &BrokerConfig) -> anyhow::Result<String> {
    let mut out = String::from(
        "# Generated by `bruno topology --knative`; do not edit (a test checks it is current).\n",
    );
    for doc in registry::knative_triggers(config) {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&doc)?);
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The LLM's and the embedder's API keys and the broker's password,
    /// loaded from a config file, never show in the config's `Debug` (which
    /// is what a log line of the config prints) or in any of its parts'.
    #[test]
    fn secrets_in_the_config_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bruno.toml");
        std::fs::write(
            &file,
            r#"
[broker]
url = "amqp://bruno:broker-pass-7731@rabbit:5672/%2f"

[embedder]
backend = "openai"
url = "http://embed:8000"
model = "e5"
dimension = 768
api_key = "sk-embedder-secret-4242"

[generator.llm]
backend = "openai"
url = "http://llm:8000"
model = "qwen"
api_key = "sk-llm-secret-9191"
"#,
        )
        .unwrap();
        let config: Config = bruno_runtime::config::load(Some(&file)).unwrap();
        match &config.generator.llm {
            bruno_generator::LlmConfig::Openai {
                api_key: Some(k), ..
            } => assert_eq!(k.expose(), "sk-llm-secret-9191"),
            other => panic!("not loaded: {other:?}"),
        }
        let shown = [
            format!("{config:?}"),
            format!("{:?}", config.generator),
            format!("{:?}", config.embedder),
            format!("{:?}", config.broker),
            format!("{:#?}", config),
        ];
        for text in shown {
            for secret in [
                "sk-llm-secret-9191",
                "sk-embedder-secret-4242",
                "broker-pass-7731",
            ] {
                assert!(!text.contains(secret), "{secret} printed in {text}");
            }
            assert!(text.contains("redacted"), "{text}");
        }
    }
}
