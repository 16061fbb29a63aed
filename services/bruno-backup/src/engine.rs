//! Taking, listing, verifying and restoring backups.
//!
//! A backup of a table pins its current version with a Lance tag (so
//! compaction and version cleanup cannot remove the version's files while
//! they are copied), deep-clones exactly that version into a scratch
//! directory, releases the tag, and streams every file through SHA-256 and
//! XChaCha20-Poly1305 into the target as `<id>/<table>/<path>`. The manifest
//! goes last; then a restore of the backup into scratch is checked (every
//! checksum, the version, the row counts) and only then is `verified.json`
//! written. A backup without a manifest is incomplete: the next run deletes
//! it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::BackupError;
use crate::crypt::{Key, Opener, SEGMENT, Sealer};
use crate::manifest::{MANIFEST, Manifest, Object, TableEntry, VERIFIED, Verified};
use crate::retention::{self, Candidate, Policy};
use crate::target::Target;

/// Bytes read, hashed and encrypted per step.
const BLOCK: usize = 16 * SEGMENT;
/// Files uploaded at once.
const UPLOADS: usize = 2;

/// The per-file CPU state of an upload.
struct Crunch {
    sealer: Sealer,
    plain: Sha256,
    stored: Sha256,
}

/// Read until `buf` is full or the file ends.
async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let got = file.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

/// Tags this part creates start with this.
pub const TAG_PREFIX: &str = "bruno-backup-";

/// Progress of a long operation, for a progress bar.
pub trait Progress: Send + Sync {
    /// `bytes` more were processed.
    fn advance(&self, bytes: u64);
    /// Now working on `what`, of `total` bytes.
    fn stage(&self, what: &str, total: u64);
}

/// No progress shown.
pub struct Quiet;

impl Progress for Quiet {
    fn advance(&self, _: u64) {}
    fn stage(&self, _: &str, _: u64) {}
}

/// A backup as `list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    /// Backup id.
    pub id: String,
    /// Its manifest exists and authenticates.
    pub complete: bool,
    /// A restore of it was verified.
    pub verified: bool,
    /// When its tables were pinned.
    pub pinned_at: Option<DateTime<Utc>>,
    /// Tables with versions and rows.
    pub tables: Vec<(String, u64, u64)>,
    /// Stored bytes.
    pub stored_bytes: u64,
    /// Why it is not usable, if it is not.
    pub problem: Option<String>,
}

/// What a restore did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Restored {
    /// The backup restored.
    pub backup_id: String,
    /// Where to.
    pub to: String,
    /// Tables with version and rows.
    pub tables: Vec<(String, u64, u64)>,
    /// Plaintext bytes written.
    pub bytes: u64,
    /// Where the tables it replaced were moved (with `--force`).
    pub replaced_moved_to: Option<String>,
    /// Seconds it took, download and checks included.
    pub seconds: f64,
}

/// The backup engine over one store, target and key.
pub struct Engine {
    store: bruno_store::Store,
    target: Target,
    key: Key,
    work: PathBuf,
    policy: Policy,
    /// Upload bytes per second (0: unlimited).
    rate: u64,
}

impl Engine {
    /// An engine; `work` is a local scratch directory (cleared of leftovers).
    pub fn new(
        store: bruno_store::Store,
        target: Target,
        key: Key,
        work: PathBuf,
        policy: Policy,
    ) -> Self {
        Self {
            store,
            target,
            key,
            work,
            policy,
            rate: 0,
        }
    }

    /// Upload at most `bytes_per_sec` (0: no limit).
    pub fn with_rate_limit(mut self, bytes_per_sec: u64) -> Self {
        self.rate = bytes_per_sec;
        self
    }

    /// The target.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A new backup id: its time, sortable, and a random tail.
    fn new_id(now: DateTime<Utc>) -> String {
        let tail = uuid::Uuid::new_v4().simple().to_string();
        format!("{}-{}", now.format("%Y%m%dT%H%M%S%3fZ"), &tail[..8])
    }

