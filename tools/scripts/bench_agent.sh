#!/usr/bin/env bash
# Agent benchmarks (issue 4): binary size, idle RSS, RSS while serving the smallest zoo model,
# and QoS 1 messages/s through the link, against a Mosquitto started here on a free port.
#
#   tools/scripts/bench_agent.sh [--agent BIN] [--model ZOO_NAME] [--idle-s 30] [--infer 20]
#                                [--count 20000] [--out DIR]
#
# --agent   the binary to measure (default target/release/fedge-agent, from
#           `cargo build --release -p fedge-agent`; the release profile strips it, so the
#           "unstripped" size needs a build with CARGO_PROFILE_RELEASE_STRIP=false).
# --model   zoo model to serve (default: the smallest models/zoo/*/model.onnx by bytes).
#
# The served model is placed in the agent's model store exactly as a completed signed install
# leaves it (versions/{name}-{version}-{sha8}/ with model.onnx, test_input.npz, test_output.npz,
# meta.json, and the `active` pointer); the agent loads it at start as after any restart. The
# signed install path itself is exercised by agent/tests/install.rs. Inputs are case 0 of the
# model's io.npz, dropped into the watched directory one after another.
#
# RSS is read from /proc/PID/status (VmRSS now, VmHWM peak) of the agent process. Prints a
# markdown summary on stdout and keeps logs in --out.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
AGENT="${CARGO_TARGET_DIR:-$REPO/target}/release/fedge-agent"
MODEL=""
IDLE_S=30
INFER=20
COUNT=20000
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --agent) AGENT="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --idle-s) IDLE_S="$2"; shift 2 ;;
    --infer) INFER="$2"; shift 2 ;;
    --count) COUNT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -x "$AGENT" ]] || { echo "$AGENT missing: cargo build --release -p fedge-agent" >&2; exit 1; }
AGENT="$(cd "$(dirname "$AGENT")" && pwd)/$(basename "$AGENT")"
MOSQ="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[[ -x "$MOSQ" ]] || { echo "mosquitto not installed (apt-get install -y mosquitto)" >&2; exit 1; }
PY="$(bash "$HERE/venv.sh")"   # numpy + onnx, to cut the test input and read the input names

if [[ -z "$MODEL" ]]; then
  MODEL="$(for f in "$REPO"/models/zoo/*/model.onnx; do
             printf '%s %s\n' "$(stat -Lc %s "$f")" "$(basename "$(dirname "$f")")"; done |
           sort -n | head -1 | cut -d' ' -f2)"
