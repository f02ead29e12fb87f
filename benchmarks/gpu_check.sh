#!/usr/bin/env bash
# Every GPU check in one command, for a lent GPU machine with torch + transformers only (no Ray, vLLM or
# pydantic): about 6 minutes on one H100, each step under its own timeout so one hang cannot eat the rest.
#   1. mask equivalence, fp32 and bf16, dense SDPA / FlexAttention / split, packed rows, the chunked loss
#   2. the 1.1B learner step (FlexAttention + packing + chunked loss) over HF's MLE step (flash SDPA,
#      chunked cross-entropy), and the same with attn=split
#   3. peak GPU memory of the 1.1B SequenceMatch step with the chunked loss over HF's MLE step (labels
#      passed to the model) and over the chunked MLE step, L=2048, B=4
#   4. the LoRA learner step in bf16 on the 1.1B Llama (r=64, alpha=16, the <bkspc> rows), and the QLoRA
#      step (NF4 base) where bitsandbytes imports: set BNB_WHEEL=path/to/bitsandbytes.whl to install a
#      carried wheel first (it is not on the lent image); benchmarks/lora_step.py checks as it times
# Not here: the NCCL transport's learner side to a receiver on the *same* GPU (NCCL refuses two ranks on
# one device: it needs two GPUs).
# Output: every figure as one `name: value` line, collected at the end under "== figures ==".
#     bash benchmarks/gpu_check.sh            # OUT=/tmp/gpu_check by default; logs per step there
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_check}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

run() {  # name timeout_s command...: the command's output to $OUT/name.txt, its last lines shown
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v "Model config" "$OUT/$name.txt" | tail -6
  [ $rc -eq 0 ] || echo "$name: FAILED (exit $rc; see $OUT/$name.txt)"
}

run equivalence 150 python benchmarks/gpu_equivalence.py --traces 40
run learner_step_1b_flex 110 python benchmarks/learner_step.py --preset 1b --device cuda --attn flex --repeats 4
run learner_step_1b_split 90 python benchmarks/learner_step.py --preset 1b --device cuda --attn split --repeats 4
run learner_memory_1b 120 python benchmarks/learner_memory.py --model 1b --device cuda --lengths 2048 --batch 4 \
  --steps 2 --cases mle mle_chunked sm_chunked
[ -n "${BNB_WHEEL:-}" ] && pip install --no-deps -q "$BNB_WHEEL"
run lora_step_1b 180 python benchmarks/lora_step.py --preset 1b --device cuda --steps 4

echo "== figures =="
for f in equivalence learner_step_1b_flex learner_step_1b_split learner_memory_1b lora_step_1b; do
  grep -E "^[a-z0-9_]+: [-0-9.e+]+$" "$OUT/$f.txt" 2>/dev/null | sed "s/^/${f}\//"
done | tee "$OUT/figures.txt"
# issue 23's transfer regime, ~25M Llama (benchmarks/arith_gpu.py, < 10 min more): opt in with ARITH_GPU=1
[ -n "${ARITH_GPU:-}" ] && run arith_gpu 600 python benchmarks/arith_gpu.py --out "$OUT/arith_gpu" --budget-minutes 9
