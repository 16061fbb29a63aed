//! Backbone benchmark against the local RabbitMQ, 1 KiB events.
//!
//! Prints: raw lapin publish-with-confirms throughput and latency (the
//! baseline, same concurrency as the HTTP load), ingress HTTP → confirmed
//! publish throughput and p50/p99 latency, the same HTTP requests to a
//! server that answers 202 without publishing (the HTTP floor), and
//! consumer throughput with a no-op handler at prefetch 1 and at the
//! default prefetch. Each load phase also prints its CPU time per message,
//! this process's and RabbitMQ's, and how busy the machine was: with the
//! cores saturated, HTTP alone and the raw publish done one after the
//! other bound what any ingress can reach.
//!
//! Then one hop, the way a chat turn crosses the broker: an event published
//! with `Broker::publish` (confirmed) until a consumer's handler has it,
//! one at a time, on a quorum queue (the baseline) and on an interactive
//! part's classic queue (ADR 17), in interleaved rounds.
//!
//! The ingress against raw lapin is a ratio of two throughputs on the same
//! two cores as RabbitMQ, which moves by several points from one pair of
//! runs to the next: it is the median over `BENCH_RATIO_ROUNDS` rounds
//! (default 5), the order rotating. Each round also runs a minimal ingress
//! (an axum handler that publishes the body with lapin and answers 202,
//! none of Bruno's code), what any ingress on this stack can reach on
//! these cores; and each phase prints its context switches per message.
//!
//! Run: `cargo bench -p bruno-system-tests --bench backbone`
//! (env BENCH_N, BENCH_CONCURRENCY to change the load; `BENCH_ONLY=hop`
//! runs only the hop, `BENCH_ONLY=ingress` only the ingress load,
//! `BENCH_ONLY=minimal` only the minimal ingress).
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The same allocator as the `bruno` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bruno_events::payload::DocumentSubmitted;
use bruno_events::{Event, EventData, new_event};
use bruno_ingress::IngressConfig;
use bruno_runtime::{Context, Handler, HandlerError, Incoming, Raw};
use bruno_system_tests::Harness;
use hdrhistogram::Histogram;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueuePurgeOptions};
use tokio_util::sync::CancellationToken;

const PART: &str = "bench";
const DEFAULT_PREFETCH: u16 = 32;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `document.submitted` event whose data is exactly 1024 bytes.
fn event_1k() -> Event {
    let mut doc = DocumentSubmitted {
        doc_id: "bench".into(),
        source: "bench".into(),
        title: None,
        text: String::new(),
        format: Default::default(),
        metadata: Default::default(),
    };
    let base = serde_json::to_vec(&doc).unwrap().len();
    doc.text = "x".repeat(1024 - base);
    let e = new_event("bench", &doc);
    assert_eq!(bruno_events::data_bytes(&e).unwrap().len(), 1024);
    e
}

fn report(name: &str, n: usize, elapsed: Duration, hist: Option<&Histogram<u64>>) -> f64 {
    let rate = n as f64 / elapsed.as_secs_f64();
    match hist {
        Some(h) => println!(
            "{name:44} {rate:>10.0} msg/s   p50 {:>7.3} ms   p99 {:>7.3} ms",
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0
        ),
        None => println!("{name:44} {rate:>10.0} msg/s"),
    }
    rate
}

/// Empty the bench's queue; a purge that hangs stops the bench with a
/// message instead of leaving it waiting.
async fn purge(h: &Harness) {
    let purging = async {
        let conn = h.raw().await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_purge(h.queue(PART).as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        bruno_system_tests::close(&conn).await;
    };
    tokio::time::timeout(Duration::from_secs(60), purging)
        .await
        .expect("purging the bench queue took over 60 s");
}

/// A connection of its own with as many confirm channels as the broker
/// layer uses.
async fn confirm_channels(h: &Harness) -> (lapin::Connection, Vec<lapin::Channel>) {
    let conn = h.raw().await;
    let mut channels = Vec::new();
    for _ in 0..h.config.publish_channels {
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        channels.push(ch);
    }
    (conn, channels)
}

/// Publish `body` (mandatory) and wait for its confirm, which must be an ack.
async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            "".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

/// The ingress's answer to one accepted event: 202, its id in a JSON body.
fn accepted(headers: &axum::http::HeaderMap) -> axum::response::Response {
    use axum::response::IntoResponse;
    let id = headers
        .get("ce-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    (
        axum::http::StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"accepted": 1, "ids": [id]})),
    )
        .into_response()
}

