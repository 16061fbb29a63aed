"""Validate Bruno's deploy manifests and compose file offline.

- every overlay (`deploy/overlays/*`) is rendered with `kubectl kustomize`;
  each object is validated against its schema: core kinds with PyPI
  `kubernetes-validate` (its bundled Kubernetes schemas, strict: unknown
  fields fail), custom resources against
  `deploy/schemas/crds/<group>/<kind>_<version>.json`; a kind without a
  schema fails the run;
- policies every rendered workload must meet (non-root, read-only root
  filesystem, requests and limits, probes, no `latest` or untagged image,
  the writer never scaled or replicated past one active and one standby);
- `docker-compose.yml` against the Compose Specification schema;
- the exchanges, queues, Triggers and workloads are checked against the
  code's own part list by Rust tests (services/bruno-cli/tests/deploy.rs).

usage: python3 deploy/validate.py [--dump DIR]   (DIR: write each overlay's rendering)
"""

import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
schemas = root / "deploy" / "schemas"
KUBERNETES = "1.33.0"
# API groups whose schemas kubernetes-validate bundles.
CORE_GROUPS = {
    "apps",
    "batch",
    "policy",
    "autoscaling",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "coordination.k8s.io",
}
failures = 0


def fail(label, message):
    global failures
    failures += 1
    print(f"FAIL {label}: {message}")


def check_schema(label, document, schema_path):
    schema = json.loads(schema_path.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.path))
    for e in errors:
        fail(label, f"{'/'.join(map(str, e.path))}: {e.message}")
    return not errors


def pod_specs(doc):
    """The pod templates of a workload, whatever its kind."""
    kind = doc["kind"]
    spec = doc.get("spec", {})
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [spec["template"]["spec"]]
    if kind == "CronJob":
        return [spec["jobTemplate"]["spec"]["template"]["spec"]]
    if kind == "Service" and doc["apiVersion"].startswith("serving.knative.dev/"):
        return [spec["template"]["spec"]]
    return []


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "StorageClass", "PersistentVolume"}


def check_policies(label, doc, docs):
    if doc["kind"] not in CLUSTER_SCOPED and not doc["metadata"].get("namespace"):
        fail(label, "no namespace (would land in the default one)")
    for pod in pod_specs(doc):
        pod_sc = pod.get("securityContext", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            where = f"{label} container {c['name']}"
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
                fail(where, "may run as root (runAsNonRoot unset)")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                fail(where, "runs as user 0")
            if not sc.get("readOnlyRootFilesystem"):
                fail(where, "root filesystem is writable")
            if sc.get("allowPrivilegeEscalation", True):
                fail(where, "allows privilege escalation")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                fail(where, "does not drop all capabilities")
            res = c.get("resources", {})
            for need in ("requests", "limits"):
                if not res.get(need, {}).get("memory"):
                    fail(where, f"no memory {need}")
            if not res.get("requests", {}).get("cpu"):
                fail(where, "no cpu request")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    fail(where, f"no {probe}")
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                fail(where, f"image {image!r} has no fixed tag")
    # The writer: one active replica plus one hot standby (single active
    # consumer), never scaled.
    if doc["kind"] in ("StatefulSet", "Deployment") and doc["metadata"]["name"] == "bruno-writer":
        if doc["kind"] != "StatefulSet":
            fail(label, "the writer must be a StatefulSet")
        if doc["spec"].get("replicas", 1) > 2:
            fail(label, "the writer has more than one standby")
    if doc["kind"] in ("ScaledObject", "HorizontalPodAutoscaler"):
        target = doc["spec"].get("scaleTargetRef", {}).get("name")
        if target == "bruno-writer":
            fail(label, "the writer must never be autoscaled")


def validate_overlay(overlay, dump_dir):
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], check=True, capture_output=True, text=True
    ).stdout
    if dump_dir:
        (dump_dir / f"{overlay.name}.yaml").write_text(rendered)
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        group, _, version = doc["apiVersion"].rpartition("/")
        label = f"{overlay.name}: {doc['kind']} {doc['metadata']['name']}"
        if not group or group in CORE_GROUPS:
            try:
                kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(label, f"{'/'.join(map(str, e.path))}: {e.message}")
                continue
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(label, f"no schema: {e}")
                continue
        else:
            schema_path = schemas / "crds" / group / f"{doc['kind'].lower()}_{version}.json"
            if not schema_path.exists():
                fail(label, f"no schema {schema_path.relative_to(root)}")
                continue
            if not check_schema(label, doc, schema_path):
                continue
        check_policies(label, doc, docs)
    print(f"ok   overlay {overlay.name}: {len(docs)} objects")


dump_dir = None
if len(sys.argv) > 2 and sys.argv[1] == "--dump":
    dump_dir = pathlib.Path(sys.argv[2])
    dump_dir.mkdir(parents=True, exist_ok=True)

overlays = sorted(p.parent for p in root.glob("deploy/overlays/*/kustomization.yaml"))
overlays += [p.parent for p in root.glob("deploy/flux/kustomization.yaml")]
if not overlays:
    fail("deploy/overlays", "no overlay")
for overlay in overlays:
    validate_overlay(overlay, dump_dir)

compose = yaml.safe_load((root / "docker-compose.yml").read_text())
if check_schema("docker-compose.yml", compose, schemas / "compose" / "compose-spec.json"):
    print("ok   docker-compose.yml")

print(f"{failures} problem(s)")
sys.exit(1 if failures else 0)
