#!/usr/bin/env bash
# SecAgg+ benchmark: fedge-fl's secagg (bench_secagg example) and Flower's own SecAgg+ primitives
# (bench_secagg_flower.py), back to back for each configuration, one JSON line each.
#   tools/scripts/bench_secagg.sh                 # the configurations of docs/benchmarks.md
#   tools/scripts/bench_secagg.sh 50:100000:0 100:1000000:10    # devices:params:drop-percent
# The neighbours and threshold are fedge's defaults for N devices (k = 2⌈3.5 log₂ N⌉, at most
# N − 1, t = ⌊k/2⌋ + 1); Flower gets the same k and t.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"
cargo build --profile ci -p fedge-fl --example bench_secagg >&2
BIN="${CARGO_TARGET_DIR:-$REPO/target}/ci/examples/bench_secagg"
PY="$(bash "$HERE/venv_fl.sh")"
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(50:100000:0 50:100000:10 50:1000000:0 100:100000:0)
for c in "${configs[@]}"; do
  IFS=: read -r n p d <<<"$c"
  fedge="$("$BIN" --devices "$n" --params "$p" --drop-percent "$d")"
  k="$(sed -E 's/.*"neighbours":([0-9]+).*/\1/' <<<"$fedge")"
  t="$(sed -E 's/.*"threshold":([0-9]+).*/\1/' <<<"$fedge")"
  echo "fedge  $fedge"
  echo "flower $("$PY" "$HERE/bench_secagg_flower.py" --devices "$n" --params "$p" \
    --neighbours "$k" --threshold "$t" --drop-percent "$d")"
done
