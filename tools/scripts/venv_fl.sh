#!/usr/bin/env bash
# Create or reuse the federated-learning venv at $REPO/.cache/venv-fl and print its python path.
# Same contract as venv.sh, for requirements-fl.txt (Flower, numpy, dp-accounting and their
# pinned closure, installed with --no-deps; see that file): the venv is reused when the sha256
# of requirements-fl.txt matches the stamp written after the last successful install.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$REPO/.cache/venv-fl"
REQ="$HERE/requirements-fl.txt"
STAMP="$VENV/.requirements.sha256"
PY="${PYTHON:-python3}"

want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

{
  echo "venv_fl.sh: (re)building $VENV"
  if [[ ! -x "$VENV/bin/python" ]]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r "$REQ"
} >&2
echo "$want" > "$STAMP"
echo "$VENV/bin/python"
