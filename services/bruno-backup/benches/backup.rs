//! Backup and restore throughput against a plain recursive copy of the same
//! table directory on the same disk (the baseline, printed beside).
//!
//! `cargo bench -p bruno-backup --bench backup`; `BENCH_ROWS=100000,1000000`
//! (the default) sets the table sizes. Each size: fill a `chunks` table
//! (384-dim vectors, ~600-character texts), compact it, `cp -r` it, back it
//! up (pin, clone, checksum, encrypt, upload, then the verifying restore into
//! scratch), and restore it into a new directory (download, decrypt, check,
//! open).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Instant;

use bruno_backup::{Engine, Key, Policy, Quiet, S3Config, Target};
use bruno_store::{ChunkRow, DocumentWrite, EmbedderInfo, Store, StoreConfig};

fn dir_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

async fn fill(store: &Store, rows: usize) {
    let chunks = store
        .chunks(&EmbedderInfo {
            model: "bench/fake".into(),
            dimension: 384,
        })
        .await
        .unwrap();
    let per_doc = 10;
    let batch_docs = 2_000;
    let mut doc = 0;
    while doc * per_doc < rows {
        let writes: Vec<DocumentWrite> = (doc..(doc + batch_docs).min(rows / per_doc))
            .map(|d| {
                let ids: Vec<String> = (0..per_doc).map(|i| format!("doc-{d}:{i}")).collect();
                DocumentWrite {
                    doc_id: format!("doc-{d}"),
                    rows: ids
                        .iter()
                        .enumerate()
                        .map(|(i, id)| {
                            let mut v: Vec<f32> = (0..384)
                                .map(|k| (((d * 7 + i * 13 + k * 31) % 1009) as f32) - 504.0)
                                .collect();
                            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                            v.iter_mut().for_each(|x| *x /= norm);
                            ChunkRow {
                                id: id.clone(),
                                doc_id: format!("doc-{d}"),
                                source: "bench".into(),
                                title: Some(format!("Document {d}")),
                                text: format!(
                                    "Chunk {i} of document {d}. {}",
                                    "Operators restart the service after draining its queue and checking the dashboard. "
                                        .repeat(7)
                                ),
                                content_hash: "h".into(),
                                chunk_index: i as u32,
                                vector: v,
                            }
                        })
                        .collect(),
                    chunk_ids: ids,
                }
            })
            .collect();
        chunks.write(&writes).await.unwrap();
        doc += batch_docs;
    }
    chunks.compact().await.unwrap();
    chunks.maintain(chrono::Duration::zero()).await.unwrap();
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

async fn bench(rows: usize) {
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let live = dir.path().join("lancedb");
    let store = Store::open(StoreConfig {
        uri: live.display().to_string(),
        read_consistency_ms: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    fill(&store, rows).await;
    let bytes = dir_bytes(&live.join("chunks.lance"));
    println!(
        "\n{rows} chunks: table {:.1} MB on disk (filled and compacted in {:.0} s)",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // Baseline: a plain recursive copy on the same disk.
    let t = Instant::now();
    let status = std::process::Command::new("cp")
        .args(["-r"])
        .arg(live.join("chunks.lance"))
        .arg(dir.path().join("copy.lance"))
        .status()
        .unwrap();
    assert!(status.success());
    let cp = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(dir.path().join("copy.lance")).unwrap();

    let target = Target::open(
        &dir.path().join("backups").display().to_string(),
        &S3Config::default(),
    )
    .unwrap();
    let engine = Engine::new(
        store.clone(),
        target,
        Key::generate(),
        dir.path().join("work"),
        Policy::default(),
    );
    let t = Instant::now();
    let manifest = engine.run(&[], &Quiet).await.unwrap();
    let with_verify = t.elapsed().as_secs_f64();
    let t = Instant::now();
    engine.verify(&manifest.backup_id, &Quiet).await.unwrap();
    let verify = t.elapsed().as_secs_f64();
    let backup = (with_verify - verify).max(1e-9);
    let t = Instant::now();
    let restored = engine
        .restore(
            &manifest.backup_id,
            &dir.path().join("restored").display().to_string(),
            false,
            &Quiet,
        )
        .await
        .unwrap();
    let restore = t.elapsed().as_secs_f64();
    assert_eq!(restored.tables[0].2 as usize, rows);

    println!(
        "  cp -r (baseline)           {cp:7.2} s  {:8.1} MB/s",
        mbps(bytes, cp)
    );
    println!(
        "  backup (pin, clone, sha256, encrypt, write)  {backup:7.2} s  {:8.1} MB/s  {:9.0} rows/s  = {:.0} % of cp -r",
        mbps(bytes, backup),
        rows as f64 / backup,
        100.0 * cp / backup
    );
    println!(
        "  verify (restore into scratch, every check)   {verify:7.2} s  {:8.1} MB/s",
        mbps(bytes, verify)
    );
    println!(
        "  restore (download, decrypt, check, open)     {restore:7.2} s  {:8.1} MB/s  {:9.0} rows/s",
        mbps(bytes, restore),
        rows as f64 / restore
    );
    if rows < 1_000_000 {
        let scale = 1_000_000.0 / rows as f64;
        println!(
            "  extrapolated to 1M chunks: backup {:.0} s, restore {:.0} s (linear in bytes)",
            backup * scale,
            restore * scale
        );
    }
}

/// The hardware floor: single-thread SHA-256 and XChaCha20-Poly1305 over
/// 256 MB, what every backed-up byte goes through (two hashes, one seal).
fn floor() {
    use sha2::Digest;
    let data = vec![0x5au8; 256 << 20];
    let t = Instant::now();
    let digest = sha2::Sha256::digest(&data);
    let sha = t.elapsed().as_secs_f64();
    let key = Key::generate();
    let t = Instant::now();
    let (mut sealer, _) = bruno_backup::crypt::Sealer::new(&key, "floor");
    let mut out = 0usize;
    for chunk in data.chunks(1 << 20) {
        out += sealer.update(chunk).unwrap().len();
    }
    out += sealer.finish().unwrap().len();
    let seal = t.elapsed().as_secs_f64();
    let mb = data.len() as f64 / 1e6;
    println!(
        "floor, one core: SHA-256 {:.0} MB/s, XChaCha20-Poly1305 {:.0} MB/s; per byte backed up (2 hashes + 1 seal): {:.0} MB/s per core ({} {out})",
        mb / sha,
        mb / seal,
        mb / (2.0 * sha + seal),
        hex::encode(&digest[..2]),
    );
}

fn main() {
    floor();
    let sizes: Vec<usize> = std::env::var("BENCH_ROWS")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for rows in sizes {
        rt.block_on(bench(rows));
    }
}
