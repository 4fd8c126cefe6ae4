#!/usr/bin/env bash
# Create .venv-udf38: the oldest UDF runtime openeo-geopyspark-driver still offers (Python 3.8 with the
# numpy and xarray its setup.py pins there), for the test that runs the UDF on it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv-udf38/bin/python -c "import openeo.udf, onnxruntime, xarray" 2>/dev/null; then
  exit 0
fi
PY38=python3.8
if ! "$PY38" --version >/dev/null 2>&1 && command -v pyenv >/dev/null; then   # a pyenv shim needs its version
  PY38="$(pyenv root)/versions/$(pyenv versions --bare | grep -E '^3\.8(\.|$)' | tail -1)/bin/python3.8"
fi
if ! "$PY38" --version >/dev/null 2>&1; then
  echo "setup_udf38.sh: no Python 3.8 on this machine (python3.8 or pyenv 3.8.x)" >&2
  exit 1
fi
"$PY38" -m venv .venv-udf38
.venv-udf38/bin/python -m pip install -q "numpy==1.22.4" "xarray~=0.16.2" "pandas<2" onnxruntime openeo