/// Raw lapin: `concurrency` tasks, each publish + await confirm in a loop,
/// over as many confirm channels as the broker layer uses.
async fn raw_lapin(h: &Harness, n: usize, concurrency: usize) -> (f64, Histogram<u64>) {
    let (conn, channels) = confirm_channels(h).await;
    let (props, body) = bruno_broker::codec::encode(&event_1k()).unwrap();
    let exchange = h.topology.names.exchange();
    let left = Arc::new(AtomicU64::new(n as u64));
    let cpu = Cpu::now();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let ch = channels[i % channels.len()].clone();
        let (props, body, exchange, left) =
            (props.clone(), body.clone(), exchange.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            while left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
                .is_ok()
            {
                let t = Instant::now();
                publish_confirmed(&ch, &exchange, &body, props.clone()).await;
                hist.record(t.elapsed().as_micros() as u64).unwrap();
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let rate = report(
        &format!("raw lapin publish+confirm (c={concurrency})"),
        n,
        started.elapsed(),
        Some(&hist),
    );
    cpu.report(n);
    bruno_system_tests::close_all(conn, channels).await;
    (rate, hist)
}

/// A minimal keep-alive HTTP/1.1 client, so the load generator (which shares
/// the machine's two cores with the ingress and RabbitMQ) costs as little as
/// possible and the figure is the ingress's, not the client's.
struct RawHttp {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl RawHttp {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream: tokio::io::BufReader::new(stream),
        }
    }

    /// Send one request; return the status.
    async fn send(&mut self, request: &[u8]) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        self.stream.get_mut().write_all(request).await.unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).await.unwrap();
        let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await.unwrap();
        status
    }
}

/// HTTP binary-mode POSTs to the ingress from `concurrency` keep-alive connections.
async fn ingress(h: &Harness, n: usize, concurrency: usize) -> (f64, Histogram<u64>) {
    let (addr, stop) = h.ingress(h.broker.clone(), IngressConfig::default()).await;
    let out = http_load(
        addr,
        n,
        concurrency,
        &format!("ingress HTTP -> confirmed publish (c={concurrency})"),
    )
    .await;
    stop.cancel();
    out
}

/// The HTTP floor: the same requests from the same client to an axum
/// server that answers them as the ingress does (202, the id in a JSON
/// body) without parsing, validating or publishing anything.
async fn http_floor(n: usize, concurrency: usize) -> (f64, Histogram<u64>) {
    async fn accept(
        headers: axum::http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        assert!(!body.is_empty());
        accepted(&headers)
    }
    let app = axum::Router::new().route("/", axum::routing::post(accept));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let out = http_load(
        addr,
        n,
        concurrency,
        &format!("HTTP alone, 202 with no publish (c={concurrency})"),
    )
    .await;
    server.abort();
    out
}

/// The least an ingress on this stack (axum, lapin, RabbitMQ) can do: a
/// handler with no middleware that publishes the request body, its AMQP
/// properties encoded once beforehand, on confirm channels of its own
/// connection, and answers 202 as the ingress does once the broker
/// confirmed. No parsing, validation, spans or metrics: what is left is
/// the HTTP server, the publish and the wake-ups between them.
async fn minimal_ingress(h: &Harness, n: usize, concurrency: usize) -> (f64, Histogram<u64>) {
    use axum::extract::State;
    use axum::http::HeaderMap;
    struct Publisher {
        channels: Vec<lapin::Channel>,
        next: std::sync::atomic::AtomicUsize,
        props: lapin::BasicProperties,
        exchange: String,
    }
    async fn accept(
        State(p): State<Arc<Publisher>>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let ch = &p.channels[p.next.fetch_add(1, Ordering::Relaxed) % p.channels.len()];
        publish_confirmed(ch, &p.exchange, &body, p.props.clone()).await;
        accepted(&headers)
    }
    let (conn, channels) = confirm_channels(h).await;
    let (props, _) = bruno_broker::codec::encode(&event_1k()).unwrap();
    let publisher = Arc::new(Publisher {
        channels: channels.clone(),
        next: Default::default(),
        props,
        exchange: h.topology.names.exchange(),
    });
    let app = axum::Router::new()
        .route("/", axum::routing::post(accept))
        .with_state(publisher);
    let stop = CancellationToken::new();
    // Served as the ingress is (TCP_NODELAY on every connection).
    let (addr, server) =
        bruno_runtime::admin::serve("127.0.0.1:0".parse().unwrap(), app, stop.clone())
            .await
            .unwrap();
    let out = http_load(
        addr,
        n,
        concurrency,
        &format!("minimal ingress: axum + lapin only (c={concurrency})"),
    )
    .await;
    stop.cancel();
    // The server gone (its router, holding the channels, dropped) before
    // anything is closed.
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    bruno_system_tests::close_all(conn, channels).await;
    out
}

