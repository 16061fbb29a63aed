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
        url: Some(Secret::new(amqp_url(&amqp_addr()))),
        prefix: format!("t{}.", &id[..12]),
        retry_delays_ms: vec![300, 600],
        max_attempts: 3,
        delivery_limit: 5,
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        publish_timeout_ms: 3_000,
        publish_channels: 2,
        queue_stats_ms: 500,
        ..Default::default()
    }
}

/// Run each named `async fn(BrokerKind)` as two tests, `<name>::rabbitmq`
/// and `<name>::embedded`: one test code, both brokers.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn rabbitmq() {
                    super::$name($crate::BrokerKind::RabbitMq).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name($crate::BrokerKind::Embedded).await
                }
            }
        )*
    };
}

/// Run the named parts in this process until `shutdown`: on RabbitMQ
/// through `config.broker` (a connection of their own), on the embedded
/// broker on the harness's broker itself.
pub fn spawn_fleet(
    h: &Harness,
    config: bruno_cli::Config,
    names: &[&str],
    shutdown: CancellationToken,
    ready: Option<tokio::sync::oneshot::Sender<bruno_cli::Bound>>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    match h.kind {
        BrokerKind::RabbitMq => tokio::spawn(bruno_cli::run_parts(config, names, shutdown, ready)),
        BrokerKind::Embedded => tokio::spawn(bruno_cli::run_parts_on(
            config,
            names,
            h.broker.clone(),
            shutdown,
            ready,
        )),
    }
}

/// Which broker a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// The real RabbitMQ (`BRUNO_TEST_AMQP_HOST`).
    RabbitMq,
    /// The embedded broker, journaled to a temp dir (ADR 14).
    Embedded,
}

/// One test's corner of the broker.
pub struct Harness {
    /// Its config (unique prefix).
    pub config: BrokerConfig,
    /// Its topology.
    pub topology: Topology,
    /// A connected broker.
    pub broker: Broker,
    /// Which broker it is.
    pub kind: BrokerKind,
    cancel: CancellationToken,
    /// The embedded broker's journal directory.
    pub dir: Option<tempfile::TempDir>,
}

impl Harness {
    /// Declare `parts` on a broker of `kind` under a fresh prefix.
    pub async fn on(kind: BrokerKind, parts: Vec<PartSpec>) -> Self {
        Self::on_config(kind, test_config(), parts).await
    }

    /// Same, with a given config.
    pub async fn on_config(kind: BrokerKind, config: BrokerConfig, parts: Vec<PartSpec>) -> Self {
        let topology = Topology::new(&config, parts);
        Self::on_topology(kind, config, topology).await
    }

    /// Same, with a given topology (built from `config`).
    pub async fn on_topology(kind: BrokerKind, config: BrokerConfig, topology: Topology) -> Self {
        match kind {
            BrokerKind::RabbitMq => Self::with_topology(config, topology).await,
            BrokerKind::Embedded => Self::embedded(config, topology).await,
        }
    }

