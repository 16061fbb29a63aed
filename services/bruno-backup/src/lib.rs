//! The backup part: consistent, encrypted, verified LanceDB backups.
//!
//! `backup.requested` (from a Knative PingSource, a cron, `bruno backup
//! run`, or this part's own schedule) takes a backup of every table (or the
//! ones asked for) into the configured target — a filesystem path or
//! S3-compatible storage — and answers `backup.completed` once a restore of
//! it was verified, or `backup.failed` with the reason. A request made
//! before the start of a verified backup is answered by that backup
//! (`duplicate: true`), so requests that pile up run one backup. See
//! [`engine`] for the method and ADR 11 for why.
#![forbid(unsafe_code)]

pub mod crypt;
pub mod engine;
pub mod manifest;
pub mod retention;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bruno_core::{Classify, ErrorCode};
use bruno_events::payload::{BackupCompleted, BackupFailed, BackupRequested, TableBackup};
use bruno_events::{AttributesReader, Event, reply_event};
use bruno_runtime::{Context, Handler, HandlerError, Incoming};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tracing::{error, info};

pub use crypt::Key;
pub use engine::{Engine, Listed, Progress, Quiet, Restored};
pub use manifest::Manifest;
pub use retention::Policy;
pub use target::{S3Config, Target};

/// Why a backup, verify or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The key cannot be read or is malformed.
    #[error("backup key: {0}")]
    Key(String),
    /// The backup was encrypted with another key.
    #[error("the backup was written with key {backup}; the configured key is {configured}")]
    WrongKey {
        /// Fingerprint in the manifest.
        backup: String,
        /// Fingerprint of the configured key.
        configured: String,
    },
    /// An object failed authentication: changed, truncated, or another key.
    #[error("an object failed authentication: it was changed or truncated")]
    Authentication,
    /// The backup is damaged or incomplete.
    #[error("corrupt backup: {0}")]
    Corrupt(String),
    /// A cipher failure that is a bug.
    #[error("encryption failed")]
    Crypto,
    /// A table asked for does not exist.
    #[error("no table {0}")]
    UnknownTable(String),
    /// Pinning or cloning a table version failed.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The restore destination holds data and `--force` was not given.
    #[error(
        "{0} is not empty; restore into a new location or pass --force (its tables are moved aside)"
    )]
    NotEmpty(String),
    /// The target cannot be used.
    #[error("backup target: {0}")]
    Target(String),
    /// The target's object store failed.
    #[error("backup target: {0}")]
    Store(#[from] object_store::Error),
    /// LanceDB failed.
    #[error(transparent)]
    Lance(#[from] bruno_store::StoreError),
    /// Local files.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// JSON.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Classify for BackupError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownTable(_) => ErrorCode::InvalidPayload,
            Self::Store(_) | Self::Lance(_) | Self::Io(_) => ErrorCode::Dependency,
            _ => ErrorCode::Internal,
        }
    }
}

/// `[backup]` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Where backups go: a path or `s3://bucket/prefix` (default: `backups`
    /// beside the LanceDB directory).
    pub target: Option<String>,
    /// The key file: 64 hex digits (default: `backup.key` beside the
    /// LanceDB directory). In a cluster, a mounted secret.
    pub key_file: Option<PathBuf>,
    /// Create the key file with a new key when it is missing (a laptop);
    /// off in a cluster, where a missing secret must be an error.
    pub create_key: bool,
    /// Local scratch space for snapshots and verification (default:
    /// `backup-work` beside the LanceDB directory).
    pub work_dir: Option<PathBuf>,
    /// Minutes between the part's own backups (0: only on request).
    pub interval_minutes: u64,
    /// Upload at most this many MiB/s (0: no limit), so a backup does not
    /// starve the store's disk or the network.
    pub max_mib_per_sec: u64,
    /// How many backups to keep.
    pub retention: Policy,
    /// S3-compatible target settings.
    pub s3: S3Config,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            target: None,
            key_file: None,
            create_key: true,
            work_dir: None,
            interval_minutes: 60,
            max_mib_per_sec: 0,
            retention: Policy::default(),
            s3: S3Config::default(),
        }
    }
}

