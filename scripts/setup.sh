#!/usr/bin/env bash
# Create .venv and install corsa with the extras named (idempotent): setup.sh [EXTRAS]
#   engine (default)        what running needs: the codec, the CLI, the embedded openEO engine
#   engine,train,bench,test what the tests need besides (torch for training and export, codecs for benchmarks)
# --no-compile: modules are byte-compiled when first imported, not all of them at install.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-engine}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (pinned in pyproject, train extra) is the CPU build that lies on this machine's disk.
.venv/bin/python -m pip install -q --no-compile -e ".[${extras}]"
