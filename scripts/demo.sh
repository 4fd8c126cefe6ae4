#!/usr/bin/env bash
# Set up, then compress and decompress a real Sentinel-2 scene with the shipped model:
# prints CF and PSNR and writes out/<scene>_quicklook.png. Pass a 10-band GeoTIFF to use your own.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m corsa.app.demo "$@"
