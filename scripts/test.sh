#!/usr/bin/env bash
# Set up and run the test suite. pytest's exit 5 (no tests collected) is a broken setup, not a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh engine,train,bench,test || exit 1   # torch (CPU build) for the training tests
bash scripts/setup_udf38.sh || exit 1   # the oldest UDF runtime of the back ends, for tests/test_backend_chunks.py
# The no-code page's test drives a real browser: headless Chromium from the system packages.
if ! command -v chromium-headless-shell >/dev/null && ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium-headless-shell >/dev/null || echo "could not install chromium-headless-shell" >&2
  else
    echo "tests/test_serve.py needs chromium-headless-shell (or chromium) on PATH" >&2
  fi
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the setup is broken" >&2
  exit 1
fi
exit "$rc"
