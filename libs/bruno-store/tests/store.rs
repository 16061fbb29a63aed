//! The chunks and conversations tables on real LanceDB in a temp dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bruno_store::{
    ChunkRow, DocumentWrite, EmbedderInfo, SearchFilters, Store, StoreConfig, StoreError, TurnRow,
};

const DIM: usize = 64;

/// A deterministic bag-of-words embedding (unit length): texts sharing words
/// are close. Stands in for a model; the MiniLM path is tested with the model.
fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; DIM];
    for word in text
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = word.bytes().fold(1469598103934665603u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(1099511628211)
        });
        v[(h % DIM as u64) as usize] += 1.0;
    }
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

fn info() -> EmbedderInfo {
    EmbedderInfo {
        model: "test/bag-of-words".into(),
        dimension: DIM as u32,
    }
}

fn doc(doc_id: &str, source: &str, hash: &str, texts: &[&str]) -> DocumentWrite {
    DocumentWrite {
        doc_id: doc_id.into(),
        chunk_ids: (0..texts.len())
            .map(|i| format!("{doc_id}:{hash}:{i}"))
            .collect(),
        rows: texts
            .iter()
            .enumerate()
            .map(|(i, t)| ChunkRow {
                id: format!("{doc_id}:{hash}:{i}"),
                doc_id: doc_id.into(),
                source: source.into(),
                title: Some(format!("Title of {doc_id}")),
                text: (*t).into(),
                content_hash: hash.into(),
                chunk_index: i as u32,
                vector: embed(t),
            })
            .collect(),
    }
}

async fn store(dir: &tempfile::TempDir) -> Store {
    let config = StoreConfig {
        uri: dir.path().join("db").display().to_string(),
        read_consistency_ms: 0,
        ..Default::default()
    };
    Store::open(config).await.unwrap()
}

#[tokio::test]
async fn writes_are_idempotent_and_replace_stale_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = store(&dir).await.chunks(&info()).await.unwrap();
    let first = doc(
        "d1",
        "wiki",
        "h1",
        &["the backup runs nightly", "restores take ten minutes"],
    );
    let other = doc("d2", "wiki", "h9", &["routers need firmware updates"]);
    let w = chunks.write(&[first.clone(), other]).await.unwrap();
    assert_eq!((w.inserted, w.updated, w.deleted), (3, 0, 0));
    // Redelivery of the same write changes nothing.
    let again = chunks.write(&[first]).await.unwrap();
    assert_eq!((again.inserted, again.deleted), (0, 0));
    assert_eq!(chunks.count(None).await.unwrap(), 3);
    assert_eq!(
        chunks.content_hash("d1").await.unwrap().as_deref(),
        Some("h1")
    );

    // A changed document replaces its chunks; the other document is untouched.
    let w = chunks
        .write(&[doc(
            "d1",
            "wiki",
            "h2",
            &["snapshots are encrypted with age"],
        )])
        .await
        .unwrap();
    assert_eq!((w.inserted, w.deleted), (1, 2));
    assert_eq!(chunks.count(Some("d1")).await.unwrap(), 1);
    assert_eq!(chunks.count(Some("d2")).await.unwrap(), 1);
    assert_eq!(
        chunks.content_hash("d1").await.unwrap().as_deref(),
        Some("h2")
    );
    let hits = chunks
        .search(
            &embed("nightly backup"),
            "nightly",
            5,
            &SearchFilters::default(),
        )
        .await
        .unwrap();
    assert!(
        hits.iter().all(|h| !h.text.contains("nightly")),
        "old text still searchable: {hits:?}"
    );
    assert_eq!(chunks.content_hash("nope").await.unwrap(), None);

    // Rows of one version may arrive in several writes: the id set decides what is stale.
    let mut part = doc("d3", "wiki", "h1", &["one", "two", "three"]);
    let rest = part.rows.split_off(1);
    chunks.write(&[part.clone()]).await.unwrap();
    chunks
        .write(&[DocumentWrite { rows: rest, ..part }])
        .await
        .unwrap();
    assert_eq!(chunks.count(Some("d3")).await.unwrap(), 3);
}