    /// Remove what a killed run left: backups without a manifest, tags this
    /// part created, the scratch directory. Runs before every backup
    /// (backups of one target never run at once: one active consumer).
    pub async fn clean_leftovers(&self) -> Result<(), BackupError> {
        for id in self.target.ids().await? {
            if self
                .target
                .get(&format!("{id}/{MANIFEST}"))
                .await?
                .is_none()
            {
                let n = self.target.delete_all(&id).await?;
                warn!(backup = %id, objects = n, "deleted an incomplete backup");
            }
        }
        for name in self.store.table_names().await? {
            let Some(table) = self.store.raw_table(&name).await? else {
                continue;
            };
            let mut tags = table.tags().await.map_err(bruno_store::StoreError::from)?;
            let stale: Vec<String> = tags
                .list()
                .await
                .map_err(bruno_store::StoreError::from)?
                .into_keys()
                .filter(|t| t.starts_with(TAG_PREFIX))
                .collect();
            for tag in stale {
                tags.delete(&tag)
                    .await
                    .map_err(bruno_store::StoreError::from)?;
                warn!(table = %name, %tag, "released a tag a killed backup left");
            }
        }
        if self.work.exists() {
            tokio::fs::remove_dir_all(&self.work).await?;
        }
        Ok(())
    }

