#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; components that need a GPU print why they skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -ra "$@"
