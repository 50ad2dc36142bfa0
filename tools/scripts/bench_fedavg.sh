#!/usr/bin/env bash
# FedAvg benchmark: fedge-fl's streaming FedAvg vs Flower's numpy aggregate on the same data.
# Builds the bench_fedavg example (profile ci, honouring CARGO_TARGET_DIR), gets the FL venv
# (tools/scripts/venv_fl.sh) and runs bench_fedavg.py with all arguments passed through, e.g.
#   tools/scripts/bench_fedavg.sh --clients 100,1000 --params 100000,1000000 --markdown /tmp/t.md
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"
cargo build --profile ci -p fedge-fl --example bench_fedavg >&2
PY="$(bash "$HERE/venv_fl.sh")"
exec "$PY" "$HERE/bench_fedavg.py" "$@"
