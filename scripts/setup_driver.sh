#!/usr/bin/env bash
# Create .venv-driver with openeo-driver (the dummy openEO back end the client tests talk to).
# Its own venv: openeo-driver pins pystac~=1.8, which clashes with the project's openeo and
# openeo-processes-dask. Idempotent; fails loudly (the server tests must never be skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
# The pre-release is what the registry offers; pinned so CI and a fresh machine get the same server.
DRIVER="openeo-driver==0.136.0a4"
if .venv-driver/bin/python -c "import openeo_driver.dummy.local_app" 2>/dev/null; then
  exit 0
fi
python3 -m venv .venv-driver
.venv-driver/bin/python -m pip install -q "$DRIVER"
.venv-driver/bin/python -c "import openeo_driver.dummy.local_app"
