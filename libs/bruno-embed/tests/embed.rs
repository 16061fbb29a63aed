//! The embedders against the real MiniLM model and against small servers
//! speaking Ollama's and OpenAI's wire formats.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::routing::post;
use bruno_core::Classify;
use bruno_embed::{EmbedError, Embedder, MiniLm, Ollama, OpenAi, cosine};
use serde_json::{Value, json};

/// The model directory (`scripts/fetch-model.sh` puts it there; `.ci/run` runs it).
fn model_dir() -> PathBuf {
    std::env::var_os("BRUNO_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/bruno/models/all-MiniLM-L6-v2")
        })
}

fn model() -> MiniLm {
    MiniLm::load(&model_dir()).unwrap_or_else(|e| panic!("{e}; run scripts/fetch-model.sh"))
}

#[tokio::test]
async fn minilm_matches_sentence_transformers() {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/minilm_reference.json")).unwrap();
    let sentences: Vec<String> = fixture["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    let m = model();
    assert_eq!(m.info().model, "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(m.info().dimension, 384);
    let references: Vec<Vec<f32>> = fixture["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let got = m.embed(&sentences).await.unwrap();
    let mut worst = 1.0f32;
    for (i, reference) in references.iter().enumerate() {
        let c = cosine(&got[i], reference);
        worst = worst.min(c);
        assert!(
            c >= 0.999,
            "sentence {i} ({:?}): cosine {c}",
            &sentences[i].chars().take(40).collect::<String>()
        );
        let norm: f32 = got[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not unit length: {norm}");
    }
    // Each sentence alone as well: a short one (a query's size) takes the
    // encoder's thin path (few-row products on packed weights, the whole
    // attention in one pass), the batch above the blocked GEMM.
    let mut thin = 0;
    for (i, reference) in references.iter().enumerate() {
        let alone = m.embed(std::slice::from_ref(&sentences[i])).await.unwrap();
        let c = cosine(&alone[0], reference);
        worst = worst.min(c);
        assert!(c >= 0.999, "sentence {i} alone: cosine {c}");
        if m.tokenizer()
            .encode(sentences[i].as_str(), true)
            .unwrap()
            .len()
            <= 48
        {
            thin += 1;
        }
    }
    assert!(
        thin >= 4,
        "only {thin} sentences short enough for the thin path"
    );
    eprintln!(
        "lowest cosine to sentence-transformers over {} sentences, in a batch and alone: {worst:.6}",
        sentences.len()
    );
}

#[tokio::test]
async fn input_is_truncated_at_256_tokens() {
    let m = model();
    let long: String = (0..400).map(|i| format!("token{i} ")).collect();
    let longer = format!("{long} and a different ending that lies past the limit");
    let v = m
        .embed(&[long.clone(), longer, "short".into()])
        .await
        .unwrap();
    assert!(
        cosine(&v[0], &v[1]) > 0.99999,
        "text past 256 tokens changed the vector"
    );
    assert!(cosine(&v[0], &v[2]) < 0.9);
}

#[tokio::test]
async fn batching_and_padding_do_not_change_vectors() {
    let m = model();
    let texts = vec![
        "short one".to_owned(),
        "a much longer sentence that needs a lot more padding tokens".to_owned(),
    ];
    let together = m.embed(&texts).await.unwrap();
    for (i, t) in texts.iter().enumerate() {
        let alone = m.embed(std::slice::from_ref(t)).await.unwrap();
        assert!(cosine(&together[i], &alone[0]) > 0.99999);
    }
    assert!(m.embed(&[]).await.unwrap().is_empty());
}

#[test]
fn a_missing_model_directory_is_a_clear_error() {
    let err = MiniLm::load(std::path::Path::new("/nonexistent/model"))
        .err()
        .unwrap();
    assert!(matches!(err, EmbedError::Model(_)));
    assert!(
        err.to_string().contains("/nonexistent/model/config.json"),
        "{err}"
    );
}

type Seen = Arc<Mutex<Vec<Value>>>;

/// Serve `router` on port 0; returns its base URL.
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn ollama_wire_format() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let url = serve(axum::Router::new().route(
        "/api/embed",
        post(move |Json(body): Json<Value>| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(body.clone());
                let n = body["input"].as_array().unwrap().len();
                let embeddings: Vec<Vec<f32>> = (0..n).map(|i| vec![3.0, 4.0 + i as f32, 0.0]).collect();
                Json(json!({"model": body["model"], "embeddings": embeddings, "total_duration": 1, "prompt_eval_count": 4}))
            }
        }),
    ))
    .await;
    let e = Ollama::new(&url, "all-minilm", 3);
    let v = e.embed(&["a".into(), "b".into()]).await.unwrap();
    assert_eq!(v.len(), 2);
    assert!(
        (v[0][0] - 0.6).abs() < 1e-6 && (v[0][1] - 0.8).abs() < 1e-6,
        "{v:?}"
    );
    let body = seen.lock().unwrap()[0].clone();
    assert_eq!(body["model"], "all-minilm");
    assert_eq!(body["input"], json!(["a", "b"]));

    let wrong = Ollama::new(&url, "all-minilm", 384);
    assert!(matches!(
        wrong.embed(&["a".into()]).await,
        Err(EmbedError::BadResponse(_))
    ));
}

#[tokio::test]
async fn openai_wire_format_and_failures() {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let url = serve(
        axum::Router::new()
            .route(
                "/v1/embeddings",
                post(move |headers: http::HeaderMap, Json(body): Json<Value>| {
                    let s = s.clone();
                    async move {
                        let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_owned());
                        s.lock().unwrap().push(json!({"body": body, "auth": auth}));
                        let n = body["input"].as_array().unwrap().len();
                        // Out of order on purpose: clients must sort by index.
                        let data: Vec<Value> = (0..n)
                            .rev()
                            .map(|i| json!({"object": "embedding", "index": i, "embedding": [i as f32 + 1.0, 0.0]}))
                            .collect();
                        Json(json!({"object": "list", "data": data, "model": body["model"],
                                    "usage": {"prompt_tokens": 2, "total_tokens": 2}}))
                    }
                }),
            ),
    )
    .await;
    let e = OpenAi::new(
        &format!("{url}/v1"),
        "text-embedding-3-small",
        2,
        Some("sk-test".into()),
    );
    let v = e
        .embed(&["x".into(), "y".into(), "z".into()])
        .await
        .unwrap();
    assert_eq!(v, vec![vec![1.0, 0.0], vec![1.0, 0.0], vec![1.0, 0.0]]);
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!(seen["auth"], "Bearer sk-test");
    assert_eq!(seen["body"]["input"], json!(["x", "y", "z"]));
    assert_eq!(seen["body"]["model"], "text-embedding-3-small");

    // A server that is down or overloaded is retryable; a 400 is not.
    let flaky = serve(
        axum::Router::new()
            .route(
                "/v1/embeddings",
                post(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "busy") }),
            )
            .route(
                "/api/embed",
                post(|| async { (http::StatusCode::BAD_REQUEST, "model not found") }),
            ),
    )
    .await;
    let err = OpenAi::new(&flaky, "m", 2, None)
        .embed(&["x".into()])
        .await
        .unwrap_err();
    assert!(!err.is_permanent(), "{err}");
    let err = Ollama::new(&flaky, "m", 2)
        .embed(&["x".into()])
        .await
        .unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("model not found"),
        "{err}"
    );
    let err = Ollama::new("http://127.0.0.1:1", "m", 2)
        .embed(&["x".into()])
        .await
        .unwrap_err();
    assert!(!err.is_permanent(), "{err}");
}
