#!/usr/bin/env bash
# The checks that need a GPU, as one script (run it where `nvidia-smi` works, from the repository root, with the
# project installed): the contract matrix's fit / placement / trainable / decoding rows with the fits on CUDA,
# the Triton kernel tests (skipped on a CPU), and batched-generation throughput on SmolLM2 (issue 13's 10x:
# read the wall columns). Results go to ${OUT:-gpu_check}/.
set -uo pipefail
OUT=${OUT:-gpu_check}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
ZOO_TEST_ACCELERATOR=cuda python -m pytest -q -p no:cacheprovider tests/test_contract.py \
    -k "fit or placement or trainable or decoding" 2>&1 | tail -n 30 | tee "$OUT/contract_cuda.txt"
python -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -n 15 | tee "$OUT/kernels.txt"
python -m zoo.harness.generation_throughput --model smollm2-135m --task chain_sum --n 64 \
    --batch-sizes 1,16,64 --max-new-tokens 96 --device cuda --json "$OUT/throughput.json" \
    | tee "$OUT/throughput.md"
