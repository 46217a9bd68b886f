#!/usr/bin/env bash
# The main job on embedded defaults: set up, then run it (local, CPU, offline tiny model, generated data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rime quickstart "$@"
