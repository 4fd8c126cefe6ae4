#!/usr/bin/env bash
# Create .venv and install corsa with the extras named (idempotent): setup.sh [EXTRAS]
#   engine (default)        what running needs: the codec, the CLI, the embedded openEO engine
#   engine,train,bench,test what the tests need besides (torch for training and export, codecs for benchmarks)
# Byte code is compiled once here, not at each import: where PYTHONDONTWRITEBYTECODE is set (many
# containers, CI) Python would otherwise compile every module it imports on every run (seconds a command).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-engine}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (pinned in pyproject, train extra) is the CPU build that lies on this machine's disk.
.venv/bin/python -m pip install -q --no-compile -e ".[${extras}]"
# torch and sympy too (9 s here): each training command imports about 5 s of their source otherwise.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages client udf >/dev/null \
  || true   # a file some package ships for another Python version does not compile: it is never imported
# corsa serve's page: its map library (Leaflet) from the npm registry, served locally by the page.
if command -v npm >/dev/null; then
  (cd web && npm ci --no-audit --no-fund --loglevel=error >/dev/null) || echo "npm ci in web/ failed: corsa serve's map is missing" >&2
else
  echo "npm not found: corsa serve's page shows no map until 'npm ci' runs in web/" >&2
fi