    /// The embedded broker with `topology`, journaled to a fresh temp dir.
    pub async fn embedded(config: BrokerConfig, topology: Topology) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let journal = bruno_broker::embedded::Journal::open(dir.path(), 1 << 20).unwrap();
        let cancel = CancellationToken::new();
        let broker = Broker::embedded(
            config.clone(),
            topology.clone(),
            "test",
            BrokerMetrics::default(),
            cancel.clone(),
            Some(journal),
        );
        Self {
            config,
            topology,
            broker,
            kind: BrokerKind::Embedded,
            cancel,
            dir: Some(dir),
        }
    }

    /// A broker handle whose consumers a test may kill: a second connection
    /// on RabbitMQ (cancel it to close it), the same broker when embedded
    /// (aborting a consumer's task drops what it held).
    pub async fn doomed(&self) -> (Broker, CancellationToken) {
        match self.kind {
            BrokerKind::RabbitMq => self.second_broker(None).await,
            BrokerKind::Embedded => (self.broker.clone(), CancellationToken::new()),
        }
    }

    /// Take (and ack) every message of a queue, on either broker; waits up
    /// to `settle` for stragglers after the queue looks empty.
    pub async fn take(
        &self,
        queue: &str,
        settle: Duration,
    ) -> Vec<(lapin::BasicProperties, Vec<u8>)> {
        let Some(embedded) = self.broker.as_embedded() else {
            return self
                .drain(queue, settle)
                .await
                .into_iter()
                .map(|d| (d.properties, d.data))
                .collect();
        };
        let consumer = embedded.consume(queue, u16::MAX).unwrap();
        let mut out = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(settle, consumer.next()).await {
            out.push((d.properties.clone(), d.data.to_vec()));
            d.handle.ack();
        }
        out
    }

    /// Declare `parts` under a fresh prefix and connect.
    pub async fn new(parts: Vec<PartSpec>) -> Self {
        Self::with_config(test_config(), parts).await
    }

    /// Same, with a given config.
    pub async fn with_config(config: BrokerConfig, parts: Vec<PartSpec>) -> Self {
        let topology = Topology::new(&config, parts);
        Self::with_topology(config, topology).await
    }

    /// Same, with a given topology (built from `config`).
    pub async fn with_topology(config: BrokerConfig, topology: Topology) -> Self {
        init_logs();
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
            kind: BrokerKind::RabbitMq,
            cancel,
            dir: None,
        }
    }

    /// Another broker connection on the same topology, optionally via another address.
    pub async fn second_broker(&self, addr: Option<&str>) -> (Broker, CancellationToken) {
        let mut config = self.config.clone();
        if let Some(addr) = addr {
            config.url = Some(Secret::new(amqp_url(addr)));
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
        Connection::connect(
            self.config.url.as_ref().unwrap().expose(),
            ConnectionProperties::default(),
        )
        .await
        .unwrap()
    }

    /// Messages ready in a queue.
    pub async fn depth(&self, queue: &str) -> u32 {
        if let Some(embedded) = self.broker.as_embedded() {
            return embedded.depth(queue).expect("no such queue").0;
        }
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
        close(&conn).await;
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
        close(&conn).await;
        out
    }

    /// Start the ingress on port 0 over `broker`.
    pub async fn ingress(
        &self,
        broker: Broker,
        config: IngressConfig,
    ) -> (SocketAddr, CancellationToken) {
        let state = Arc::new(Ingress::new(&config, broker, IngressMetrics::default()).unwrap());
        let router = bruno_ingress::router(state);
        let stop = CancellationToken::new();
        let (addr, _task) =
            bruno_runtime::admin::serve("127.0.0.1:0".parse().unwrap(), router, stop.clone())
                .await
                .unwrap();
        (addr, stop)
    }

    /// Delete everything this test declared and close the connection.
    pub async fn cleanup(self) {
        if self.kind == BrokerKind::Embedded {
            self.cancel.cancel();
            return;
        }
        let conn = self.raw().await;
        let ch = conn.create_channel().await.unwrap();
        // Best effort: a test may have deleted some already.
        for q in self.topology.queues() {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for e in self.topology.exchanges() {
            let _ = ch
                .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        close(&conn).await;
        self.cancel.cancel();
    }
}

/// Close a raw connection, waiting at most five seconds. lapin's close can
/// wait forever after a channel error (one backbone bench run hung so; the
/// broker layer bounds its own close likewise); a close that gives up says so.
pub async fn close(conn: &Connection) {
    let closing = conn.close(200, "".into());
    if tokio::time::timeout(Duration::from_secs(5), closing)
        .await
        .is_err()
    {
        eprintln!("a raw lapin connection did not close within 5 s; dropped instead");
    }
}

/// Close `channels`, each within five seconds, then their connection
/// ([`close`]). Closing a connection while its channels were still being
/// closed (dropped with the tasks that held them) made lapin log a
/// channel-state error and, once in a backbone bench run, its close never
/// return; one at a time, each waits for the broker's close-ok.
pub async fn close_all(conn: Connection, channels: Vec<lapin::Channel>) {
    for ch in channels {
        let _ = tokio::time::timeout(Duration::from_secs(5), ch.close(200, "".into())).await;
    }
    close(&conn).await;
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
        Self::start_with(false).await
    }

    /// Start a node that speaks only AMQP over TLS, with a server
    /// certificate for `localhost` signed by a CA made here with openssl;
    /// returns it and the CA's PEM file. Connect as `amqps://…@localhost`.
    pub async fn start_tls() -> (Self, std::path::PathBuf) {
        let broker = Self::start_with(true).await;
        let ca = broker._dir.path().join("ca.pem");
        (broker, ca)
    }

    fn make_test_ca(dir: &std::path::Path) {
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=Bruno test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ]);
    }

    async fn start_with(tls: bool) -> Self {
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
        let conf = if tls {
            Self::make_test_ca(dir.path());
            let file = |name: &str| dir.path().join(name).display().to_string();
            format!(
                "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                file("ca.pem"),
                file("server.pem"),
                file("server.key")
            )
        } else {
            format!("listeners.tcp.local = 127.0.0.1:{port}\n")
        };
        std::fs::write(dir.path().join("rabbitmq.conf"), conf).unwrap();
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

    /// Its `amqps://` URL (guest account), for a node from [`Self::start_tls`].
    pub fn tls_url(&self) -> String {
        format!(
            "amqps://guest:guest@localhost:{}/%2f?heartbeat=10",
            self.port
        )
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
        (
            "BRUNO_BROKER__URL",
            config.url.as_ref().unwrap().expose().to_owned(),
        ),
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

/// A span as an OTLP receiver got it (ids in lowercase hex).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the process that sent it.
    pub service: String,
    /// Trace id.
    pub trace_id: String,
    /// Span id.
    pub span_id: String,
    /// Parent span id (empty for a root).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// Attributes, rendered as strings.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Start, in nanoseconds since the epoch.
    pub start_ns: u64,
    /// End, in nanoseconds since the epoch.
    pub end_ns: u64,
}

impl ReceivedSpan {
    fn ms(&self) -> f64 {
        self.end_ns.saturating_sub(self.start_ns) as f64 / 1e6
    }
}

/// One row of a per-hop breakdown: a segment of a request's wall time,
/// over every trace that had it.
#[derive(Debug, Clone)]
pub struct Hop {
    /// What the segment is.
    pub segment: String,
    /// Its median and 99th percentile, in ms (a trace with it several times
    /// counts their sum).
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Traces that had it.
    pub traces: usize,
    /// Median start after the request began, ms (the rows' order).
    pub at: f64,
}

/// Where the wall time of the requests whose server span is named `root`
/// (`POST /v1/chat`) goes, from their exported spans: before the first
/// publish; each publish and its confirm; each hop from a publish's start
/// to the consuming part's process (or reply inbox's receive) span; each
/// handler's own time (its process span without the publishes in it), its
/// database and LLM calls; and from the last reply received to the
/// response. Only the request's path counts: the chain of spans from its
/// server span to the reply that ended it, and the publishes and client
/// calls in that chain (memory writes and streamed deltas are off it).
pub fn hop_breakdown(spans: &[ReceivedSpan], root: &str) -> Vec<Hop> {
    use std::collections::{BTreeMap, HashMap};
    let mut by_trace: HashMap<&str, Vec<&ReceivedSpan>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.trace_id.as_str()).or_default().push(s);
    }
    let mut rows: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for trace in by_trace.values() {
        let Some(top) = trace.iter().find(|s| s.name == root && s.kind == 2) else {
            continue;
        };
        let ids: HashMap<&str, &ReceivedSpan> =
            trace.iter().map(|s| (s.span_id.as_str(), *s)).collect();
        let mut seen: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut add = |label: String, ms: f64, at_ns: u64| {
            let e = seen
                .entry(label)
                .or_insert((0.0, at_ns.saturating_sub(top.start_ns) as f64 / 1e6));
            e.0 += ms;
        };
        // The request's path: the chain from the reply that ended it (the
        // last one its server received) up to its server span, and the
        // publishes and client calls made in that chain.
        let Some(last) = trace
            .iter()
            .filter(|s| s.kind == 5 && s.name.starts_with("receive") && s.end_ns <= top.end_ns)
            .max_by_key(|s| s.end_ns)
        else {
            continue;
        };
        let mut chain: Vec<&str> = Vec::new();
        let mut at = Some(*last);
        while let Some(s) = at {
            chain.push(s.span_id.as_str());
            at = ids.get(s.parent_span_id.as_str()).copied();
        }
        let on_path: Vec<&&ReceivedSpan> = trace
            .iter()
            .filter(|s| {
                chain.contains(&s.span_id.as_str())
                    || (matches!(s.kind, 3 | 4) && chain.contains(&s.parent_span_id.as_str()))
            })
            .collect();
        let ty = |s: &ReceivedSpan| {
            s.attributes
                .get("cloudevents.event_type")
                .map(|t| {
                    t.trim_start_matches("bruno.")
                        .trim_end_matches(|c: char| c.is_ascii_digit())
                        .trim_end_matches(".v")
                        .to_owned()
                })
                .unwrap_or_default()
        };
        let mut first_publish = u64::MAX;
        let mut last_receive = 0;
        for s in &on_path {
            match s.kind {
                // producer: publish (with its confirm)
                4 => {
                    first_publish = first_publish.min(s.start_ns);
                    add(format!("publish + confirm {}", ty(s)), s.ms(), s.start_ns);
                }
                // consumer: process or receive
                5 => {
                    if let Some(p) = ids.get(s.parent_span_id.as_str()).filter(|p| p.kind == 4) {
                        let hop = s.start_ns.saturating_sub(p.start_ns) as f64 / 1e6;
                        add(
                            format!(
                                "publish → {} {}",
                                s.name.split(' ').next().unwrap_or(""),
                                ty(s)
                            ),
                            hop,
                            p.start_ns,
                        );
                    }
                    if s.name.starts_with("receive") {
                        last_receive = last_receive.max(s.end_ns);
                    } else {
                        // The publishes in it, as a union of intervals
                        // (a part publishes several events at once).
                        let mut inner: Vec<(u64, u64)> = on_path
                            .iter()
                            .filter(|c| c.parent_span_id == s.span_id && c.kind == 4)
                            .map(|c| (c.start_ns, c.end_ns))
                            .collect();
                        inner.sort_unstable();
                        let (mut covered, mut reach) = (0u64, 0u64);
                        for (start, end) in inner {
                            let start = start.max(reach);
                            if end > start {
                                covered += end - start;
                                reach = end;
                            }
                        }
                        let inner = covered as f64 / 1e6;
                        let part = s.attributes.get("part").cloned().unwrap_or_default();
                        add(
                            format!("{part} handler, own time"),
                            s.ms() - inner,
                            s.start_ns,
                        );
                    }
                }
                // client: database and LLM calls inside handlers
                3 => add(format!("  in it: {}", s.name), s.ms(), s.start_ns),
                _ => {}
            }
        }
        if first_publish != u64::MAX {
            add(
                format!("{root}: in, to the first publish"),
                first_publish.saturating_sub(top.start_ns) as f64 / 1e6,
                top.start_ns,
            );
        }
        if last_receive > 0 {
            add(
                format!("{root}: last reply received, to the response"),
                top.end_ns.saturating_sub(last_receive) as f64 / 1e6,
                last_receive,
            );
        }
        add(format!("{root}: whole request"), top.ms(), top.end_ns);
        for (label, (ms, at)) in seen {
            let row = rows.entry(label).or_default();
            row.0.push(ms);
            row.1.push(at);
        }
    }
    let mut out: Vec<Hop> = rows
        .into_iter()
        .map(|(segment, (mut values, at))| {
            values.sort_by(f64::total_cmp);
            let p99 = values[((values.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
            Hop {
                segment,
                p50: median(&values),
                p99,
                traces: values.len(),
                at: median(&at),
            }
        })
        .collect();
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    out
}

/// An OTLP/HTTP (protobuf) trace receiver on 127.0.0.1:0 that keeps every
/// span, built on the `opentelemetry-proto` types.
pub struct OtlpReceiver {
    /// Base URL to give exporters (`/v1/traces` is served).
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    received: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

impl OtlpReceiver {
    /// Start the receiver.
    pub async fn start() -> Self {
        Self::start_with(true).await
    }

    /// A receiver that decodes every request, as a collector does, and
    /// only counts the spans (benchmarks: it shares the machine).
    pub async fn start_counting() -> Self {
        Self::start_with(false).await
    }

    /// Spans received so far, kept or not.
    pub fn count(&self) -> usize {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn start_with(keep_spans: bool) -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
        use prost::Message;
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let received: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let keep = spans.clone();
        let counter = received.clone();
        let receive = move |body: bytes::Bytes| {
            let (keep, counter) = (keep.clone(), counter.clone());
            async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let n: usize = request
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len())
                    .sum();
                counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                if !keep_spans {
                    return (
                        axum::http::StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    );
                }
                let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
                    .as_ref()
                    .and_then(|v| v.value.as_ref())
                {
                    Some(V::StringValue(s)) => s.clone(),
                    Some(V::IntValue(i)) => i.to_string(),
                    Some(V::BoolValue(b)) => b.to_string(),
                    Some(V::DoubleValue(d)) => d.to_string(),
                    other => format!("{other:?}"),
                };
                let mut got = Vec::new();
                for rs in request.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        got.push(ReceivedSpan {
                            service: service.clone(),
                            trace_id: hex::encode(&span.trace_id),
                            span_id: hex::encode(&span.span_id),
                            parent_span_id: hex::encode(&span.parent_span_id),
                            name: span.name.clone(),
                            kind: span.kind,
                            attributes: span
                                .attributes
                                .iter()
                                .map(|a| (a.key.clone(), text(&a.value)))
                                .collect(),
                            start_ns: span.start_time_unix_nano,
                            end_ns: span.end_time_unix_nano,
                        });
                    }
                }
                keep.lock().unwrap().extend(got);
                (
                    axum::http::StatusCode::OK,
                    ExportTraceServiceResponse::default().encode_to_vec(),
                )
            }
        };
        let app = axum::Router::new().route("/v1/traces", axum::routing::post(receive));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await
                .unwrap()
        });
        Self {
            endpoint,
            spans,
            received,
            stop,
        }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Wait up to `timeout` until the trace holds spans from every one of
    /// `services`; returns the trace as it then is.
    pub async fn await_services(
        &self,
        trace_id: &str,
        services: &[&str],
        timeout: Duration,
    ) -> Vec<ReceivedSpan> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.trace(trace_id);
            let missing: Vec<&&str> = services
                .iter()
                .filter(|s| !spans.iter().any(|x| x.service == **s))
                .collect();
            if missing.is_empty() {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "trace {trace_id}: no spans from {missing:?}; got {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.service, &s.name))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Assert `spans` form one tree: exactly one span whose parent is not among
/// them (the root), and every other span reachable from it.
pub fn assert_one_tree(spans: &[ReceivedSpan]) {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| !ids.contains(s.parent_span_id.as_str()))
        .collect();
    let shape = || {
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {} [{}] {} <- {}",
                    s.service, s.name, s.kind, s.span_id, s.parent_span_id
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(roots.len(), 1, "not one root:\n{}", shape());
    let mut reached = std::collections::HashSet::from([roots[0].span_id.as_str()]);
    loop {
        let before = reached.len();
        for s in spans {
            if reached.contains(s.parent_span_id.as_str()) {
                reached.insert(s.span_id.as_str());
            }
        }
        if reached.len() == before {
            break;
        }
    }
    assert_eq!(reached.len(), spans.len(), "orphans:\n{}", shape());
}

/// A `bruno <part>` child process whose stderr lines are kept; killed when
/// dropped.
pub struct PartProcess {
    /// The part it runs.
    pub part: String,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl PartProcess {
    /// Start `bin <part>` with `env`.
    pub fn spawn(bin: &std::path::Path, part: &str, env: &[(String, String)]) -> Self {
        Self::spawn_args(bin, &[part], env)
    }

    /// Start `bin <args…>` with `env` (and no `BRUNO_BROKER__URL` from the
    /// test's own environment unless `env` sets it).
    pub fn spawn_args(bin: &std::path::Path, args: &[&str], env: &[(String, String)]) -> Self {
        use tokio::io::AsyncBufReadExt;
        let part = args.first().copied().unwrap_or_default();
        let mut child = tokio::process::Command::new(bin)
            .args(args)
            .env_remove("BRUNO_BROKER__URL")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let keep = lines.clone();
        let stderr = child.stderr.take().unwrap();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                keep.lock().unwrap().push(line);
            }
        });
        Self {
            part: part.to_owned(),
            child,
            lines,
        }
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The address the process logged it listens on for `what` (`admin`,
    /// `ingress`, `gateway`), from its JSON log lines.
    pub async fn listening(&mut self, what: &str) -> SocketAddr {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            for line in self.lines() {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                    && v["part"] == what
                    && let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok())
                {
                    return addr;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "bruno {} exited with {status}:\n{}",
                    self.part,
                    self.lines().join("\n")
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "bruno {} never said it listens on {what}:\n{}",
                self.part,
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stop the process (SIGKILL) and wait for it.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

impl Drop for PartProcess {
    /// A failing test shows what each of its processes logged last.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // No unwrap while unwinding: a second panic would abort.
            let lines = self.lines.lock().map(|l| l.clone()).unwrap_or_default();
            eprintln!(
                "--- bruno {}: last {} of {} log lines",
                self.part,
                lines.len().min(40),
                lines.len()
            );
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`, … suffixes).
    pub name: String,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parse a Prometheus (or OpenMetrics) text exposition; panics, naming the
/// line, on anything that is not a comment, `# EOF` or a sample.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(_) => {
                let close = line
                    .rfind('}')
                    .unwrap_or_else(|| panic!("bad line {line:?}"));
                (&line[..close + 1], line[close + 1..].trim())
            }
            None => line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.trim_end_matches('}');
                let mut map = std::collections::BTreeMap::new();
                // Label values here hold no `",` sequences.
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                    map.insert(k.trim().to_owned(), v.trim_end_matches('"').to_owned());
                }
                (name, map)
            }
            None => (series, Default::default()),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        let value = rest.split_whitespace().next().unwrap_or("");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

/// The sample names (`_total`, `_bucket`, … included) a `/metrics` page
/// declares with `# TYPE` lines, whether or not a sample was recorded yet.
pub fn declared_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// The `bruno_*` names in a PromQL expression.
pub fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("bruno_"))
        .map(str::to_owned)
        .collect()
}

