#!/usr/bin/env bash
# The main job: set up Python 3.11 and run the layer analysis (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup.sh 3.11 | tail -n 1)
exec "$py" examples/layer_analysis.py "$@"
