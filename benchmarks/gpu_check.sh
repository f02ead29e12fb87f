#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine with torch + transformers only (no Ray/vLLM):
# the bf16/fp32 mask equivalence (SDPA, FlexAttention, split) and the 1.1B learner-step ratio.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 200 python benchmarks/learner_step.py --preset 1b --device cuda --repeats 6 --attn split 2>&1 | grep -v "Model config" | tail -4 | tee "$OUT/learner_step_1b_split.txt"
timeout 200 python benchmarks/gpu_equivalence.py --traces 60 2>&1 | grep -v "Model config" | tail -24 | tee "$OUT/equivalence.txt"
# FlexAttention (the current CUDA default; 1.206 on an H200 in an earlier session) on the same machine
timeout 200 python benchmarks/learner_step.py --preset 1b --device cuda --repeats 6 --attn flex 2>&1 | grep -v "Model config" | tail -4 | tee "$OUT/learner_step_1b_flex.txt"