/// A GitHub heading anchor.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Problems with the repo's dashboards and alert rules against `exported`
/// (the metrics the code declares): an expression naming a metric nobody
/// exports, an alert without a runbook, a runbook link to a missing file or
/// heading, an exported metric missing from docs/metrics.md.
pub fn observability_problems(
    root: &std::path::Path,
    exported: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |place: &str, expr: &str| {
        let names = metric_names(expr);
        if names.is_empty() {
            problems.push(format!("{place}: names no bruno_ metric: {expr}"));
        }
        for name in names {
            if !exported.contains(&name) {
                problems.push(format!("{place}: {name} is not exported"));
            }
        }
    };
    let dashboards = root.join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dashboards).unwrap() {
        let path = entry.unwrap().path();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for panel in json["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let place = format!("{} / {}", path.display(), panel["title"]);
                check(&place, target["expr"].as_str().unwrap_or(""));
            }
        }
    }
    let mut runbooks = Vec::new();
    for entry in std::fs::read_dir(root.join("deploy/prometheus/rules")).unwrap() {
        let path = entry.unwrap().path();
        let yaml: serde_json::Value =
            serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for rule in yaml["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
        {
            let alert = rule["alert"].as_str().unwrap_or("?").to_owned();
            check(
                &format!("{} / {alert}", path.display()),
                rule["expr"].as_str().unwrap_or(""),
            );
            runbooks.push((
                alert,
                rule["annotations"]["runbook"].as_str().map(str::to_owned),
            ));
        }
    }
    for (alert, runbook) in runbooks {
        let Some(runbook) = runbook else {
            problems.push(format!("alert {alert} has no runbook"));
            continue;
        };
        let (file, anchor) = runbook.split_once('#').unwrap_or((&runbook, ""));
        let Ok(text) = std::fs::read_to_string(root.join(file)) else {
            problems.push(format!("alert {alert}: runbook {file} does not exist"));
            continue;
        };
        let anchors: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .map(|h| slug(h.trim_start_matches('#')))
            .collect();
        if !anchor.is_empty() && !anchors.iter().any(|a| a == anchor) {
            problems.push(format!("alert {alert}: no heading #{anchor} in {file}"));
        }
    }
    let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    for name in exported {
        let family = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .unwrap_or(name);
        if !doc.contains(&format!("`{family}`")) && !doc.contains(&format!("`{name}`")) {
            problems.push(format!("{name} is not in docs/metrics.md"));
        }
    }
    problems
}