/// The config with every default filled in for a store at `store_uri`.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Target URI.
    pub target: String,
    /// Key file.
    pub key_file: PathBuf,
    /// Scratch directory.
    pub work_dir: PathBuf,
}

impl BackupConfig {
    /// Fill in the defaults beside a local store; an `s3://` store needs
    /// them set.
    pub fn resolve(&self, store_uri: &str) -> Result<Resolved, BackupError> {
        let beside = |name: &str| -> Option<PathBuf> {
            if store_uri.contains("://") {
                return None;
            }
            let store = Path::new(store_uri);
            Some(match store.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.join(name),
                _ => PathBuf::from(name),
            })
        };
        let missing = |key: &str| {
            BackupError::Target(format!("backup.{key} must be set for store {store_uri}"))
        };
        Ok(Resolved {
            target: match &self.target {
                Some(t) => t.clone(),
                None => beside("backups")
                    .ok_or_else(|| missing("target"))?
                    .display()
                    .to_string(),
            },
            key_file: match &self.key_file {
                Some(k) => k.clone(),
                None => beside("backup.key").ok_or_else(|| missing("key_file"))?,
            },
            work_dir: match &self.work_dir {
                Some(w) => w.clone(),
                None => beside("backup-work").ok_or_else(|| missing("work_dir"))?,
            },
        })
    }

    /// An engine over `store` with this config.
    pub fn engine(&self, store: bruno_store::Store) -> Result<Engine, BackupError> {
        let r = self.resolve(store.uri())?;
        let key = Key::load(&r.key_file, self.create_key)?;
        let target = Target::open(&r.target, &self.s3)?;
        Ok(Engine::new(store, target, key, r.work_dir, self.retention)
            .with_rate_limit(self.max_mib_per_sec * 1024 * 1024))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Backup metrics (`bruno_backup_*`).
#[derive(Clone, Debug)]
pub struct BackupMetrics {
    last_verified: Gauge<f64, std::sync::atomic::AtomicU64>,
    duration: Histogram,
    bytes: Gauge,
    rows: Gauge,
    runs: Family<ResultLabels, Counter>,
}

impl Default for BackupMetrics {
    fn default() -> Self {
        Self {
            last_verified: Gauge::default(),
            duration: Histogram::new(exponential_buckets(0.5, 2.0, 14)),
            bytes: Gauge::default(),
            rows: Gauge::default(),
            runs: Family::default(),
        }
    }
}

impl BackupMetrics {
    /// Register in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "bruno_backup_last_verified_timestamp_seconds",
            "Unix time the newest verified backup's tables were pinned (0: none)",
            self.last_verified.clone(),
        );
        registry.register(
            "bruno_backup_duration_seconds",
            "Time of a backup, verification included",
            self.duration.clone(),
        );
        registry.register(
            "bruno_backup_bytes",
            "Plaintext bytes of the last backup",
            self.bytes.clone(),
        );
        registry.register(
            "bruno_backup_rows",
            "Rows in the last backup",
            self.rows.clone(),
        );
        registry.register(
            "bruno_backup_runs",
            "Backups by result (verified, duplicate, failed)",
            self.runs.clone(),
        );
    }

    fn count(&self, result: &'static str) {
        self.runs.get_or_create(&ResultLabels { result }).inc();
    }

    /// The newest verified backup's time, as exported.
    pub fn last_verified(&self) -> f64 {
        self.last_verified.get()
    }
}

/// The backup part's handler.
pub struct BackupService {
    engine: Arc<Engine>,
    /// One backup at a time in this process (requests and the schedule).
    running: tokio::sync::Mutex<()>,
    config: BackupConfig,
    metrics: BackupMetrics,
}

impl BackupService {
    /// A backup part over `engine`.
    pub fn new(engine: Engine, config: BackupConfig, metrics: BackupMetrics) -> Self {
        Self {
            engine: Arc::new(engine),
            running: tokio::sync::Mutex::new(()),
            config,
            metrics,
        }
    }