/// `n` binary-mode POSTs of the 1 KiB event to `addr` from `concurrency`
/// keep-alive connections; every answer must be 202.
async fn http_load(
    addr: std::net::SocketAddr,
    n: usize,
    concurrency: usize,
    name: &str,
) -> (f64, Histogram<u64>) {
    let event = event_1k();
    let body = bruno_events::data_bytes(&event).unwrap().into_owned();
    let left = Arc::new(AtomicU64::new(n as u64));
    let cpu = Cpu::now();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (body, left) = (body.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = RawHttp::connect(addr).await;
            let mut hist = Histogram::<u64>::new(3).unwrap();
            while let Ok(v) = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1)) {
                let mut request = format!(
                    "POST / HTTP/1.1\r\nhost: {addr}\r\nce-specversion: 1.0\r\nce-id: bench-{v}\r\nce-source: bench\r\nce-type: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    DocumentSubmitted::TYPE,
                    body.len()
                )
                .into_bytes();
                request.extend_from_slice(&body);
                let t = Instant::now();
                assert_eq!(client.send(&request).await, 202);
                hist.record(t.elapsed().as_micros() as u64).unwrap();
            }
            hist
        }));
    }
    let mut hist = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        hist.add(t.await.unwrap()).unwrap();
    }
    let rate = report(name, n, started.elapsed(), Some(&hist));
    cpu.report(n);
    (rate, hist)
}

/// CPU time used so far, in clock ticks: this process (the load generator
/// and whatever it serves), RabbitMQ's Erlang VM (every `beam.smp` on the
/// machine; none when the broker is elsewhere) and the whole machine.
#[derive(Clone, Copy, Default)]
struct Cpu {
    own: u64,
    rabbit: u64,
    busy: u64,
    total: u64,
    /// Context switches (voluntary and not) of this process's threads and
    /// of RabbitMQ's.
    own_switches: u64,
    rabbit_switches: u64,
}

/// Context switches of every thread of process `pid` (`/proc/<pid>/task`).
fn switches(pid: &std::path::Path) -> u64 {
    std::fs::read_dir(pid.join("task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// utime + stime of a `/proc/<pid>/stat` line.
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command's closing parenthesis start at field 3;
    // utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

impl Cpu {
    fn now() -> Self {
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let own = stat_ticks(&read("/proc/self/stat".into())).unwrap_or(0);
        let beams: Vec<std::path::PathBuf> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| read(e.path().join("comm")).trim() == "beam.smp")
            .map(|e| e.path())
            .collect();
        let rabbit = beams
            .iter()
            .filter_map(|p| stat_ticks(&read(p.join("stat"))))
            .sum();
        let own_switches = switches("/proc/self".as_ref());
        let rabbit_switches = beams.iter().map(|p| switches(p)).sum();
        // The first line of /proc/stat: user nice system idle iowait irq
        // softirq steal ...
        let all = read("/proc/stat".into());
        let machine: Vec<u64> = all
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|v| v.parse().ok())
            .collect();
        let (busy, total) = match machine.as_slice() {
            [user, nice, system, idle, iowait, irq, softirq, steal] => {
                let busy = user + nice + system + irq + softirq + steal;
                (busy, busy + idle + iowait)
            }
            _ => (0, 0),
        };
        Self {
            own,
            rabbit,
            busy,
            total,
            own_switches,
            rabbit_switches,
        }
    }

    /// Print the CPU each of `n` messages cost since `self`.
    fn report(self, n: usize) {
        let now = Self::now();
        // Linux clock ticks are 10 ms (USER_HZ = 100).
        let us = |ticks: u64| ticks as f64 * 10_000.0 / n as f64;
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        println!(
            "{:44} CPU per message: this process {:>5.1} us, RabbitMQ {:>5.1} us; machine busy {:.0} % of {cores} cores",
            "",
            us(now.own.saturating_sub(self.own)),
            us(now.rabbit.saturating_sub(self.rabbit)),
            100.0 * now.busy.saturating_sub(self.busy) as f64
                / now.total.saturating_sub(self.total).max(1) as f64,
        );
        println!(
            "{:44} context switches per message: this process {:.2}, RabbitMQ {:.2}",
            "",
            per(now.own_switches, self.own_switches),
            per(now.rabbit_switches, self.rabbit_switches),
        );
    }
}

struct Noop(Arc<AtomicU64>);

impl Handler for Noop {
    type Input = Raw;
    async fn handle(&self, _: Incoming<Raw>, _: &Context) -> Result<Vec<Event>, HandlerError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(vec![])
    }
}

