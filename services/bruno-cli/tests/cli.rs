//! The `bruno` binary and `run_ingress` (what `bruno dev` runs), against the
//! real RabbitMQ under a unique prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use bruno_cli::{Config, run_ingress};
use bruno_core::Secret;
use tokio_util::sync::CancellationToken;

/// The binary, on the test's RabbitMQ (the commands here test the AMQP
/// path; `dev.rs` runs them without `broker.url`).
fn bruno() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_bruno"));
    cmd.env("BRUNO_BROKER__URL", amqp_url());
    cmd
}

fn amqp_url() -> String {
    let host = std::env::var("BRUNO_TEST_AMQP_HOST").unwrap_or_else(|_| "127.0.0.1:5672".into());
    format!("amqp://guest:guest@{host}/%2f?heartbeat=5")
}

fn prefix() -> String {
    format!("c{}.", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Delete the fleet topology declared under `prefix`.
async fn cleanup(prefix: &str) {
    let conn = lapin::Connection::connect(&amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let config = bruno_broker::BrokerConfig {
        prefix: prefix.to_owned(),
        ..Default::default()
    };
    bruno_cli::registry::topology(&config)
        .delete(&ch)
        .await
        .unwrap();
    bruno_system_tests::close(&conn).await;
}

#[test]
fn invalid_config_exits_2_naming_the_key() {
    let out = bruno()
        .args(["events", "list"])
        .env("BRUNO_BROKER__DELIVERY_LIMIT", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker.delivery_limit"), "{err}");

    let out = bruno()
        .args(["events", "list"])
        .env("BRUNO_BROKER__NOPE", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn secrets_are_not_printed_in_errors() {
    let out = bruno()
        .args(["dlq", "list", "--part", "embedder"])
        .env("BRUNO_BROKER__URL", "amqp://guest:hunter2@127.0.0.1:1/%2f")
        .env("BRUNO_BROKER__RECONNECT_MAX_MS", "200")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("cannot reach RabbitMQ"), "{all}");
    assert!(!all.contains("hunter2"), "{all}");
}

#[test]
fn keys_hash_and_event_schemas() {
    let out = bruno().args(["keys", "hash", "abc"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let out = bruno()
        .args(["events", "schema", "bruno.chat.requested.v1"])
        .output()
        .unwrap();
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "ChatRequested");
    let out = bruno()
        .args(["events", "schema", "bruno.nope.v1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn dlq_commands_print_json() {
    let prefix = prefix();
    let out = bruno()
        .args(["dlq", "list", "--part", "writer", "--json"])
        .env("BRUNO_BROKER__PREFIX", &prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, serde_json::json!([]));
    let out = bruno()
        .args(["dlq", "replay", "--part", "writer", "--all", "--json"])
        .env("BRUNO_BROKER__PREFIX", &prefix)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report, serde_json::json!({"replayed": 0, "kept": 0}));
    let out = bruno()
        .args(["dlq", "purge", "--part", "writer"])
        .env("BRUNO_BROKER__PREFIX", &prefix)
        .output()
        .unwrap();
    assert!(!out.status.success(), "purge without --yes must refuse");
    let out = bruno()
        .args(["dlq", "list", "--part", "nope"])
        .env("BRUNO_BROKER__PREFIX", &prefix)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown part"));
    cleanup(&prefix).await;
}

#[tokio::test]
async fn dev_serves_ingress_and_admin_then_shuts_down() {
    let prefix = prefix();
    let mut config = Config::default();
    config.broker.url = Some(Secret::new(amqp_url()));
    config.broker.prefix = prefix.clone();
    config.ingress.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(run_ingress(config, shutdown.clone(), Some(tx)));
    let bound = rx.await.unwrap();
    let client = reqwest::Client::new();
    let admin = format!("http://{}", bound.admin);
    assert_eq!(
        client
            .get(format!("{admin}/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut ready = false;
    for _ in 0..100 {
        if client
            .get(format!("{admin}/ready"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "/ready never turned 200");
    let r = client
        .post(format!("http://{}/", bound.ingress.unwrap()))
        .header("ce-specversion", "1.0")
        .header("ce-id", "cli-1")
        .header("ce-source", "cli-test")
        .header("ce-type", "bruno.backup.requested.v1")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let metrics = client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("bruno_ingress_events_accepted_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("bruno_broker_connected 1"), "{metrics}");

    // tokio's Command: a blocking wait would stall the server under test.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
        .args([
            "health",
            "--addr",
            &bound.admin.to_string(),
            "--path",
            "/ready",
        ])
        .status()
        .await
        .unwrap();
    assert!(status.success());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // tokio's Command: a blocking wait would stall the server under test.
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_bruno"))
        .args(["health", "--addr", &bound.admin.to_string()])
        .status()
        .await
        .unwrap();
    assert!(
        !status.success(),
        "health must fail once the server is gone"
    );
    cleanup(&prefix).await;
}

#[test]
fn committed_topology_manifests_are_current() {
    let topology = bruno_cli::registry::topology(&bruno_broker::BrokerConfig::default());
    let rendered = bruno_cli::manifests_yaml(&topology, "bruno-rabbitmq").unwrap();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/rabbitmq/topology.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap();
    assert!(
        committed == rendered,
        "deploy/rabbitmq/topology.yaml is stale: run `bruno topology --manifests > deploy/rabbitmq/topology.yaml`"
    );
}

/// One-shot commands log at WARN by default and never colour a stream that
/// is not a terminal (here, a pipe); with the filter raised they do log
/// their INFO lines, still without colour.
#[tokio::test]
async fn one_shot_commands_log_warnings_only_and_never_in_colour() {
    let prefix = prefix();
    let run = |filter: Option<&str>| {
        let mut cmd = bruno();
        cmd.args(["dlq", "list", "--part", "writer"])
            .env("BRUNO_BROKER__PREFIX", &prefix)
            .env_remove("RUST_LOG");
        if let Some(f) = filter {
            cmd.env("BRUNO_LOG__FILTER", f);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let quiet = run(None);
    assert!(!quiet.contains("INFO"), "{quiet}");
    assert!(!quiet.contains('\u{1b}'), "{quiet:?}");
    let chatty = run(Some("info"));
    assert!(chatty.contains("INFO"), "{chatty}");
    assert!(!chatty.contains('\u{1b}'), "{chatty:?}");
    cleanup(&prefix).await;
}

/// With `require_api_keys` and no key configured, the ingress and the gateway
/// refuse to start (no fail-open), naming the setting.
#[tokio::test]
async fn front_parts_refuse_to_start_without_required_api_keys() {
    let prefix = prefix();
    for part in ["ingress", "gateway"] {
        let mut child = bruno()
            .arg(part)
            .env(
                format!("BRUNO_{}__REQUIRE_API_KEYS", part.to_uppercase()),
                "true",
            )
            .env(
                format!("BRUNO_{}__LISTEN", part.to_uppercase()),
                "127.0.0.1:0",
            )
            .env("BRUNO_ADMIN__LISTEN", "127.0.0.1:0")
            .env("BRUNO_BROKER__PREFIX", &prefix)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("bruno {part} started without its required API keys");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success());
        assert!(
            stderr.contains(&format!("{part}.api_key_hashes is empty")),
            "{stderr}"
        );
    }
    cleanup(&prefix).await;
}
