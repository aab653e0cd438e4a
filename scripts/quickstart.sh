#!/usr/bin/env bash
# Install composer_clip into .venv, build the demo data set, train the quick-start recipe
# with two processes on the CPU and plot the run's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
.venv/bin/python scripts/prepare_demo_data.py --out data/demo
.venv/bin/composer -n 2 train.py yamls/quickstart.yaml "$@"

# train.py writes runs/<run_name>/metrics.txt unless the recipe sets save_folder or metrics_file.
metrics_file=runs/quickstart/metrics.txt
if [ -f "$metrics_file" ]; then
    echo "Metrics plot: $(.venv/bin/python scripts/plot_metrics.py "$metrics_file")"
else
    echo "No $metrics_file (run_name, save_folder or metrics_file was overridden); plot the run's metrics file with scripts/plot_metrics.py"
fi