async fn consumer(h: &Harness, n: usize, prefetch: u16) -> f64 {
    purge(h).await;
    let events: Vec<Event> = (0..n).map(|_| event_1k()).collect();
    for chunk in events.chunks(500) {
        h.broker.publish_all(chunk).await.unwrap();
    }
    let count = Arc::new(AtomicU64::new(0));
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(bruno_runtime::run_pull(
        h.broker.clone(),
        PART,
        prefetch,
        Arc::new(Noop(count.clone())),
        shutdown.clone(),
    ));
    while count.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = report(
        &format!("consumer, no-op handler, prefetch {prefetch}"),
        n,
        started.elapsed(),
        None,
    );
    shutdown.cancel();
    task.await.unwrap();
    rate
}

/// Stamps when its handler got each event.
struct Stamp(tokio::sync::mpsc::UnboundedSender<Instant>);

impl Handler for Stamp {
    type Input = Raw;
    async fn handle(&self, _: Incoming<Raw>, _: &Context) -> Result<Vec<Event>, HandlerError> {
        let _ = self.0.send(Instant::now());
        Ok(vec![])
    }
}

/// One hop at a time, publish (with confirm) to the handler, on a quorum
/// queue and on an interactive part's classic queue, `rounds` interleaved
/// rounds of `per_round` events each.
async fn hop(rounds: usize, per_round: usize) {
    use bruno_events::AttributesWriter;
    use bruno_events::payload::{ChatRequested, SearchRequested};
    println!("---");
    let quorum = bruno_broker::PartSpec::on_types("hop-quorum", &[ChatRequested::TYPE]);
    let classic =
        bruno_broker::PartSpec::on_types("hop-classic", &[SearchRequested::TYPE]).interactive();
    let h = Harness::with_config(bruno_system_tests::test_config(), vec![quorum, classic]).await;
    let shutdown = CancellationToken::new();
    let mut stamps = Vec::new();
    for part in ["hop-quorum", "hop-classic"] {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(bruno_runtime::run_pull(
            h.broker.clone(),
            part,
            DEFAULT_PREFETCH,
            Arc::new(Stamp(tx)),
            shutdown.clone(),
        ));
        stamps.push(rx);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hists = [
        Histogram::<u64>::new(3).unwrap(),
        Histogram::<u64>::new(3).unwrap(),
    ];
    for round in 0..=rounds {
        for (i, ty) in [ChatRequested::TYPE, SearchRequested::TYPE]
            .into_iter()
            .enumerate()
        {
            for _ in 0..per_round {
                let mut e = event_1k();
                e.set_type(ty);
                let t = Instant::now();
                h.broker.publish(&e).await.unwrap();
                let got = stamps[i].recv().await.unwrap();
                // Round 0 warms up both queues and connections.
                if round > 0 {
                    hists[i]
                        .record(got.duration_since(t).as_micros() as u64)
                        .unwrap();
                }
            }
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    for (name, hist) in [
        "quorum queue (baseline)",
        "classic queue (interactive part, ADR 17)",
    ]
    .iter()
    .zip(&hists)
    {
        println!(
            "one hop, publish -> handler, {name:42} p50 {:>7.3} ms   p99 {:>7.3} ms",
            ms(hist, 0.5),
            ms(hist, 0.99)
        );
    }
    println!(
        "one hop on the classic queue / on the quorum queue: p50 {:.2}x, p99 {:.2}x ({rounds} interleaved rounds of {per_round})",
        ms(&hists[1], 0.5) / ms(&hists[0], 0.5),
        ms(&hists[1], 0.99) / ms(&hists[0], 0.99),
    );
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.cleanup().await;
}

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_ONLY").as_deref() == Ok("hop") {
        hop(env_or("BENCH_HOP_ROUNDS", 5), env_or("BENCH_HOP_N", 200)).await;
        return;
    }
    let n = env_or("BENCH_N", 20_000);
    let concurrency = env_or("BENCH_CONCURRENCY", 32);
    let mut config = bruno_system_tests::test_config();
    config.publish_channels = 4;
    let h = Harness::with_config(
        config,
        vec![bruno_broker::PartSpec::on_types(
            PART,
            &[DocumentSubmitted::TYPE],
        )],
    )
    .await;
    println!(
        "backbone bench: {n} events of 1 KiB, concurrency {concurrency}, broker {}",
        bruno_system_tests::amqp_addr()
    );
    // BENCH_ONLY=ingress: only the ingress load (to profile it alone).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("ingress") {
        ingress(&h, n, concurrency).await;
        h.cleanup().await;
        return;
    }
    // BENCH_ONLY=minimal: only the minimal ingress (to profile beside it).
    if std::env::var("BENCH_ONLY").as_deref() == Ok("minimal") {
        minimal_ingress(&h, n, concurrency).await;
        h.cleanup().await;
        return;
    }

    // Warm up connections and the broker's queue.
    raw_lapin(&h, 2_000, concurrency).await;
    ingress(&h, 2_000, concurrency).await;
    minimal_ingress(&h, 2_000, concurrency).await;
    purge(&h).await;
    println!("---");

    let (raw_rate, raw_hist) = raw_lapin(&h, n, concurrency).await;
    purge(&h).await;
    let (ing_rate, ing_hist) = ingress(&h, n, concurrency).await;
    purge(&h).await;
    let (floor_rate, _) = http_floor(n, concurrency).await;
    let (min_rate, _) = minimal_ingress(&h, n, concurrency).await;
    purge(&h).await;
    // Added latency without queueing: one request at a time.
    let (_, raw_seq) = raw_lapin(&h, n / 10, 1).await;
    purge(&h).await;
    let (_, ing_seq) = ingress(&h, n / 10, 1).await;
    purge(&h).await;
    let c1 = consumer(&h, n / 4, 1).await;
    let cd = consumer(&h, n, DEFAULT_PREFETCH).await;
    println!("---");
    // The ratio moves by several points from one round of runs to the
    // next (RabbitMQ shares the two cores): more rounds, the order
    // rotating, and the median of their ratios. Each round also runs the
    // minimal ingress (axum + lapin with none of Bruno's code), what any
    // ingress on this stack reaches on these cores.
    let rounds = env_or("BENCH_RATIO_ROUNDS", 5);
    let mut ratios = vec![100.0 * ing_rate / raw_rate];
    let mut minimal = vec![100.0 * min_rate / raw_rate];
    let mut of_minimal = vec![100.0 * ing_rate / min_rate];
    for round in 1..rounds {
        let mut rates = [0.0; 3];
        for offset in 0..3 {
            let i = (round + offset) % 3;
            rates[i] = match i {
                0 => raw_lapin(&h, n, concurrency).await.0,
                1 => minimal_ingress(&h, n, concurrency).await.0,
                _ => ingress(&h, n, concurrency).await.0,
            };
            purge(&h).await;
        }
        let [raw, min, ing] = rates;
        ratios.push(100.0 * ing / raw);
        minimal.push(100.0 * min / raw);
        of_minimal.push(100.0 * ing / min);
    }
    let percents = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.1} %"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let median = bruno_system_tests::median;
    println!("---");
    println!(
        "ingress / raw throughput at c={concurrency}: median of {} rounds {:.1} % (goal >= 75 %); rounds: {}",
        ratios.len(),
        median(&ratios),
        percents(&ratios)
    );
    println!(
        "minimal ingress (axum + lapin, none of Bruno's code) / raw: median {:.1} %; rounds: {}",
        median(&minimal),
        percents(&minimal)
    );
    println!(
        "ingress / minimal ingress: median {:.1} %; rounds: {}",
        median(&of_minimal),
        percents(&of_minimal)
    );
    // With the cores saturated, a request costs its HTTP and its publish:
    // at best 1 / (1 / http + 1 / raw) requests per second, whatever the
    // ingress does in between.
    let bound = 1.0 / (1.0 / floor_rate + 1.0 / raw_rate);
    println!(
        "HTTP alone + raw publish, serially on the same cores: {bound:.0} msg/s = {:.1} % of raw; the ingress reaches {:.1} % of that",
        100.0 * bound / raw_rate,
        100.0 * ing_rate / bound
    );
    let added = |a: &Histogram<u64>, b: &Histogram<u64>, q: f64| {
        (a.value_at_quantile(q) as f64 - b.value_at_quantile(q) as f64) / 1000.0
    };
    for (q, name) in [(0.5, "p50"), (0.99, "p99")] {
        println!(
            "ingress {name} added over raw publish: {:.3} ms at c=1, {:.3} ms at c={concurrency} (goal p99 <= 2 ms)",
            added(&ing_seq, &raw_seq, q),
            added(&ing_hist, &raw_hist, q)
        );
    }
    println!("consumer prefetch {DEFAULT_PREFETCH} vs 1: {:.1}x", cd / c1);
    hop(env_or("BENCH_HOP_ROUNDS", 5), env_or("BENCH_HOP_N", 200)).await;
    let h = std::sync::Arc::new(h);
    tracing_cost(h.clone(), n, concurrency).await;
    if let Ok(h) = std::sync::Arc::try_unwrap(h) {
        h.cleanup().await;
    }
}

