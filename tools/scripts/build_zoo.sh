#!/usr/bin/env bash
# Build/refresh the model zoo (models/zoo, .cache/zoo) in the pinned venv.
# Usage: bash tools/scripts/build_zoo.sh [--force] [--only name1,name2]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$(bash "$HERE/venv.sh")"
if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "build_zoo.sh: espeak-ng missing, installing (Debian)" >&2
  if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq espeak-ng >/dev/null; fi
fi
exec "$PY" "$HERE/build_zoo.py" "$@"
