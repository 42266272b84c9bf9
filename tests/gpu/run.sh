#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU: set up flexrank if needed, install the gpu extra
# (flash-attn, liger-kernel) if missing, then run the `gpu`-marked tests (skip reasons shown with -rs).
# Usage: tests/gpu/run.sh [extra pytest args]; PYTHON=/path/to/python to use another environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then
    # setup.sh installs torch from PyPI (a CUDA build on Linux x86_64 unless FLEXRANK_TORCH says otherwise).
    [ -x .venv/bin/python ] || ./setup.sh
    PYTHON=.venv/bin/python
fi
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    'no CUDA device visible to ' + torch.__version__ + ': run this on a GPU machine with a CUDA build of torch')"
if ! "$PYTHON" -c "import flash_attn, liger_kernel" 2>/dev/null; then
    # flash-attn builds against the installed torch: no build isolation (a prebuilt wheel is used when one matches).
    "$PYTHON" -m pip install -q packaging ninja wheel
    "$PYTHON" -m pip install --no-build-isolation flash-attn
    "$PYTHON" -m pip install -q -e '.[gpu,quant,dev]'
fi
"$PYTHON" -m flexrank prepare >/dev/null   # the bundled tokenizer the tiny test models use
exec "$PYTHON" -m pytest -m gpu -v -rs tests/gpu "$@"
