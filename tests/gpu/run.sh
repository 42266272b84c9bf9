#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU and no network: the `gpu`-marked tests (skip reasons
# shown with -rs). Installs nothing: an optional package that is missing (flash-attn, liger-kernel, bitsandbytes,
# DeepSpeed) is reported here and its tests skip, saying why. Runs offline (HF_HUB_OFFLINE=1, no pip index).
# Usage: tests/gpu/run.sh [extra pytest args]; PYTHON=/path/to/python to use another environment than .venv.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "tests/gpu/run.sh: no Python environment at $PYTHON: set one up first (./setup.sh, with network), or" \
         "point PYTHON at one" >&2
    exit 2
fi
# Offline: nothing from the Hub, no kernels fetched from Hub repositories (transformers' `kernels` integration),
# no package index.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 USE_HUB_KERNELS=NO PIP_NO_INDEX=1
"$PYTHON" - <<'PY' || exit 2
import importlib, importlib.metadata as md, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
for module, dist, tests in (("flash_attn", "flash-attn", "flash-attn attention"),
                            ("liger_kernel", "liger-kernel", "liger kernel"),
                            ("bitsandbytes", "bitsandbytes", "QLoRA NF4 on CUDA"),
                            ("deepspeed", "deepspeed", "1-GPU ZeRO-3")):
    try:
        importlib.import_module(module)
        print(f"  {dist}: {md.version(dist)}")
    except Exception as exc:
        print(f"  {dist}: missing ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
              f" -> the {tests} tests skip (nothing is installed here)")
if not torch.cuda.is_available():
    sys.exit(f"tests/gpu/run.sh: no CUDA device visible to torch {torch.__version__}: run this on a GPU machine "
             "with a CUDA build of torch (the gpu tests skip on CPU: pytest -m gpu tests/gpu -rs)")
print(f"  GPU: {torch.cuda.get_device_name()} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))})")
PY
# The bundled tokenizer and data the tiny test models use, from the flexrank cache that set-up filled.
if ! "$PYTHON" -m flexrank prepare >/dev/null; then
    echo "tests/gpu/run.sh: 'flexrank prepare' failed offline: the flexrank cache (\$FLEXRANK_CACHE, default" \
         "~/.cache/flexrank) lacks the bundled model or data; run ./setup.sh once where there is network" >&2
    exit 2
fi
exec "$PYTHON" -m pytest -m gpu -v -rs tests/gpu "$@"