#[tokio::test]
async fn a_rare_keyword_finds_its_document_first() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = store(&dir).await.chunks(&info()).await.unwrap();
    let mut docs = Vec::new();
    for i in 0..40 {
        docs.push(doc(
            &format!("filler{i}"),
            "wiki",
            "h",
            &["the cluster node restarts when the disk is full and the queue grows"],
        ));
    }
    docs.push(doc(
        "rare",
        "wiki",
        "h",
        &["the zanzibarite exporter listens on port 9187 of the cluster node"],
    ));
    chunks.write(&docs).await.unwrap();
    let hits = chunks
        .search(
            &embed("zanzibarite"),
            "zanzibarite",
            5,
            &SearchFilters::default(),
        )
        .await
        .unwrap();
    assert_eq!(hits[0].doc_id, "rare", "{hits:?}");
    assert_eq!(hits[0].title.as_deref(), Some("Title of rare"));
    assert!(hits.len() <= 5);
}

/// MMR below λ = 1 reads the vectors back and skips a duplicate; at λ = 1
/// (no vectors read) the fused order stands, duplicate included.
#[tokio::test]
async fn mmr_below_one_skips_a_duplicate_and_one_keeps_the_fused_order() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = store(&dir).await.chunks(&info()).await.unwrap();
    let mut docs = vec![
        doc("dup-a", "wiki", "h", &["backup restore snapshot volume"]),
        doc("dup-b", "wiki", "h", &["backup restore snapshot volume"]),
    ];
    for i in 0..10 {
        docs.push(doc(
            &format!("filler{i}"),
            "wiki",
            "h",
            &["the router lease expires when the gateway is idle"],
        ));
    }
    chunks.write(&docs).await.unwrap();
    let query = "backup restore snapshot volume";
    let search = |lambda: f32| {
        let ranking = bruno_store::Ranking {
            mmr_lambda: lambda,
            ..Default::default()
        };
        let chunks = chunks.clone();
        async move {
            chunks
                .search_ranked(
                    &embed(query),
                    query,
                    2,
                    &SearchFilters::default(),
                    bruno_store::SearchMode::Hybrid,
                    &ranking,
                )
                .await
                .unwrap()
        }
    };
    let mut pure: Vec<String> = search(1.0).await.into_iter().map(|h| h.doc_id).collect();
    pure.sort();
    assert_eq!(pure, ["dup-a", "dup-b"]);
    let diverse = search(0.3).await;
    assert_eq!(diverse.len(), 2);
    assert!(diverse[0].doc_id.starts_with("dup-"), "{diverse:?}");
    assert!(diverse[1].doc_id.starts_with("filler"), "{diverse:?}");
}

#[tokio::test]
async fn filters_are_escaped_not_spliced() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = store(&dir).await.chunks(&info()).await.unwrap();
    chunks
        .write(&[
            doc("a", "alpha", "h", &["quarterly report numbers"]),
            doc("b", "beta", "h", &["quarterly report numbers"]),
        ])
        .await
        .unwrap();
    let q = embed("quarterly report");
    let only_alpha = SearchFilters {
        source: Some("alpha".into()),
        doc_id: None,
    };
    let hits = chunks
        .search(&q, "quarterly", 10, &only_alpha)
        .await
        .unwrap();
    assert_eq!(
        hits.iter().map(|h| h.doc_id.as_str()).collect::<Vec<_>>(),
        ["a"]
    );
    for evil in [
        "x' OR '1'='1",
        "alpha' OR source = 'beta",
        "'; DROP TABLE chunks; --",
        "alpha\\' OR 1=1 --",
    ] {
        let filters = SearchFilters {
            source: Some(evil.into()),
            doc_id: Some(evil.into()),
        };
        let hits = chunks.search(&q, "quarterly", 10, &filters).await.unwrap();
        assert!(hits.is_empty(), "{evil:?} matched {hits:?}");
        assert_eq!(chunks.count(Some(evil)).await.unwrap(), 0);
        assert_eq!(chunks.content_hash(evil).await.unwrap(), None);
    }
    assert_eq!(
        chunks.count(None).await.unwrap(),
        2,
        "an injected filter deleted or hid rows"
    );
}

