#!/usr/bin/env bash
# Create .venv and install corsa with training, benchmark and test extras (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (pinned in pyproject) is the CPU build that lies on this machine's disk.
.venv/bin/python -m pip install -q -e ".[engine,train,bench,test]"
