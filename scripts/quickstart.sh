#!/usr/bin/env bash
# Install composer_clip into .venv, build the demo data set and train the quick-start
# recipe with two processes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
.venv/bin/python scripts/prepare_demo_data.py --out data/demo
.venv/bin/composer -n 2 train.py yamls/quickstart.yaml "$@"
