#!/usr/bin/env bash
# Fetch the ONNX backend node tests (onnx/backend/test/data/node/**) for the conformance runner
# (tests/tests/conformance.rs) into $REPO/.cache/onnx-node/<case>/{model.onnx,test_data_set_0/}.
#
# Idempotent: does nothing when .cache/onnx-node/.stamp-$ONNX_VERSION exists.
# The onnx wheel (cp311, manylinux x86_64; only its data files are used, so the platform does
# not matter) is downloaded into .cache/wheels with pip: the project venv's python when
# tools/scripts/venv.sh exists, else python3.
# Usage: bash tools/scripts/fetch_onnx_node_tests.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
ONNX_VERSION="${ONNX_VERSION:-1.22.0}"
DEST="$REPO/.cache/onnx-node"
WHEELS="$REPO/.cache/wheels"
STAMP="$DEST/.stamp-$ONNX_VERSION"

count() { find "$DEST" -mindepth 1 -maxdepth 1 -type d | wc -l; }

if [[ -f "$STAMP" ]]; then
  echo "fetch_onnx_node_tests: $DEST up to date (onnx $ONNX_VERSION): $(count) cases"
  exit 0
fi

if [[ -f "$HERE/venv.sh" ]]; then
  PY="$(bash "$HERE/venv.sh")"
else
  PY="${PYTHON:-python3}"
fi

mkdir -p "$WHEELS"
shopt -s nullglob
wheels=("$WHEELS"/onnx-"$ONNX_VERSION"-cp311-*manylinux*x86_64*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "fetch_onnx_node_tests: downloading onnx==$ONNX_VERSION wheel into $WHEELS" >&2
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    "onnx==$ONNX_VERSION" -d "$WHEELS"
  wheels=("$WHEELS"/onnx-"$ONNX_VERSION"-cp311-*manylinux*x86_64*.whl)
fi
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "fetch_onnx_node_tests: no cp311 manylinux x86_64 wheel for onnx $ONNX_VERSION in $WHEELS" >&2
  exit 1
fi
WHEEL="${wheels[0]}"

echo "fetch_onnx_node_tests: extracting node tests from $(basename "$WHEEL")" >&2
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$WHEEL" "$DEST" <<'EOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "onnx/backend/test/data/node/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if ".." in rel.split("/"):
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
print(f"fetch_onnx_node_tests: {n} files extracted", file=sys.stderr)
EOF
touch "$STAMP"
echo "fetch_onnx_node_tests: $(count) cases in $DEST (onnx $ONNX_VERSION)"
