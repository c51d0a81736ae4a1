#!/usr/bin/env bash
# Issue 9's GPU checks as one prepared command for a lent GPU machine (README: Fast step):
#   bash bench/gpu_check.sh            # log in $OUT/gpu_check.txt ($OUT, else /tmp/ramda_gpu)
# About 10 minutes on one H200 (python3 there holds torch and triton; nothing else is needed):
#   1. the Triton kernels compiled and run on CUDA: the self-test of backend="auto" (PG and exact
#      steps of a tiny model against the torch step);
#   2. bench/optimizer_step.py on Llama-7B-shaped layers (d = 4096, 4 blocks, 805M parameters):
#      RAMDA+exact / PG on Triton and torch against AdamW(fused) (target: exact <= 2x fused);
#   3. bench/train_step.py on a Llama of 2048 hidden, 8 layers: whole training steps with
#      backend="auto" against AdamW (target <= 1.1x).
# Each part has its own timeout, so a failure in one still leaves the others' output.
set -uo pipefail
OUT=${OUT:-/tmp/ramda_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
py=${PYTHON:-python3}
{
  nvidia-smi -L
  $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 180 $py -c "import torch; from ramda_ds.kernels.selftest import check; \
print('Triton self-test (PG and exact vs the reference solvers on cuda):', check('triton', torch.device('cuda')))"
  timeout 240 $py bench/optimizer_step.py --device cuda --blocks 4 --d-model 4096 --steps 5 \
    --no-count --only "AdamW(fused),RAMDA+exact,RAMDA+exact triton,RAMDA+PG triton,MADGRAD triton"
  timeout 240 $py bench/train_step.py --device cuda --model llama --llama-hidden 2048 \
    --llama-layers 8 --llama-intermediate 5504 --llama-heads 16 --vocab 32000 --batch 8 \
    --llama-seq 512 --steps 10 --warmup 3 --only "RAMDA+PG auto" "RAMDA+exact auto" "MADGRAD auto"
} 2>&1 | tee "$OUT/gpu_check.txt"
