#!/usr/bin/env bash
# Benchmark fedge (target/ci/fedge) against onnxruntime on the model zoo.
# Gets the project venv (tools/scripts/venv.sh) and runs bench_vs_ort.py with
# all arguments passed through, e.g.
#   tools/scripts/bench_vs_ort.sh --threads 1,2 --markdown /tmp/t.md --json /tmp/t.json
# Build first: cargo build --workspace --profile ci
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="$(bash "$HERE/venv.sh")"
cd "$REPO"
exec "$PY" "$HERE/bench_vs_ort.py" "$@"