/// How a benchmark's runtime traces, to compare the cost of tracing in one run.
#[derive(Debug, Clone)]
pub enum Tracing {
    /// No subscriber at all.
    Off,
    /// The `bruno` binary's default: spans with OpenTelemetry ids (and
    /// JSON-free warn logs), nothing exported.
    Spans,
    /// Spans exported by OTLP/HTTP to `endpoint`, `ratio` of new traces sampled.
    Export {
        /// The receiver.
        endpoint: String,
        /// `telemetry.sample_ratio`.
        ratio: f64,
    },
}

impl Tracing {
    /// The modes a tracing-cost benchmark compares: none, the default,
    /// everything exported, a tenth of the traces exported.
    pub fn modes(endpoint: &str) -> Vec<Self> {
        let export = |ratio| Self::Export {
            endpoint: endpoint.to_owned(),
            ratio,
        };
        vec![Self::Off, Self::Spans, export(1.0), export(0.1)]
    }

    /// A short label.
    pub fn label(&self) -> String {
        match self {
            Self::Off => "no subscriber".into(),
            Self::Spans => "spans, no export".into(),
            Self::Export { ratio, .. } => format!("exported, {:.0} % sampled", ratio * 100.0),
        }
    }

    /// Run `work` on a fresh two-worker runtime (on its own thread) whose
    /// threads all trace this way; flushes exported spans before returning.
    pub fn run<F, T>(&self, work: impl FnOnce() -> F + Send + 'static) -> T
    where
        F: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let mode = self.clone();
        std::thread::spawn(move || {
            let log = bruno_runtime::telemetry::LogSettings {
                json: false,
                filter: "warn".into(),
            };
            let (dispatch, guard) = match &mode {
                Tracing::Off => (tracing::Dispatch::none(), None),
                Tracing::Spans => {
                    let (d, g) = bruno_runtime::telemetry::dispatch(
                        &log,
                        &Default::default(),
                        "bruno-bench",
                    );
                    (d, Some(g))
                }
                Tracing::Export { endpoint, ratio } => {
                    let telemetry = bruno_runtime::telemetry::TelemetryConfig {
                        otlp_endpoint: Some(endpoint.clone()),
                        sample_ratio: *ratio,
                    };
                    let (d, g) =
                        bruno_runtime::telemetry::dispatch(&log, &telemetry, "bruno-bench");
                    (d, Some(g))
                }
            };
            let for_workers = dispatch.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .on_thread_start(move || {
                    // Lives as long as the worker thread.
                    std::mem::forget(tracing::dispatcher::set_default(&for_workers));
                })
                .build()
                .unwrap();
            let _default = tracing::dispatcher::set_default(&dispatch);
            let out = runtime.block_on(work());
            runtime.shutdown_timeout(Duration::from_secs(10));
            drop(guard);
            out
        })
        .join()
        .unwrap()
    }
}

