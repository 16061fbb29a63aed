//! `bruno backup run|list|verify` and `bruno restore`.

use std::time::Duration;

use anyhow::Context as _;
use bruno_backup::{Engine, Progress};
use bruno_events::EventData;
use bruno_events::payload::{BackupCompleted, BackupFailed, BackupRequested};

use crate::{Config, connect_for_tool};

/// A backup command.
#[derive(Debug)]
pub enum Op {
    /// Ask the backup part for a backup and wait.
    Run {
        /// Tables (empty: all).
        tables: Vec<String>,
        /// Seconds to wait.
        timeout: u64,
        /// JSON out.
        json: bool,
    },
    /// List backups.
    List {
        /// JSON out.
        json: bool,
    },
    /// Verify one backup (default: the newest complete one).
    Verify {
        /// Backup id.
        id: Option<String>,
        /// JSON out.
        json: bool,
    },
}

/// A byte progress bar (hidden for `--json` or when stderr is no terminal).
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new(json: bool) -> Self {
        let bar = if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(0)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:12} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self(bar)
    }
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn stage(&self, what: &str, total: u64) {
        self.0.set_message(what.to_owned());
        self.0.set_position(0);
        self.0.set_length(total);
    }
}

async fn engine(config: &Config) -> anyhow::Result<Engine> {
    let store = bruno_store::Store::open(config.store.clone())
        .await
        .with_context(|| format!("opening store.uri {}", config.store.uri))?;
    // Operator commands never invent a key: a missing one is an error.
    let mut backup = config.backup.clone();
    backup.create_key = false;
    Ok(backup.engine(store)?)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Run a backup command.
pub async fn command(op: Op, config: &Config) -> anyhow::Result<()> {
    match op {
        Op::Run {
            tables,
            timeout,
            json,
        } => {
            let (broker, cancel) = connect_for_tool(config).await?;
            let event = bruno_events::new_event(
                "bruno/cli",
                &BackupRequested {
                    tables,
                    target: None,
                },
            );
            let spinner = Bar::new(json);
            spinner.0.set_message("backing up");
            spinner.0.enable_steady_tick(Duration::from_millis(200));
            let reply = bruno_broker::reply::request(
                &broker,
                event,
                &[BackupCompleted::TYPE, BackupFailed::TYPE],
                Duration::from_secs(timeout),
            )
            .await;
            cancel.cancel();
            spinner.0.finish_and_clear();
            let reply = reply.context("is the backup part running (bruno dev or bruno backup)?")?;
            if reply_is::<BackupFailed>(&reply) {
                let failed: BackupFailed = bruno_events::decode_data(&reply)?;
                anyhow::bail!("backup failed ({}): {}", failed.reason, failed.message);
            }
            let done: BackupCompleted = bruno_events::decode_data(&reply)?;
            if json {
                return print_json(&done);
            }
            println!(
                "backup {} {}in {}",
                done.backup_id,
                if done.duplicate {
                    "(already taken after the request) "
                } else {
                    ""
                },
                done.target
            );
            for t in &done.tables {
                println!(
                    "  {:14} version {:6} {:9} rows {:>12} bytes",
                    t.name, t.version, t.rows, t.bytes
                );
            }
            Ok(())
        }
        Op::List { json } => {
            let listed = engine(config).await?.list().await?;
            if json {
                return print_json(&listed);
            }
            if listed.is_empty() {
                println!("no backups");
            }
            for b in listed {
                let state = match (b.complete, b.verified) {
                    (true, true) => "verified",
                    (true, false) => "complete, not verified",
                    _ => "INCOMPLETE",
                };
                let rows: u64 = b.tables.iter().map(|t| t.2).sum();
                println!(
                    "{}  {:24} {:>9} rows {:>12} bytes  {}",
                    b.id,
                    state,
                    rows,
                    b.stored_bytes,
                    b.problem.unwrap_or_default()
                );
            }
            Ok(())
        }
        Op::Verify { id, json } => {
            let engine = engine(config).await?;
            let id = match id {
                Some(id) => id,
                None => engine
                    .list()
                    .await?
                    .into_iter()
                    .rfind(|b| b.complete)
                    .map(|b| b.id)
                    .context("no complete backup to verify")?,
            };
            let bar = Bar::new(json);
            let manifest = engine.verify(&id, &bar).await?;
            bar.0.finish_and_clear();
            if json {
                return print_json(&serde_json::json!({
                    "backup_id": id, "verified": true, "rows": manifest.rows(), "bytes": manifest.bytes()
                }));
            }
            println!(
                "backup {id} verified: {} rows, {} bytes, every checksum matches",
                manifest.rows(),
                manifest.bytes()
            );
            Ok(())
        }
    }
}

fn reply_is<T: EventData>(event: &bruno_events::Event) -> bool {
    use bruno_events::AttributesReader;
    event.ty() == T::TYPE
}

/// `bruno restore`.
pub async fn restore(
    config: &Config,
    backup: Option<String>,
    to: Option<String>,
    force: bool,
    json: bool,
) -> anyhow::Result<()> {
    let engine = engine(config).await?;
    let id = match backup {
        Some(id) => id,
        None => engine
            .latest_verified()
            .await?
            .map(|b| b.id)
            .context("no verified backup to restore")?,
    };
    let to = to.unwrap_or_else(|| config.store.uri.clone());
    let bar = Bar::new(json);
    let restored = engine.restore(&id, &to, force, &bar).await?;
    bar.0.finish_and_clear();
    if json {
        return print_json(&restored);
    }
    println!(
        "restored backup {} into {} in {:.1}s",
        restored.backup_id, restored.to, restored.seconds
    );
    for (name, version, rows) in &restored.tables {
        println!("  {name:14} version {version:6} {rows:9} rows");
    }
    if let Some(moved) = restored.replaced_moved_to {
        println!("the tables that were there are in {moved}");
    }
    Ok(())
}
