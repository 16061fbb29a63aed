//! Test harness: an isolated corner of the real RabbitMQ per test (a unique
//! name prefix), the ingress on port 0, recording handlers, and a TCP proxy
//! that can cut connections without disturbing other tests.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bruno_broker::{Broker, BrokerConfig, BrokerMetrics, PartSpec, Topology};
use bruno_core::Secret;
use bruno_events::{AttributesReader, Event};
use bruno_ingress::{Ingress, IngressConfig, IngressMetrics};
use bruno_runtime::{Context, Handler, HandlerError, Incoming, Raw};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The LanceDB store under `dir`, reading every commit at once (read
/// consistency 0), as tests and benches that wait for writes need.
pub async fn open_store(dir: &std::path::Path) -> bruno_store::Store {
    bruno_store::Store::open(bruno_store::StoreConfig {
        uri: dir.display().to_string(),
        read_consistency_ms: 0,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The broker under test (`BRUNO_TEST_AMQP_HOST`, default 127.0.0.1:5672).
pub fn amqp_addr() -> String {
    std::env::var("BRUNO_TEST_AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".into())
}

/// An AMQP URL to `addr` with the guest account.
pub fn amqp_url(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f?heartbeat=5")
}

/// Log to the test output when `RUST_LOG` is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Broker config isolated under a unique prefix, with short retry tiers.
pub fn test_config() -> BrokerConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    BrokerConfig {
        url: Secret::new(amqp_url(&amqp_addr())),
        prefix: format!("t{}.", &id[..12]),
        retry_delays_ms: vec![300, 600],
        max_attempts: 3,
        delivery_limit: 5,
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        publish_timeout_ms: 3_000,
        publish_channels: 2,
    }
}

/// One test's corner of the broker.
pub struct Harness {
    /// Its config (unique prefix).
    pub config: BrokerConfig,
    /// Its topology.
    pub topology: Topology,
    /// A connected broker.
    pub broker: Broker,
    cancel: CancellationToken,
}

impl Harness {
    /// Declare `parts` under a fresh prefix and connect.
    pub async fn new(parts: Vec<PartSpec>) -> Self {
        Self::with_config(test_config(), parts).await
    }

    /// Same, with a given config.
    pub async fn with_config(config: BrokerConfig, parts: Vec<PartSpec>) -> Self {
        init_logs();
        let topology = Topology::new(&config, parts);
        let cancel = CancellationToken::new();
        let broker = Broker::start(
            config.clone(),
            topology.clone(),
            "test",
            BrokerMetrics::default(),
            cancel.clone(),
        );
        assert!(
            broker.wait_connected(Duration::from_secs(10)).await,
            "broker not reachable"
        );
        Self {
            config,
            topology,
            broker,
            cancel,
        }
    }

    /// Another broker connection on the same topology, optionally via another address.
    pub async fn second_broker(&self, addr: Option<&str>) -> (Broker, CancellationToken) {
        let mut config = self.config.clone();
        if let Some(addr) = addr {
            config.url = Secret::new(amqp_url(addr));
        }
        let cancel = CancellationToken::new();
        let broker = Broker::start(
            config,
            self.topology.clone(),
            "test-2",
            BrokerMetrics::default(),
            cancel.clone(),
        );
        assert!(
            broker.wait_connected(Duration::from_secs(10)).await,
            "second broker not reachable"
        );
        (broker, cancel)
    }

    /// Queue name of a part.
    pub fn queue(&self, part: &str) -> String {
        self.topology.names.queue(part)
    }

    /// A raw lapin connection for inspection.
    pub async fn raw(&self) -> Connection {
        Connection::connect(self.config.url.expose(), ConnectionProperties::default())
            .await
            .unwrap()
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        let conn = self.raw().await;
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let n = q.message_count();
        let _ = conn.close(200, "".into()).await;
        n
    }

    /// Take (and ack) every message of a queue, decoded; waits up to
    /// `settle` for stragglers after the queue looks empty.
    pub async fn drain(&self, queue: &str, settle: Duration) -> Vec<lapin::message::Delivery> {
        let conn = self.raw().await;
        let ch = conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        let mut idle_since = tokio::time::Instant::now();
        loop {
            match ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                Some(m) => {
                    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
                    out.push(m.delivery);
                    idle_since = tokio::time::Instant::now();
                }
                None if idle_since.elapsed() >= settle => break,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let _ = conn.close(200, "".into()).await;
        out
    }

    /// Start the ingress on port 0 over `broker`.
    pub async fn ingress(
        &self,
        broker: Broker,
        config: IngressConfig,
    ) -> (SocketAddr, CancellationToken) {
        let state = Arc::new(Ingress::new(&config, broker, IngressMetrics::default()).unwrap());
        let router = bruno_ingress::router(state, config.max_body_bytes);
        let stop = CancellationToken::new();
        let (addr, _task) =
            bruno_runtime::admin::serve("127.0.0.1:0".parse().unwrap(), router, stop.clone())
                .await
                .unwrap();
        (addr, stop)
    }

    /// Delete everything this test declared and close the connection.
    pub async fn cleanup(self) {
        let conn = self.raw().await;
        let ch = conn.create_channel().await.unwrap();
        let names = &self.topology.names;
        let mut queues = vec![names.unroutable()];
        for part in &self.topology.parts {
            queues.push(names.queue(&part.name));
            queues.push(names.dlq(&part.name));
            for d in &self.topology.retry_delays {
                queues.push(names.retry(&part.name, *d));
            }
        }
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in [names.exchange(), names.unroutable()] {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "".into()).await;
        self.cancel.cancel();
    }
}

/// A handler that records every event it gets and succeeds.
pub struct Recorder {
    tx: mpsc::UnboundedSender<Event>,
}

impl Recorder {
    /// The handler and the stream of what it saw.
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Arc::new(Self { tx }), rx)
    }
}

impl Handler for Recorder {
    type Input = Raw;
    async fn handle(
        &self,
        input: Incoming<Raw>,
        _ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let _ = self.tx.send(input.event);
        Ok(vec![])
    }
}

/// Receive `n` events or panic after `timeout`.
pub async fn recv_n(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    n: usize,
    timeout: Duration,
) -> Vec<Event> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(e)) => out.push(e),
            _ => panic!(
                "got {} of {n} events within {timeout:?}: {:?}",
                out.len(),
                out.iter().map(|e| e.id().to_owned()).collect::<Vec<_>>()
            ),
        }
    }
    out
}

