//! What the `bruno` binary runs, as a library so tests can run it too.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bruno_broker::{Broker, BrokerConfig, BrokerMetrics, Topology};
use bruno_ingress::{Ingress, IngressConfig, IngressMetrics};
use bruno_runtime::admin::{self, Readiness, serve};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::info;

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
    /// Logging.
    pub log: LogConfig,
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

/// Addresses a running ingress listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// The ingress.
    pub ingress: SocketAddr,
    /// The admin server.
    pub admin: SocketAddr,
}

/// Run the ingress (and the admin server) until `shutdown`; `ready` gets the
/// bound addresses once listening. The broker connection closes last, after
/// in-flight requests finished.
pub async fn run_ingress(
    config: Config,
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> anyhow::Result<()> {
    let broker_cancel = CancellationToken::new();
    let mut registry = Registry::default();
    let broker = start_broker(
        &config.broker,
        "bruno-ingress",
        &mut registry,
        broker_cancel.clone(),
    );
    let metrics = IngressMetrics::default();
    metrics.register(&mut registry);
    let ingress = Arc::new(Ingress::new(&config.ingress, broker.clone(), metrics)?);
    let readiness = Readiness::new().check("broker", {
        let broker = broker.clone();
        move || broker.is_connected()
    });
    let admin_router = admin::router(Arc::new(Mutex::new(registry)), readiness);
    let (admin_addr, admin_task) = serve(config.admin.listen, admin_router, shutdown.clone())
        .await
        .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
    let router = bruno_ingress::router(ingress, config.ingress.max_body_bytes);
    let (addr, task) = serve(config.ingress.listen, router, shutdown.clone())
        .await
        .with_context(|| format!("binding ingress.listen {}", config.ingress.listen))?;
    info!(%addr, %admin_addr, "ingress listening");
    if let Some(tx) = ready {
        let _ = tx.send(Bound {
            ingress: addr,
            admin: admin_addr,
        });
    }
    task.await??;
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