    /// Take a backup of `tables` (all tables when empty), verify it, apply
    /// retention. Returns its manifest.
    pub async fn run(
        &self,
        tables: &[String],
        progress: &dyn Progress,
    ) -> Result<Manifest, BackupError> {
        self.clean_leftovers().await?;
        let pinned_at = Utc::now();
        let id = Self::new_id(pinned_at);
        let present = self.store.table_names().await?;
        let names: Vec<String> = if tables.is_empty() {
            present.clone()
        } else {
            for t in tables {
                if !present.contains(t) {
                    return Err(BackupError::UnknownTable(t.clone()));
                }
            }
            tables.to_vec()
        };
        let scratch = self.work.join(&id);
        tokio::fs::create_dir_all(&scratch).await?;
        let mut entries = Vec::new();
        for name in &names {
            entries.push(self.table(&id, name, &scratch, progress).await?);
        }
        let manifest = Manifest {
            format: 1,
            backup_id: id.clone(),
            pinned_at,
            finished_at: Utc::now(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            key_fingerprint: self.key.fingerprint(),
            tables: entries,
            mac: String::new(),
        };
        let sealed = manifest.seal(&self.key)?;
        let manifest = Manifest::open(&sealed, &self.key)?;
        // Last: only now does the backup list as complete.
        self.target.put(&format!("{id}/{MANIFEST}"), sealed).await?;
        tokio::fs::remove_dir_all(&scratch).await?;
        info!(backup = %id, rows = manifest.rows(), bytes = manifest.bytes(), "backup written");
        self.verify(&id, progress).await?;
        self.apply_retention().await?;
        Ok(manifest)
    }

    /// Pin, clone and upload one table.
    async fn table(
        &self,
        id: &str,
        name: &str,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<TableEntry, BackupError> {
        let table = self
            .store
            .raw_table(name)
            .await?
            .ok_or_else(|| BackupError::UnknownTable(name.to_owned()))?;
        let version = table
            .version()
            .await
            .map_err(bruno_store::StoreError::from)?;
        let tag = format!("{TAG_PREFIX}{id}");
        table
            .tags()
            .await
            .map_err(bruno_store::StoreError::from)?
            .create(&tag, version)
            .await
            .map_err(bruno_store::StoreError::from)?;
        let dir = scratch.join(format!("{name}.lance"));
        let cloned = async {
            let wrapper = table.dataset().ok_or_else(|| {
                BackupError::Target(format!("table {name} is not a local Lance table"))
            })?;
            let mut dataset =
                (*wrapper.get().await.map_err(bruno_store::StoreError::from)?).clone();
            dataset
                .deep_clone(&dir.display().to_string(), tag.as_str(), None)
                .await
                .map_err(|e| BackupError::Snapshot(format!("{name} v{version}: {e}")))?;
            Ok::<_, BackupError>(())
        }
        .await;
        // The files are copied: the version no longer needs pinning.
        let released = match table.tags().await {
            Ok(mut tags) => tags.delete(&tag).await,
            Err(e) => Err(e),
        };
        cloned?;
        released.map_err(bruno_store::StoreError::from)?;
        let rows = count_rows(scratch, name).await?;
        let files = files_under(&dir)?;
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        progress.stage(name, total);
        // Two files at a time: one per core.
        let objects: Vec<Object> = futures_util::stream::iter(files)
            .map(|(rel, _)| {
                let dir = &dir;
                async move { self.upload(id, name, dir, &rel, progress).await }
            })
            .buffered(UPLOADS)
            .try_collect()
            .await?;
        Ok(TableEntry {
            name: name.to_owned(),
            version,
            rows,
            objects,
        })
    }

    /// Stream one file through the checksums and the cipher into the target.
    async fn upload(
        &self,
        id: &str,
        table: &str,
        dir: &Path,
        rel: &str,
        progress: &dyn Progress,
    ) -> Result<Object, BackupError> {
        let key = format!("{id}/{table}/{rel}");
        let mut file = tokio::fs::File::open(dir.join(rel)).await?;
        let mut writer = self.target.writer(&key);
        let (sealer, header) = Sealer::new(&self.key, &key);
        let mut cpu = Crunch {
            sealer,
            plain: Sha256::new(),
            stored: Sha256::new(),
        };
        let (mut size, mut stored) = (0u64, header.len() as u64);
        cpu.stored.update(&header);
        writer.write_all(&header).await?;
        let started = Instant::now();
        loop {
            let mut buf = vec![0u8; BLOCK];
            let n = read_full(&mut file, &mut buf).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            size += n as u64;
            // Hashing and encryption off the async threads, so two files
            // (see `table`) use both cores.
            let (back, sealed) = tokio::task::spawn_blocking(move || {
                let mut cpu = cpu;
                cpu.plain.update(&buf);
                let sealed = cpu.sealer.update(&buf)?;
                cpu.stored.update(&sealed);
                Ok::<_, BackupError>((cpu, sealed))
            })
            .await
            .map_err(|e| BackupError::Snapshot(format!("hashing task: {e}")))??;
            cpu = back;
            stored += sealed.len() as u64;
            writer.write_all(&sealed).await?;
            progress.advance(n as u64);
            if self.rate > 0 {
                let due = std::time::Duration::from_secs_f64(size as f64 / self.rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        let last = cpu.sealer.finish()?;
        cpu.stored.update(&last);
        stored += last.len() as u64;
        writer.write_all(&last).await?;
        writer.shutdown().await?;
        Ok(Object {
            path: rel.to_owned(),
            size,
            sha256: hex::encode(cpu.plain.finalize()),
            stored_size: stored,
            stored_sha256: hex::encode(cpu.stored.finalize()),
        })
    }

    /// The manifest of `id`, authenticated with this key.
    pub async fn manifest(&self, id: &str) -> Result<Manifest, BackupError> {
        let bytes = self
            .target
            .get(&format!("{id}/{MANIFEST}"))
            .await?
            .ok_or_else(|| {
                BackupError::Corrupt(format!(
                    "backup {id} has no manifest: it is incomplete or does not exist"
                ))
            })?;
        Manifest::open(&bytes, &self.key)
    }

    /// Download, authenticate, decrypt and checksum every object of `id`
    /// into `into` (a local directory holding one `<table>.lance` per
    /// table), then open each table there and check its version and rows.
    async fn fetch(
        &self,
        manifest: &Manifest,
        into: &Path,
        progress: &dyn Progress,
    ) -> Result<(), BackupError> {
        let id = &manifest.backup_id;
        for t in &manifest.tables {
            progress.stage(&t.name, t.bytes());
            let dir = into.join(format!("{}.lance", t.name));
            for o in &t.objects {
                let key = format!("{id}/{}/{}", t.name, o.path);
                let rel = safe_relative(&o.path)?;
                let path = dir.join(rel);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                let mut out = tokio::fs::File::create(&path).await?;
                let mut stream = self.target.stream(&key).await?;
                let mut opener = Opener::new(&self.key, &key);
                let (mut plain_sha, mut stored_sha) = (Sha256::new(), Sha256::new());
                let (mut size, mut stored) = (0u64, 0u64);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    stored_sha.update(&chunk);
                    stored += chunk.len() as u64;
                    let plain = opener.update(&chunk)?;
                    plain_sha.update(&plain);
                    size += plain.len() as u64;
                    out.write_all(&plain).await?;
                    progress.advance(plain.len() as u64);
                }
                let plain = opener.finish()?;
                plain_sha.update(&plain);
                size += plain.len() as u64;
                out.write_all(&plain).await?;
                out.sync_all().await?;
                let stored_sha = hex::encode(stored_sha.finalize());
                let plain_sha = hex::encode(plain_sha.finalize());
                if stored != o.stored_size || stored_sha != o.stored_sha256 {
                    return Err(BackupError::Corrupt(format!(
                        "{key}: stored bytes differ from the manifest"
                    )));
                }
                if size != o.size || plain_sha != o.sha256 {
                    return Err(BackupError::Corrupt(format!(
                        "{key}: content differs from the manifest"
                    )));
                }
            }
            let rows = count_rows(into, &t.name).await?;
            let version = table_version(into, &t.name).await?;
            if rows != t.rows || version != t.version {
                return Err(BackupError::Corrupt(format!(
                    "{}: restored version {version} with {rows} rows, the manifest says version {} with {} rows",
                    t.name, t.version, t.rows
                )));
            }
        }
        Ok(())
    }

    /// Restore `id` into scratch and check it; on success record it as
    /// verified (once), and return its manifest.
    pub async fn verify(&self, id: &str, progress: &dyn Progress) -> Result<Manifest, BackupError> {
        let manifest = self.manifest(id).await?;
        let scratch = self.work.join(format!("verify-{id}"));
        if scratch.exists() {
            tokio::fs::remove_dir_all(&scratch).await?;
        }
        tokio::fs::create_dir_all(&scratch).await?;
        let checked = self.fetch(&manifest, &scratch, progress).await;
        tokio::fs::remove_dir_all(&scratch).await?;
        checked?;
        let verified_key = format!("{id}/{VERIFIED}");
        if self.target.get(&verified_key).await?.is_none() {
            let record = Verified {
                verified_at: Utc::now(),
                manifest_sha256: manifest.sha256()?,
            };
            self.target
                .put(&verified_key, serde_json::to_vec_pretty(&record)?)
                .await?;
        }
        info!(backup = %id, "backup verified by a restore into scratch");
        Ok(manifest)
    }

    /// Every backup in the target, oldest first.
    pub async fn list(&self) -> Result<Vec<Listed>, BackupError> {
        let mut out = Vec::new();
        for id in self.target.ids().await? {
            let verified = self
                .target
                .get(&format!("{id}/{VERIFIED}"))
                .await?
                .is_some();
            let listed = match self.manifest(&id).await {
                Ok(m) => Listed {
                    id,
                    complete: true,
                    verified,
                    pinned_at: Some(m.pinned_at),
                    tables: m
                        .tables
                        .iter()
                        .map(|t| (t.name.clone(), t.version, t.rows))
                        .collect(),
                    stored_bytes: m.tables.iter().map(TableEntry::stored_bytes).sum(),
                    problem: None,
                },
                Err(e) => Listed {
                    id,
                    complete: false,
                    verified: false,
                    pinned_at: None,
                    tables: Vec::new(),
                    stored_bytes: 0,
                    problem: Some(e.to_string()),
                },
            };
            out.push(listed);
        }
        // Oldest first; incomplete ones (no time) by id.
        out.sort_by(|a, b| a.pinned_at.cmp(&b.pinned_at).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// The newest verified backup.
    pub async fn latest_verified(&self) -> Result<Option<Listed>, BackupError> {
        Ok(self.list().await?.into_iter().rfind(|b| b.verified))
    }

    /// Delete what the retention policy says; returns the ids deleted.
    pub async fn apply_retention(&self) -> Result<Vec<String>, BackupError> {
        let candidates: Vec<Candidate> = self
            .list()
            .await?
            .into_iter()
            .filter_map(|b| {
                Some(Candidate {
                    at: b.pinned_at?,
                    id: b.id,
                    verified: b.verified,
                })
            })
            .collect();
        let doomed = retention::plan(&candidates, self.policy);
        for id in &doomed {
            // The manifest goes first, so a crash here leaves an incomplete
            // backup that the next run removes, never a complete-looking one.
            self.target.delete(&format!("{id}/{MANIFEST}")).await?;
            self.target.delete_all(id).await?;
            info!(backup = %id, "deleted by retention");
        }
        Ok(doomed)
    }

    /// Restore backup `id` into the local storage directory `to`. Every
    /// object is decrypted and checked and every table opened in staging
    /// before anything at `to` is touched; a non-empty `to` is refused
    /// unless `force`, which moves its tables aside first.
    pub async fn restore(
        &self,
        id: &str,
        to: &str,
        force: bool,
        progress: &dyn Progress,
    ) -> Result<Restored, BackupError> {
        let started = Instant::now();
        if to.contains("://") && !to.starts_with("file://") {
            return Err(BackupError::Target(format!(
                "restore writes a local storage directory; {to} is not one"
            )));
        }
        let to_dir = PathBuf::from(to.strip_prefix("file://").unwrap_or(to));
        let manifest = self.manifest(id).await?;
        let staging = self.work.join(format!("restore-{id}"));
        if staging.exists() {
            tokio::fs::remove_dir_all(&staging).await?;
        }
        tokio::fs::create_dir_all(&staging).await?;
        if let Err(e) = self.fetch(&manifest, &staging, progress).await {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            return Err(e);
        }
        let occupied = to_dir.exists() && std::fs::read_dir(&to_dir)?.next().is_some();
        let mut moved = None;
        if occupied {
            if !force {
                let _ = tokio::fs::remove_dir_all(&staging).await;
                return Err(BackupError::NotEmpty(to_dir.display().to_string()));
            }
            let aside = to_dir.with_file_name(format!(
                "{}.replaced-{}",
                to_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("store"),
                Utc::now().format("%Y%m%dT%H%M%SZ")
            ));
            tokio::fs::rename(&to_dir, &aside).await?;
            moved = Some(aside.display().to_string());
        }
        tokio::fs::create_dir_all(&to_dir).await?;
        for t in &manifest.tables {
            let name = format!("{}.lance", t.name);
            move_dir(&staging.join(&name), &to_dir.join(&name)).await?;
        }
        tokio::fs::remove_dir_all(&staging).await?;
        Ok(Restored {
            backup_id: id.to_owned(),
            to: to_dir.display().to_string(),
            tables: manifest
                .tables
                .iter()
                .map(|t| (t.name.clone(), t.version, t.rows))
                .collect(),
            bytes: manifest.bytes(),
            replaced_moved_to: moved,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// A manifest path must stay inside its table directory.
fn safe_relative(path: &str) -> Result<&Path, BackupError> {
    let p = Path::new(path);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(BackupError::Corrupt(format!(
            "object path {path:?} leaves its table"
        )));
    }
    Ok(p)
}

/// Every file under `dir` as (path relative to `dir` with `/`, length).
fn files_under(dir: &Path) -> Result<Vec<(String, u64)>, BackupError> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(|e| BackupError::Io(e.into()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(dir)
            .map_err(|e| BackupError::Snapshot(e.to_string()))?;
        let rel: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        out.push((
            rel.join("/"),
            entry
                .metadata()
                .map_err(|e| BackupError::Io(e.into()))?
                .len(),
        ));
    }
    Ok(out)
}

async fn open_local(dir: &Path, name: &str) -> Result<lancedb::Table, BackupError> {
    let db = lancedb::connect(&dir.display().to_string())
        .execute()
        .await
        .map_err(bruno_store::StoreError::from)?;
    db.open_table(name)
        .execute()
        .await
        .map_err(|e| BackupError::Corrupt(format!("table {name} does not open: {e}")))
}

async fn count_rows(dir: &Path, name: &str) -> Result<u64, BackupError> {
    let table = open_local(dir, name).await?;
    let n = table
        .count_rows(None)
        .await
        .map_err(|e| BackupError::Corrupt(format!("table {name} cannot be read: {e}")))?;
    Ok(n as u64)
}

async fn table_version(dir: &Path, name: &str) -> Result<u64, BackupError> {
    let table = open_local(dir, name).await?;
    Ok(table
        .version()
        .await
        .map_err(bruno_store::StoreError::from)?)
}

/// Rename, or copy and delete across filesystems.
async fn move_dir(from: &Path, to: &Path) -> Result<(), BackupError> {
    if tokio::fs::rename(from, to).await.is_ok() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.map_err(|e| BackupError::Io(e.into()))?;
        let rel = entry
            .path()
            .strip_prefix(from)
            .map_err(|e| BackupError::Snapshot(e.to_string()))?;
        let dest = to.join(rel);
        if entry.file_type().is_dir() {
            tokio::fs::create_dir_all(&dest).await?;
        } else {
            tokio::fs::copy(entry.path(), &dest).await?;
        }
    }
    tokio::fs::remove_dir_all(from).await?;
    Ok(())
}