/// POST one binary-mode CloudEvent (`id`, `ty`, source `tests`, JSON
/// `data`) to the ingress; returns the HTTP status.
pub async fn post_event(ingress: SocketAddr, id: &str, ty: &str, data: &[u8]) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{ingress}/"))
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-type", ty)
        .header("ce-source", "tests")
        .header("content-type", "application/json")
        .body(data.to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Wait up to `timeout` until `doc_id` has chunks in the MiniLM chunks
/// table of the store under `dir`.
pub async fn await_indexed(dir: &std::path::Path, doc_id: &str, timeout: Duration) -> bool {
    let store = open_store(dir).await;
    let info = bruno_store::EmbedderInfo {
        model: "sentence-transformers/all-MiniLM-L6-v2".into(),
        dimension: 384,
    };
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Some(t) = store.existing_chunks(&info).await.unwrap()
            && t.count(Some(doc_id)).await.unwrap() > 0
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The text of `http://<admin>/metrics`.
pub async fn metrics_text(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Wait up to a minute until `http://<admin>/ready` answers 200.
pub async fn await_ready(admin: SocketAddr) {
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if client
            .get(format!("http://{admin}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{admin} never became ready");
}

/// The median of `values` (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Run a one-shot `bruno` command (`bin`) with `env` on top of this
/// process's environment minus `BRUNO_BROKER__URL` (so only `env` decides
/// the broker); its success, stdout and stderr.
pub async fn run_bruno(
    bin: &std::path::Path,
    args: &[&str],
    env: &[(String, String)],
) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .env_remove("BRUNO_BROKER__URL")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