#[tokio::test]
async fn another_embedder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir).await;
    s.chunks(&info()).await.unwrap();
    let other = EmbedderInfo {
        model: "other/model".into(),
        dimension: DIM as u32,
    };
    let err = s.chunks(&other).await.err().expect("mismatch must fail");
    assert!(matches!(err, StoreError::EmbedderMismatch { .. }), "{err}");
    assert!(err.to_string().contains("test/bag-of-words/64"), "{err}");
    let wider = EmbedderInfo {
        model: "test/bag-of-words".into(),
        dimension: 384,
    };
    assert!(matches!(
        s.chunks(&wider).await,
        Err(StoreError::EmbedderMismatch { .. })
    ));
    // Reopening with the right embedder works, and a wrong-sized row is refused.
    let chunks = s.chunks(&info()).await.unwrap();
    let mut bad = doc("x", "s", "h", &["t"]);
    bad.rows[0].vector.push(0.0);
    assert!(matches!(
        chunks.write(&[bad]).await,
        Err(StoreError::InvalidRow(_))
    ));
}

#[tokio::test]
async fn maintenance_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = store(&dir).await.chunks(&info()).await.unwrap();
    for i in 0..5 {
        chunks
            .write(&[doc(
                &format!("d{i}"),
                "s",
                "h",
                &["some words here", "and more words"],
            )])
            .await
            .unwrap();
    }
    let before = chunks.version().await.unwrap();
    chunks.maintain(chrono::Duration::zero()).await.unwrap();
    assert!(chunks.version().await.unwrap() >= before);
    assert_eq!(chunks.count(None).await.unwrap(), 10);
    let hits = chunks
        .search(&embed("more words"), "words", 3, &SearchFilters::default())
        .await
        .unwrap();
    assert_eq!(hits.len(), 3);
}

fn turn(session: &str, n: i64, role: &str, text: &str) -> TurnRow {
    TurnRow {
        id: format!("{session}:{n}:{role}"),
        session_id: session.into(),
        role: role.into(),
        text: text.into(),
        correlation_id: format!("{session}-{n}"),
        at_micros: 1_700_000_000_000_000 + n * 1_000_000,
        vector: embed(text),
    }
}

#[tokio::test]
async fn session_memory_reads_one_session_and_survives_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let conversations = store(&dir).await.conversations(&info()).await.unwrap();
    // One commit per turn pair, as a lightly loaded writer makes them.
    for n in 0..20 {
        for session in ["alice", "bob"] {
            conversations
                .write(&[
                    turn(
                        session,
                        n,
                        "user",
                        &format!("{session} question {n} about topic{n}"),
                    ),
                    turn(
                        session,
                        n,
                        "assistant",
                        &format!("{session} answer {n} on topic{n}"),
                    ),
                ])
                .await
                .unwrap();
        }
    }
    assert_eq!(conversations.files().await.unwrap(), 40);
    let check = || async {
        let recent = conversations.recent("alice", 4).await.unwrap();
        let said: Vec<&str> = recent.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(
            said,
            [
                "alice question 18 about topic18",
                "alice answer 18 on topic18",
                "alice question 19 about topic19",
                "alice answer 19 on topic19",
            ]
        );
        // An odd count cuts a turn: the answer is the newer of the pair.
        let three = conversations.recent("alice", 3).await.unwrap();
        let said: Vec<&str> = three.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(
            said,
            [
                "alice answer 18 on topic18",
                "alice question 19 about topic19",
                "alice answer 19 on topic19",
            ]
        );
        // More than the session holds: all of it, oldest first.
        let all = conversations.recent("alice", 100).await.unwrap();
        assert_eq!(all.len(), 40);
        assert_eq!(all[0].text, "alice question 0 about topic0");
        assert_eq!(all[39].text, "alice answer 19 on topic19");
        assert!(conversations.recent("alice", 0).await.unwrap().is_empty());
        let related = conversations
            .related("alice", &embed("question about topic7"), 2)
            .await
            .unwrap();
        assert_eq!(related.len(), 2);
        assert!(
            related.iter().all(|t| t.session_id == "alice"),
            "{related:?}"
        );
        assert_eq!(related[0].text, "alice question 7 about topic7");
        assert_eq!(conversations.count(Some("bob")).await.unwrap(), 40);
    };
    check().await;
    conversations.compact().await.unwrap();
    assert_eq!(conversations.files().await.unwrap(), 1);
    check().await;
}