/// Assert nothing more arrives within `wait`.
pub async fn assert_quiet(rx: &mut mpsc::UnboundedReceiver<Event>, wait: Duration) {
    if let Ok(Some(e)) = tokio::time::timeout(wait, rx.recv()).await {
        panic!("unexpected extra event {}", e.id());
    }
}

/// A TCP proxy in front of the broker that can cut every connection and
/// refuse new ones for a while.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
}

struct ProxyState {
    generation: CancellationToken,
    refusing: bool,
}

impl Proxy {
    /// Start a proxy to `upstream`.
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState {
            generation: CancellationToken::new(),
            refusing: false,
        }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (refusing, token) = {
                    let s = st.lock().unwrap();
                    (s.refusing, s.generation.clone())
                };
                if refusing {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// The proxy's address as host:port.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Drop every open connection; with `refuse_for`, refuse new ones that long.
    pub fn cut(&self, refuse_for: Duration) {
        let mut s = self.state.lock().unwrap();
        s.generation.cancel();
        s.generation = CancellationToken::new();
        s.refusing = !refuse_for.is_zero();
        drop(s);
        if !refuse_for.is_zero() {
            let st = self.state.clone();
            tokio::spawn(async move {
                tokio::time::sleep(refuse_for).await;
                st.lock().unwrap().refusing = false;
            });
        }
    }
}

/// Counts per key, for handlers that fail a number of times per event.
#[derive(Default)]
pub struct Attempts(Mutex<HashMap<String, u32>>);

impl Attempts {
    /// Record an attempt for `key`; returns the attempt number (1-based).
    pub fn bump(&self, key: &str) -> u32 {
        let mut m = self.0.lock().unwrap();
        let n = m.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n
    }
    /// Attempts so far for `key`.
    pub fn get(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

/// A RabbitMQ node of the test's own (its own node name, ports and data
/// directory), for tests that stop and restart the broker itself, which the
/// shared one must not be. Runs as the current user from RabbitMQ's own
/// scripts (`BRUNO_TEST_RABBITMQ_BIN`, else `/usr/lib/rabbitmq/bin` where it
/// exists, else the PATH); it is stopped when dropped.
pub struct PrivateBroker {
    node: String,
    port: u16,
    env: Vec<(&'static str, String)>,
    _dir: tempfile::TempDir,
}

/// One of RabbitMQ's scripts, bypassing the distribution's wrapper (which
/// switches to the `rabbitmq` user when run as root).
fn rabbitmq_script(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("BRUNO_TEST_RABBITMQ_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let d = std::path::PathBuf::from("/usr/lib/rabbitmq/bin");
            d.is_dir().then_some(d)
        });
    match dir {
        Some(d) => d.join(name),
        None => name.into(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl PrivateBroker {
    /// Start a node and wait until it accepts AMQP connections.
    pub async fn start() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let node = format!("bruno-{}@localhost", &id[..12]);
        let port = free_port();
        let path = |name: &str| dir.path().join(name).display().to_string();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("plugins"), "[].\n").unwrap();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        // Should the wrapper drop to the `rabbitmq` user, it must write here.
        for p in walk(dir.path()) {
            let mode = if p.is_dir() { 0o777 } else { 0o666 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let env = vec![
            ("RABBITMQ_NODENAME", node.clone()),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", free_port().to_string()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_PID_FILE", path("pid")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("plugins")),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
        ];
        let broker = Self {
            node,
            port,
            env,
            _dir: dir,
        };
        broker.boot().await;
        broker
    }

    /// Its AMQP URL (guest account).
    pub fn url(&self) -> String {
        amqp_url(&format!("127.0.0.1:{}", self.port))
    }

    async fn ctl(&self, args: &[&str]) -> std::process::Output {
        tokio::process::Command::new(rabbitmq_script("rabbitmqctl"))
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .await
            .expect("rabbitmqctl")
    }

    async fn boot(&self) {
        let status = tokio::process::Command::new(rabbitmq_script("rabbitmq-server"))
            .arg("-detached")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .await
            .expect("rabbitmq-server");
        assert!(status.success(), "rabbitmq-server -detached: {status}");
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let out = self.ctl(&["await_startup", "--timeout", "10"]).await;
            if out.status.success() && TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {} did not start: {}",
                self.node,
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Stop the node (every connection drops) and start it again on the
    /// same data directory, as a broker pod restart does.
    pub async fn restart(&self) {
        self.stop().await;
        self.boot().await;
    }

    /// Stop the node.
    pub async fn stop(&self) {
        let out = self.ctl(&["stop"]).await;
        assert!(
            out.status.success(),
            "rabbitmqctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = std::process::Command::new(rabbitmq_script("rabbitmqctl"))
            .arg("-n")
            .arg(&self.node)
            .arg("stop")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .output();
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A real S3-compatible server for this test: `moto_server` (PyPI
/// `moto[server]`, installed by `.ci/run`) on a free loopback port, with one
/// bucket. Killed when dropped.
pub struct S3Server {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// The bucket it holds.
    pub bucket: String,
}

impl S3Server {
    /// Start the server and create `bucket`.
    pub async fn start(bucket: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let server = Self {
            child,
            endpoint,
            bucket: bucket.to_owned(),
        };
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            // S3 CreateBucket: PUT /<bucket>.
            match client
                .put(format!("{}/{bucket}", server.endpoint))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => break,
                _ if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                other => panic!("moto did not start: {other:?}"),
            }
        }
        server
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Backup settings inside `dir` (a test's temp dir, which may be the store
/// itself: LanceDB only reads `*.lance` directories) and no schedule, so a
/// test running every part never writes beside its temp dir.
pub fn backup_config(dir: &std::path::Path) -> bruno_backup::BackupConfig {
    bruno_backup::BackupConfig {
        target: Some(dir.join("backups").display().to_string()),
        key_file: Some(dir.join("backup.key")),
        work_dir: Some(dir.join("backup-work")),
        interval_minutes: 0,
        ..Default::default()
    }
}

/// `config` as the `BRUNO_BROKER__*` variables a `bruno` child process reads.
pub fn broker_env(config: &BrokerConfig) -> Vec<(&'static str, String)> {
    vec![
        ("BRUNO_BROKER__URL", config.url.expose().to_owned()),
        ("BRUNO_BROKER__PREFIX", config.prefix.clone()),
        (
            "BRUNO_BROKER__RETRY_DELAYS_MS",
            format!("{:?}", config.retry_delays_ms),
        ),
        (
            "BRUNO_BROKER__DELIVERY_LIMIT",
            config.delivery_limit.to_string(),
        ),
        (
            "BRUNO_BROKER__MAX_ATTEMPTS",
            config.max_attempts.to_string(),
        ),
    ]
}