fi
ZOO="$REPO/models/zoo/$MODEL"
WORK="$(mktemp -d /tmp/fedge-bench-agent.XXXXXX)"
OUT="${OUT:-$WORK/out}"
mkdir -p "$OUT"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
status_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
wait_log() {  # wait_log FILE PATTERN SECONDS
  local t=0
  until grep -q "$2" "$1" 2>/dev/null; do
    sleep 0.2; t=$((t + 1))
    [[ $t -lt $(($3 * 5)) ]] || { echo "timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }
  done
}

# --- broker ---------------------------------------------------------------------------------
PORT="$(free_port)"
cat > "$WORK/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 100000
log_dest stderr
log_type error
log_type warning
user root
EOF
"$MOSQ" -c "$WORK/mosquitto.conf" 2> "$OUT/mosquitto.log" &
PIDS+=($!)
for _ in $(seq 50); do (echo > "/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
URL="mqtt://127.0.0.1:$PORT"

# --- binary size ----------------------------------------------------------------------------
cp "$AGENT" "$WORK/agent.stripped"
strip "$WORK/agent.stripped"
SIZE_FILE="$(stat -c %s "$AGENT")"
SIZE_STRIPPED="$(stat -c %s "$WORK/agent.stripped")"
size -A "$AGENT" > "$OUT/sections.txt"

# --- an agent ---------------------------------------------------------------------------------
config() {  # config DIR EXTRA
  mkdir -p "$1"
  chmod 700 "$1"
  cat > "$1/agent.toml" <<EOF
device_id = "bench"
fleet = "bench"
operator_key = "$(printf '11%.0s' $(seq 32))"
data_dir = "$1/data"

[broker]
url = "$URL"

$2
EOF
  "$AGENT" --config "$1/agent.toml" init > /dev/null
}

sample() {  # sample PID SECONDS -> "max_VmRSS_kib VmHWM_kib" over one sample a second
  local max=0 r
  for _ in $(seq "$2"); do
    r="$(status_kib "$1" VmRSS)"
    [[ $r -gt $max ]] && max=$r
    sleep 1
  done
  echo "$max $(status_kib "$1" VmHWM)"
}

# idle: connected, no model, no inference directory
config "$WORK/idle" ""
"$AGENT" --config "$WORK/idle/agent.toml" 2> "$OUT/agent-idle.log" &
IDLE_PID=$!
PIDS+=($IDLE_PID)
wait_log "$OUT/agent-idle.log" "broker connected" 30
read -r IDLE_RSS IDLE_HWM < <(sample "$IDLE_PID" "$IDLE_S")
kill -TERM "$IDLE_PID"; wait "$IDLE_PID" || true

# serving: the model in the store, a watched directory, INFER inputs one after another
D="$WORK/serve"
config "$D" "[infer]
input_dir = \"$D/in\"
poll_ms = 100
"
mkdir -p "$D/in" "$D/data/models/versions"
"$PY" - "$ZOO" "$D" "$MODEL" <<'PYEOF'
import hashlib, json, os, shutil, sys, time
import numpy as np, onnx
zoo, d, name = sys.argv[1:4]
model = open(os.path.join(zoo, "model.onnx"), "rb").read()
sha = hashlib.sha256(model).hexdigest()
g = onnx.load_from_string(model).graph
inits = {i.name for i in g.initializer}
inputs = [i.name for i in g.input if i.name not in inits]
io = np.load(os.path.join(zoo, "io.npz"))
shapes = {n: list(io[f"c0_in{k}"].shape) for k, n in enumerate(inputs)}
ver = f"{name}-1-{sha[:8]}"
v = os.path.join(d, "data/models/versions", ver)
os.makedirs(v)
open(os.path.join(v, "model.onnx"), "wb").write(model)
for f in ("test_input.npz", "test_output.npz"):
    shutil.copy(os.path.join(zoo, "io.npz"), os.path.join(v, f))
json.dump({"name": name, "version": 1, "sha256": sha, "tolerance": 1e-3,
           "created_unix_s": int(time.time()), "bundle_sha256": "00" * 32,
           "input_shapes": shapes}, open(os.path.join(v, "meta.json"), "w"), indent=2)
json.dump({"healthy": [ver]}, open(os.path.join(d, "data/models/active"), "w"))
assert len(inputs) == 1, f"{name}: {len(inputs)} inputs; this script feeds one-input models"
np.save(os.path.join(d, "input.npy"), io["c0_in0"])
print(f"{name}: {len(model)} bytes, input {inputs[0]} {shapes[inputs[0]]}", file=sys.stderr)
PYEOF
"$AGENT" --config "$D/agent.toml" 2> "$OUT/agent-serve.log" &
SERVE_PID=$!
PIDS+=($SERVE_PID)
wait_log "$OUT/agent-serve.log" "broker connected" 30
wait_log "$OUT/agent-serve.log" "serving" 30
sleep 2
LOADED_RSS="$(status_kib "$SERVE_PID" VmRSS)"
T0="$(date +%s.%N)"
for i in $(seq "$INFER"); do
  cp "$D/input.npy" "$D/in/.x$i.npy"
  mv "$D/in/.x$i.npy" "$D/in/x$i.npy"
  until [[ -e "$D/in/out/x$i.out0.npy" || -e "$D/in/out/x$i.err" ]]; do sleep 0.02; done
  [[ ! -e "$D/in/out/x$i.err" ]] || { cat "$D/in/out/x$i.err" >&2; exit 1; }
done
T1="$(date +%s.%N)"
read -r SERVE_RSS SERVE_HWM < <(sample "$SERVE_PID" 5)
kill -TERM "$SERVE_PID"; wait "$SERVE_PID" || true

# --- messages/s through the link -------------------------------------------------------------
LINK_RAW="$("$AGENT" bench-link --broker "$URL" --count "$COUNT")"
LINK_NOSYNC="$("$AGENT" bench-link --broker "$URL" --count "$COUNT" --outbox "$WORK/ob1" --no-fsync)"
LINK_FSYNC="$("$AGENT" bench-link --broker "$URL" --count "$((COUNT / 4))" --outbox "$WORK/ob2")"

# --- report ---------------------------------------------------------------------------------
cat <<EOF
agent: $AGENT ($("$AGENT" --version)), sha256 $(sha256sum "$AGENT" | cut -c1-16)
broker: $("$MOSQ" -h | head -1), $URL
served model: $MODEL ($(stat -Lc %s "$ZOO/model.onnx") bytes)

| measure | value |
|---|---|
| binary as built (release profile) | $SIZE_FILE B ($(mib $((SIZE_FILE / 1024))) MiB) |
| binary after \`strip\` | $SIZE_STRIPPED B ($(mib $((SIZE_STRIPPED / 1024))) MiB) |
| idle RSS, connected, no model (max of ${IDLE_S} samples, 1/s) | $(mib "$IDLE_RSS") MiB (peak VmHWM $(mib "$IDLE_HWM") MiB) |
| RSS with $MODEL loaded, before inference | $(mib "$LOADED_RSS") MiB |
| RSS serving $MODEL after $INFER inferences (max of 5 samples) | $(mib "$SERVE_RSS") MiB (peak VmHWM $(mib "$SERVE_HWM") MiB) |
| $INFER inferences through the watched directory | $(awk -v a="$T0" -v b="$T1" -v n="$INFER" 'BEGIN { printf "%.2f s (%.0f ms each, incl. the %s ms poll)", b - a, (b - a) * 1000 / n, 100 }') |
| link, raw | $LINK_RAW |
| link, disk outbox, no fsync | $LINK_NOSYNC |
| link, disk outbox, fsync per message | $LINK_FSYNC |
EOF
