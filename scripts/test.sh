#!/usr/bin/env bash
# Set up, then run the whole test suite (CPU only; components that need a GPU print why they skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# vLLM (CPU build) for the rollout backend's real-engine tests, in its own venv (docs/decisions.md §1).
# Optional: if it cannot be installed here, those tests skip and say why; everything else still runs.
bash scripts/setup_vllm.sh || echo "[test] .venv-vllm could not be set up: the vLLM backend tests will skip (see above)"
export RAY_AUTH_MODE=disabled
exec .venv/bin/python -m pytest -ra --durations=15 "$@"
