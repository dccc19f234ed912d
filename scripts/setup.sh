#!/usr/bin/env bash
# Install tetrad and its test tools without ever pulling a CUDA build of torch on a CPU machine.
#   TORCH_SPEC         the torch requirement to install when none is present (default torch==2.13.0)
#   TORCH_INDEX_URL    optional extra index for it, e.g. https://download.pytorch.org/whl/cpu
#   TETRAD_EXTRAS      extras to install (default dev,mpi: tests need pytest and mpiexec)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  spec=${TORCH_SPEC:-torch==2.13.0}
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$PY" -m pip install -q "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "$PY" -m pip install -q "$spec"
  fi
fi
"$PY" -m pip install -q -e ".[${TETRAD_EXTRAS:-dev,mpi}]"
"$PY" -c "import torch, tetrad; print('tetrad', tetrad.__version__, 'on torch', torch.__version__)"
