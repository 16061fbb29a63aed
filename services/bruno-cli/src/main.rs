//! `bruno`: run Bruno's parts and operate it.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use bruno_broker::dlq;
use bruno_cli::{Config, connect_for_tool, registry, run_parts};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// mimalloc: the ingress and consumers allocate per message; glibc malloc
/// showed up as ~12 % of the ingress's CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "bruno",
    version,
    about = "Bruno: a self-hosted AI-assistant backend on an event-driven worker fleet"
)]
struct Cli {
    /// TOML config file (defaults < file < BRUNO_* environment).
    #[arg(long, global = true, env = "BRUNO_CONFIG_FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every part in one process on embedded defaults (a laptop setup),
    /// or the ones named with --parts. Each part also runs alone as
    /// `bruno <part>` (listed below and by `bruno parts`).
    Dev {
        /// Only these parts, comma-separated (e.g. --parts writer,retriever).
        #[arg(long, value_delimiter = ',')]
        parts: Vec<String>,
    },
    /// List the parts of the fleet: what each consumes, how it runs, when it stops.
    Parts {
        /// Print the markdown table of docs/architecture.md.
        #[arg(long)]
        markdown: bool,
    },
    /// Send text and markdown files (or directories of them) to the ingress
    /// as document.submitted events.
    Ingest {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The ingress URL (default: http://127.0.0.1:<ingress.listen port>/).
        #[arg(long, env = "BRUNO_INGEST_URL")]
        url: Option<String>,
        /// API key for the ingress.
        #[arg(long, env = "BRUNO_INGEST_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// The documents' source label (filterable in searches).
        #[arg(long, default_value = "files")]
        source: String,
        /// Requests in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Print a JSON report instead of a progress bar.
        #[arg(long)]
        json: bool,
        /// Then wait until every accepted document is searchable (or
        /// dead-lettered); exits non-zero if any is not. Needs the broker.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 900)]
        wait_timeout: u64,
    },
    /// Search the knowledge base (through the broker and the retriever).
    Search {
        /// What to look for.
        query: String,
        /// Hits to return.
        #[arg(short, long, default_value_t = 5)]
        k: u32,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Only this document.
        #[arg(long)]
        doc_id: Option<String>,
        /// Which ranking: hybrid, or one leg alone.
        #[arg(long, value_enum, default_value_t = EvalMode::Hybrid)]
        mode: EvalMode,
        /// Seconds to wait for the retriever.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure retrieval on a labelled query set (JSON Lines of
    /// {"query": ..., "relevant": [doc ids]}) through the fleet: MRR@10,
    /// nDCG@10, Recall@1/5/10 and latency, at document and chunk level.
    Eval {
        /// The queries file.
        queries: PathBuf,
        /// Which ranking to measure: hybrid, or one leg alone.
        #[arg(long, value_enum, default_value_t = EvalMode::Hybrid)]
        mode: EvalMode,
        /// Chunks asked for per query.
        #[arg(short, long, default_value_t = 10)]
        k: u32,
        /// Searches in flight (1 measures latency without queueing).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds one search may take.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Print a JSON report (with every query's ranks) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Declare the exchanges, queues and bindings, then exit; with
    /// `--manifests`, print them as Messaging Topology Operator resources instead.
    Topology {
        /// Print Kubernetes manifests (YAML) instead of declaring.
        #[arg(long)]
        manifests: bool,
        /// The RabbitmqCluster the manifests refer to.
        #[arg(long, default_value = "bruno-rabbitmq")]
        cluster: String,
        /// Print push mode's Knative Triggers (YAML) instead.
        #[arg(long, conflicts_with = "manifests")]
        knative: bool,
        /// Also replace the interactive parts' queues declared with other
        /// arguments (quorum queues from before ADR 17, another request
        /// TTL) when empty and unconsumed; stop those parts first.
        #[arg(long, conflicts_with_all = ["manifests", "knative"])]
        replace: bool,
    },
    /// Run the backup part (no subcommand), or take, list and verify backups.
    Backup {
        #[command(subcommand)]
        command: Option<BackupCommand>,
    },
    /// Restore a backup into the storage directory (store.uri) or --to.
    /// Every object is decrypted and checked before anything is touched.
    Restore {
        /// The backup to restore.
        #[arg(long, conflicts_with = "latest", required_unless_present = "latest")]
        backup: Option<String>,
        /// The newest verified backup.
        #[arg(long)]
        latest: bool,
        /// Where to (default: store.uri); must be empty unless --force.
        #[arg(long)]
        to: Option<String>,
        /// Move the tables already there aside and restore anyway.
        #[arg(long)]
        force: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and replay dead letters.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Probe a running part's admin server (for container healthchecks):
    /// exits 0 when `path` answers 200.
    Health {
        /// Admin server address.
        #[arg(long, default_value = "127.0.0.1:9090")]
        addr: String,
        /// Path to probe (`/live` or `/ready`).
        #[arg(long, default_value = "/live")]
        path: String,
    },
    /// The event catalogue.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters of a part (nothing is removed).
    List {
        /// The part (see `bruno parts`).
        #[arg(long)]
        part: String,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with all its headers.
    Show {
        #[arg(long)]
        part: String,
        /// Event id.
        #[arg(long)]
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the part's queue.
    Replay {
        #[arg(long)]
        part: String,
        /// Only this event id.
        #[arg(long)]
        id: Option<String>,
        /// Only this event type.
        #[arg(long = "type")]
        ty: Option<String>,
        /// Only this error code.
        #[arg(long)]
        code: Option<String>,
        /// Replay everything (required when no filter is given).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete every dead letter of a part.
    Purge {
        #[arg(long)]
        part: String,
        /// Confirm.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Ask the backup part for a backup now and wait for its answer.
    Run {
        /// Only these tables (repeatable; default all).
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Seconds to wait.
        #[arg(long, default_value_t = 1800)]
        timeout: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the backups in the target.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a backup by restoring it into scratch (default: the newest).
    Verify {
        /// Backup id.
        id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print the SHA-256 to put in ingress.api_key_hashes (key from the argument or stdin).
    Hash { key: Option<String> },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// List event types.
    List,
    /// Print the JSON Schema of an event type's data.
    Schema { r#type: String },
    /// Print the AsyncAPI document of the whole catalogue.
    Asyncapi,
}

/// `--mode` of `bruno search` and `bruno eval`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EvalMode {
    Hybrid,
    Vector,
    Text,
}

impl From<EvalMode> for bruno_events::payload::SearchMode {
    fn from(m: EvalMode) -> Self {
        match m {
            EvalMode::Hybrid => Self::Hybrid,
            EvalMode::Vector => Self::Vector,
            EvalMode::Text => Self::Text,
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// The CLI with one subcommand per runnable part of the registry.
fn command() -> clap::Command {
    let mut cmd = Cli::command();
    for part in registry::entries() {
        // A part with operator commands of its own (`bruno backup …`) runs
        // as that command without a subcommand.
        if cmd.find_subcommand(part.name).is_none() {
            cmd = cmd.subcommand(
                clap::Command::new(part.name)
                    .about(format!("Run only the {}: {}", part.name, part.about)),
            );
        }
    }
    cmd
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = command().get_matches();
    let file = matches.get_one::<PathBuf>("config").cloned();
    let config: Config = match bruno_runtime::config::load(file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bruno: {e}");
            return ExitCode::from(2);
        }
    };
    // Processes that run parts log at INFO; one-shot commands at WARN.
    let serving = match matches.subcommand() {
        Some(("dev", _)) => Some("bruno-dev".to_owned()),
        Some(("backup", sub)) if sub.subcommand().is_none() => Some("bruno-backup".to_owned()),
        Some((name, _))
            if registry::find(name).is_some() && Cli::command().find_subcommand(name).is_none() =>
        {
            Some(format!("bruno-{name}"))
        }
        _ => None,
    };
    let _telemetry = bruno_runtime::telemetry::init(
        &config.log.settings(serving.is_some()),
        &config.telemetry,
        serving.as_deref().unwrap_or("bruno-cli"),
    );
    let result = match matches.subcommand() {
        // A part without a command of its own (`bruno writer`); `bruno
        // backup` is a command that runs the part when given no subcommand.
        Some((name, _))
            if registry::find(name).is_some() && Cli::command().find_subcommand(name).is_none() =>
        {
            run_parts(config, &[name], bruno_runtime::shutdown::on_signals(), None).await
        }
        _ => match Cli::from_arg_matches(&matches) {
            Ok(cli) => run(cli.command, config).await,
            Err(e) => e.exit(),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bruno: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Dev { parts } => {
            let names: Vec<&str> = if parts.is_empty() {
                registry::runnable()
            } else {
                parts.iter().map(String::as_str).collect()
            };
            bruno_cli::run_dev(config, &names, bruno_runtime::shutdown::on_signals(), None).await
        }
        Command::Parts { markdown: true } => {
            print!("{}", registry::markdown_table());
            Ok(())
        }
        Command::Parts { markdown: false } => {
            for p in registry::entries() {
                let (role, stage) = (p.role_label(), p.stage_label());
                println!("{}  ({role}, stops {stage})\n    {}", p.name, p.about);
                for ty in (p.consumes)().iter().chain(p.awaits) {
                    println!("    takes {ty}");
                }
            }
            Ok(())
        }
        Command::Ingest {
            paths,
            url,
            api_key,
            source,
            concurrency,
            json,
            wait,
            wait_timeout,
        } => {
            let url = url
                .unwrap_or_else(|| format!("http://127.0.0.1:{}/", config.ingress.listen.port()));
            let candidates = bruno_cli::ingest::collect(&paths)?;
            anyhow::ensure!(
                !candidates.is_empty(),
                "no .txt or .md files under {paths:?}"
            );
            let bar = if json {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(candidates.len() as u64)
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} files {elapsed} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let watch = if wait {
                Some(bruno_cli::ingest::Watch::start(&config).await?)
            } else {
                None
            };
            let target = bruno_cli::ingest::Target {
                url,
                api_key,
                source,
                concurrency,
                reply: watch.as_ref().map(|w| w.address()),
            };
            let report = bruno_cli::ingest::run(candidates, &target, |f| {
                bar.inc(1);
                if f.status != "accepted" {
                    bar.println(format!(
                        "{}: {} ({})",
                        f.path,
                        f.status,
                        f.reason.as_deref().unwrap_or("")
                    ));
                }
            })
            .await;
            bar.finish_and_clear();
            let waited = match watch {
                Some(watch) => {
                    let sent: Vec<String> = report
                        .files
                        .iter()
                        .filter(|f| f.status == "accepted")
                        .filter_map(|f| f.doc_id.clone())
                        .collect();
                    let bar = if json {
                        indicatif::ProgressBar::hidden()
                    } else {
                        indicatif::ProgressBar::new(sent.len() as u64)
                    };
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:40} {pos}/{len} searchable {elapsed} {msg}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    let waited = watch
                        .wait(
                            &sent,
                            std::time::Duration::from_secs(wait_timeout),
                            |indexed, failed| {
                                bar.set_position((indexed + failed) as u64);
                                if failed > 0 {
                                    bar.set_message(format!("{failed} failed"));
                                }
                            },
                        )
                        .await;
                    bar.finish_and_clear();
                    Some(waited)
                }
                None => None,
            };
            if json {
                match &waited {
                    None => print_json(&report)?,
                    Some(w) => print_json(&serde_json::json!({ "files": report, "wait": w }))?,
                }
            } else {
                println!(
                    "{} accepted, {} skipped, {} failed",
                    report.accepted, report.skipped, report.failed
                );
                if let Some(w) = &waited {
                    println!(
                        "{} sent, {} searchable, {} failed, {} still pending",
                        w.sent,
                        w.indexed,
                        w.failed.len(),
                        w.pending.len()
                    );
                    for (doc, reason) in &w.failed {
                        println!("  failed {doc}: {reason}");
                    }
                }
            }
            anyhow::ensure!(report.failed == 0, "{} files failed", report.failed);
            if let Some(w) = waited {
                anyhow::ensure!(
                    w.failed.is_empty() && w.pending.is_empty(),
                    "{} documents failed and {} were not searchable in time (see bruno dlq list)",
                    w.failed.len(),
                    w.pending.len()
                );
            }
            Ok(())
        }
        Command::Eval {
            queries,
            mode,
            k,
            concurrency,
            timeout,
            json,
        } => {
            use bruno_cli::eval;
            anyhow::ensure!((1..=100).contains(&k), "--k must be within 1..=100");
            let text = std::fs::read_to_string(&queries)
                .with_context(|| format!("{}", queries.display()))?;
            let set = eval::parse(&text, &queries.display().to_string())?;
            let (broker, cancel) = connect_for_tool(&config).await?;
            let bar = if json {
                indicatif::ProgressBar::hidden()
            } else {
                indicatif::ProgressBar::new(set.len() as u64)
            };
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} queries {elapsed}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let settings = eval::Settings {
                mode: mode.into(),
                k,
                concurrency,
                timeout: std::time::Duration::from_secs(timeout),
            };
            let report = eval::run(&broker, &set, &settings, || bar.inc(1)).await;
            bar.finish_and_clear();
            cancel.cancel();
            let report = report?;
            if json {
                print_json(&report)?;
            } else {
                print!("{}", eval::table(&report));
            }
            anyhow::ensure!(
                report.failed == 0,
                "{} of {} searches got no answer (is the retriever running?)",
                report.failed,
                report.queries
            );
            Ok(())
        }
        Command::Search {
            query,
            k,
            source,
            doc_id,
            mode,
            timeout,
            json,
        } => {
            use bruno_events::EventData;
            use bruno_events::payload::{SearchCompleted, SearchFilters, SearchRequested};
            let request = SearchRequested {
                query,
                k,
                filters: SearchFilters { source, doc_id },
                mode: mode.into(),
            };
            request.check().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (broker, cancel) = connect_for_tool(&config).await?;
            let event = bruno_events::new_event("bruno/cli", &request);
            let reply = bruno_broker::reply::request(
                &broker,
                event,
                &[SearchCompleted::TYPE],
                std::time::Duration::from_secs(timeout),
            )
            .await;
            cancel.cancel();
            let reply =
                reply.context("is the retriever running (bruno dev or bruno retriever)?")?;
            let done: SearchCompleted =
                bruno_events::decode_data(&reply).map_err(|e| anyhow::anyhow!("{e}"))?;
            if json {
                return print_json(&done);
            }
            if done.hits.is_empty() {
                println!("no hits");
            }
            for (i, h) in done.hits.iter().enumerate() {
                let title = h.title.as_deref().unwrap_or(&h.doc_id);
                let snippet: String = h
                    .text
                    .chars()
                    .take(160)
                    .collect::<String>()
                    .replace('\n', " ");
                println!(
                    "{}. {title}  [{}]  score {:.4}\n   {snippet}",
                    i + 1,
                    h.source,
                    h.score
                );
            }
            Ok(())
        }
        Command::Topology { knative: true, .. } => {
            print!("{}", bruno_cli::knative_yaml(&config.broker)?);
            Ok(())
        }
        Command::Topology {
            manifests: true,
            cluster,
            ..
        } => {
            let topology = registry::topology(&config.broker);
            print!("{}", bruno_cli::manifests_yaml(&topology, &cluster)?);
            Ok(())
        }
        Command::Topology {
            manifests: false,
            replace,
            ..
        } => {
            let (broker, cancel) = connect_for_tool(&config).await?;
            let replaced = if replace {
                broker.replace_stale_queues().await
            } else {
                Ok(Vec::new())
            };
            cancel.cancel();
            for queue in replaced? {
                println!("replaced {queue}");
            }
            println!("topology declared");
            Ok(())
        }
        Command::Dlq { command } => dlq_command(command, &config).await,
        Command::Backup { command: None } => {
            run_parts(
                config,
                &["backup"],
                bruno_runtime::shutdown::on_signals(),
                None,
            )
            .await
        }
        Command::Backup {
            command: Some(command),
        } => bruno_cli::backup::command(command.into(), &config).await,
        Command::Restore {
            backup,
            latest: _,
            to,
            force,
            json,
        } => bruno_cli::backup::restore(&config, backup, to, force, json).await,
        Command::Keys {
            command: KeysCommand::Hash { key },
        } => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s.trim().to_owned()
                }
            };
            anyhow::ensure!(!key.is_empty(), "empty key");
            println!("{}", bruno_ingress::hash_key(&key));
            Ok(())
        }
        Command::Health { addr, path } => bruno_cli::probe(&addr, &path).await,
        Command::Events { command } => match command {
            EventsCommand::List => {
                for e in bruno_events::catalogue() {
                    println!("{:32} {}", e.ty, e.summary);
                }
                Ok(())
            }
            EventsCommand::Schema { r#type } => {
                let entry = bruno_events::entry(&r#type)
                    .with_context(|| format!("unknown event type {type:?}"))?;
                print_json(&(entry.schema)())
            }
            EventsCommand::Asyncapi => print_json(&registry::asyncapi()),
        },
    }
}

async fn dlq_command(command: DlqCommand, config: &Config) -> anyhow::Result<()> {
    let (broker, cancel) = connect_for_tool(config).await?;
    let result = async {
        match command {
            DlqCommand::List { part, limit, json } => {
                let letters = dlq::list(&broker, &part, limit).await?;
                if json {
                    return print_json(&letters);
                }
                if letters.is_empty() {
                    println!("no dead letters in {part}.dlq");
                }
                for d in letters {
                    println!("{}  {}  {}  attempts={}  {}", d.id, d.r#type, d.code, d.attempts, d.reason);
                }
                Ok(())
            }
            DlqCommand::Show { part, id, json } => {
                let d = dlq::show(&broker, &part, &id).await?.with_context(|| format!("no dead letter {id} in {part}.dlq"))?;
                if json {
                    return print_json(&d);
                }
                println!("id:        {}\ntype:      {}\nsource:    {}\ncode:      {}\nreason:    {}\nattempts:  {}", d.id, d.r#type, d.source, d.code, d.reason, d.attempts);
                println!("headers:");
                for (k, v) in &d.headers {
                    println!("  {k}: {v}");
                }
                println!("data ({}):\n{}", d.content_type.as_deref().unwrap_or("-"), d.data);
                Ok(())
            }
            DlqCommand::Replay { part, id, ty, code, all, json } => {
                anyhow::ensure!(all || id.is_some() || ty.is_some() || code.is_some(), "give --id, --type, --code or --all");
                let filter = dlq::Filter { id, r#type: ty, code };
                let report = dlq::replay(&broker, &part, &filter).await?;
                if json {
                    return print_json(&report);
                }
                println!("replayed {} dead letters to {part}; {} kept", report.replayed, report.kept);
                Ok(())
            }
            DlqCommand::Purge { part, yes, json } => {
                anyhow::ensure!(yes, "purging deletes dead letters for good; add --yes");
                let n = dlq::purge(&broker, &part).await?;
                if json {
                    return print_json(&serde_json::json!({"purged": n}));
                }
                println!("purged {n} dead letters from {part}.dlq");
                Ok(())
            }
        }
    }
    .await;
    cancel.cancel();
    result
}

impl From<BackupCommand> for bruno_cli::backup::Op {
    fn from(c: BackupCommand) -> Self {
        use bruno_cli::backup::Op;
        match c {
            BackupCommand::Run {
                tables,
                timeout,
                json,
            } => Op::Run {
                tables,
                timeout,
                json,
            },
            BackupCommand::List { json } => Op::List { json },
            BackupCommand::Verify { id, json } => Op::Verify { id, json },
        }
    }
}