    /// Take a backup for a request made at `asked_at`, unless a verified
    /// backup pinned since then answers it.
    pub async fn backup(
        &self,
        tables: &[String],
        asked_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(Manifest, bool), BackupError> {
        let _one = self.running.lock().await;
        if let Some(latest) = self.engine.latest_verified().await?
            && latest.pinned_at.is_some_and(|t| t >= asked_at)
            && (tables.is_empty()
                || tables
                    .iter()
                    .all(|t| latest.tables.iter().any(|x| &x.0 == t)))
        {
            self.metrics.count("duplicate");
            return Ok((self.engine.manifest(&latest.id).await?, true));
        }
        let started = Instant::now();
        let result = self.engine.run(tables, &Quiet).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(m) => {
                self.metrics.count("verified");
                self.metrics
                    .last_verified
                    .set(m.pinned_at.timestamp_millis() as f64 / 1000.0);
                self.metrics
                    .bytes
                    .set(i64::try_from(m.bytes()).unwrap_or(i64::MAX));
                self.metrics
                    .rows
                    .set(i64::try_from(m.rows()).unwrap_or(i64::MAX));
            }
            Err(e) => {
                self.metrics.count("failed");
                error!(error = %e, "backup failed");
            }
        }
        result.map(|m| (m, false))
    }

    fn completed(&self, m: &Manifest, duplicate: bool) -> Result<BackupCompleted, BackupError> {
        Ok(BackupCompleted {
            backup_id: m.backup_id.clone(),
            target: self.engine.target().uri().to_owned(),
            tables: m
                .tables
                .iter()
                .map(|t| TableBackup {
                    name: t.name.clone(),
                    version: t.version,
                    rows: t.rows,
                    bytes: t.stored_bytes(),
                })
                .collect(),
            manifest_sha256: m.sha256()?,
            duplicate,
        })
    }
}

impl Handler for BackupService {
    type Input = BackupRequested;

    async fn handle(
        &self,
        input: Incoming<BackupRequested>,
        ctx: &Context,
    ) -> Result<Vec<Event>, HandlerError> {
        let request = input.data;
        if let Some(t) = &request.target
            && t != self.engine.target().uri()
        {
            return Err(HandlerError::invalid_payload(format!(
                "data.target: only the configured backup.target is written ({t} was asked)"
            )));
        }
        let asked_at = input.event.time().copied().unwrap_or_else(chrono::Utc::now);
        let reply = match self.backup(&request.tables, asked_at).await {
            Ok((m, duplicate)) => {
                info!(backup = %m.backup_id, duplicate, "backup.completed");
                reply_event(
                    &input.event,
                    &ctx.source,
                    0,
                    &self.completed(&m, duplicate)?,
                )
            }
            // A failed backup is answered, not retried: the next request
            // or the schedule tries again, and the alert on the backup age
            // fires if none succeeds.
            Err(e) => reply_event(
                &input.event,
                &ctx.source,
                0,
                &BackupFailed {
                    reason: e.code().as_str().to_owned(),
                    message: e.to_string(),
                },
            ),
        };
        Ok(vec![reply])
    }

    async fn start(&self, _ctx: &Context) {
        match self.engine.latest_verified().await {
            Ok(Some(latest)) => {
                if let Some(t) = latest.pinned_at {
                    self.metrics
                        .last_verified
                        .set(t.timestamp_millis() as f64 / 1000.0);
                }
            }
            Ok(None) => {}
            Err(e) => error!(error = %e, "cannot list the backup target"),
        }
    }

    fn tick_every(&self) -> Option<Duration> {
        (self.config.interval_minutes > 0)
            .then(|| Duration::from_secs(self.config.interval_minutes * 60))
    }

    async fn tick(&self, _ctx: &Context) {
        if let Err(e) = self.backup(&[], chrono::Utc::now()).await {
            error!(error = %e, "scheduled backup failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_sit_beside_a_local_store_and_an_s3_store_needs_them_set() {
        let r = BackupConfig::default().resolve("./data/lancedb").unwrap();
        assert_eq!(r.target, "./data/backups");
        assert_eq!(r.key_file, PathBuf::from("./data/backup.key"));
        assert!(BackupConfig::default().resolve("s3://b/lancedb").is_err());
    }
}
