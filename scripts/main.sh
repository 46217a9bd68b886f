#!/usr/bin/env bash
# The main job on embedded defaults: set up, then train (local Ray in-process, CPU, offline tiny
# model, generated data, sqlite MLflow in the run dir): generate data -> baseline eval -> CMA on
# 2 DeepSpeed learners -> eval -> Refine-RL (rollout workers, anchor reward actor, the same learners)
# -> final eval -> MLflow model. Extra args go to `rime train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rime train configs/tiny-cpu.yaml --overwrite "$@"