/// Ingress throughput on a fresh runtime per tracing mode (no subscriber,
/// the binary's default: spans without export, spans exported to an OTLP
/// receiver in this process, a tenth of them exported), the modes
/// interleaved over `BENCH_TRACE_ROUNDS` rounds; medians per mode.
async fn tracing_cost(h: std::sync::Arc<Harness>, n: usize, concurrency: usize) {
    use bruno_system_tests::{OtlpReceiver, Tracing, median};
    let rounds = env_or("BENCH_TRACE_ROUNDS", 3);
    if rounds == 0 {
        return;
    }
    println!("---");
    let otlp = OtlpReceiver::start_counting().await;
    let modes = Tracing::modes(&otlp.endpoint);
    let mut rates = vec![Vec::new(); modes.len()];
    let mut p50s = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        // The order rotates every round, so no mode always runs first.
        for offset in 0..modes.len() {
            let i = (round + offset) % modes.len();
            let (h, mode) = (h.clone(), modes[i].clone());
            let (rate, hist) = tokio::task::spawn_blocking(move || {
                mode.run(move || async move {
                    ingress(&h, 2_000, concurrency).await;
                    purge(&h).await;
                    let out = ingress(&h, n, concurrency).await;
                    purge(&h).await;
                    out
                })
            })
            .await
            .unwrap();
            rates[i].push(rate);
            p50s[i].push(hist.value_at_quantile(0.5) as f64 / 1000.0);
        }
    }
    let off = median(&rates[0]);
    for (i, mode) in modes.iter().enumerate() {
        println!(
            "tracing: {:24} ingress median {:>8.0} msg/s ({:.1} % of no subscriber), p50 {:.3} ms; runs {:?}",
            mode.label(),
            median(&rates[i]),
            100.0 * median(&rates[i]) / off,
            median(&p50s[i]),
            rates[i].iter().map(|r| r.round()).collect::<Vec<_>>()
        );
    }
    println!(
        "tracing: goal: export on loses <= 5 % of the throughput; {} spans received",
        otlp.count()
    );
}
