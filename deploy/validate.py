"""Validate Bruno's deploy manifests and compose file offline.

- every `deploy/*/kustomization.yaml` is rendered with `kubectl kustomize`,
  and each resulting object is validated against the JSON Schema of its kind
  from `deploy/schemas/crds/<group>/<kind>_<version>.json` (custom resources);
  objects of core kinds fail the run, since no schema for them is vendored;
- `docker-compose.yml` against the Compose Specification schema;
- `deploy/rabbitmq/topology.yaml` is checked against the exchanges and
  queues the code declares by a Rust test, not here.

usage: python3 deploy/validate.py [SCHEMAS_DIR]   (default deploy/schemas)
"""

import json
import pathlib
import subprocess
import sys

import jsonschema
import yaml

root = pathlib.Path(__file__).resolve().parent.parent
schemas = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else root / "deploy" / "schemas")
failures = 0


def check(label, document, schema_path):
    global failures
    schema = json.loads(schema_path.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=lambda e: list(e.path))
    for e in errors:
        failures += 1
        print(f"FAIL {label}: {'/'.join(map(str, e.path))}: {e.message}")
    if not errors:
        print(f"ok   {label}")


for kustomization in sorted(root.glob("deploy/*/kustomization.yaml")):
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(kustomization.parent)], check=True, capture_output=True, text=True
    ).stdout
    for doc in yaml.safe_load_all(rendered):
        if not doc:
            continue
        group, _, version = doc["apiVersion"].rpartition("/")
        label = f"{kustomization.parent.name}: {doc['kind']} {doc['metadata']['name']}"
        if not group:
            failures += 1
            print(f"FAIL {label}: core kind without a vendored schema")
            continue
        schema_path = schemas / "crds" / group / f"{doc['kind'].lower()}_{version}.json"
        if not schema_path.exists():
            failures += 1
            print(f"FAIL {label}: no schema {schema_path}")
            continue
        check(label, doc, schema_path)

compose = yaml.safe_load((root / "docker-compose.yml").read_text())
check("docker-compose.yml", compose, schemas / "compose" / "compose-spec.json")

print(f"{failures} problem(s)")
sys.exit(1 if failures else 0)
