#!/usr/bin/env bash
# Set up and run the test suite. pytest's exit 5 (no tests collected) is a broken setup, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the setup is broken" >&2
  exit 1
fi
exit "$rc"
