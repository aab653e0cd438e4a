#!/usr/bin/env bash
# Install composer_clip with its test extras into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh test
.venv/bin/python -m pytest "$@"
