#!/usr/bin/env bash
# Measure the CUDA training paths of issue 4 on one GPU, in one go, within a time budget.
#
# Usage (from the repository root, on a machine with a CUDA GPU):
#
#     bash simulations/gpu_paths.sh [OUT_DIR] [BUDGET_SECONDS]
#     STEPS=tests,default,kernels bash simulations/gpu_paths.sh OUT 570     # a part (e.g. one 10-minute call)
#     STEPS=cg,profile,other bash simulations/gpu_paths.sh OUT 570          # the rest, in a second call
#
# In order, each step skipped when the budget could not cover it (a cold compile of LaBraM-Base takes about
# 2 minutes, a warm one about 1):
#   1. the GPU tests of the kernels not yet run on a GPU (tests/test_lora_input.py, tests/test_qkv_attention.py);
#   2. the default compiled LoRA step (LaBraM-Base, batch 1024) with bench_train_speed.py;
#   3. the same with the opt-in kernels (FEDEEG_LORA_INPUT_KERNEL=1 FEDEEG_QKV_ATTENTION=1);
#   4. both again with CUDA graphs (--compile-mode reduce-overhead);
#   5. a profile (simulations/profile_train_step.py) of the opt-in kernels;
#   6. the other GPU tests (attention, fused LoRA Linear, GEMM patch embedding, tests/test_gpu.py).
# STEPS (default all) names the steps to run: tests, default, kernels, cg (both step 4 runs), profile, other.
# Every log and result lands in OUT_DIR (default simulations/results/gpu-paths); the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-simulations/results/gpu-paths}
BUDGET=${2:-1500}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
STEPS=${STEPS:-tests,default,kernels,cg,profile,other}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
fits() { [ $(( $(date +%s) - t0 + $1 )) -le "$BUDGET" ] || { echo "skipped (budget): $2"; return 1; }; }
left() { echo $(( BUDGET - ($(date +%s) - t0) - 5 )); }
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

KERNELS="FEDEEG_LORA_INPUT_KERNEL=1 FEDEEG_QKV_ATTENTION=1"
B="python3 simulations/bench_train_speed.py --device cuda --batch-sizes 1024 --steps 20 --warmup 5 --loops ours --modes lora --out $OUT"

want tests && fits 150 "new-kernel tests" && {
    timeout 150 python3 -m pytest tests/test_lora_input.py tests/test_qkv_attention.py -m gpu -q -p no:cacheprovider \
        > "$OUT/tests_new_kernels.log" 2>&1
    echo "new-kernel GPU tests: rc $? ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/tests_new_kernels.log")"
}
run() {  # tag, limit, env..., -- bench args
    local tag=$1 limit=$2; shift 2
    local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    fits "$limit" "$tag" || return
    env "${envs[@]}" timeout "$limit" $B --tag "$tag" "$@" > "$OUT/train_$tag.log" 2>&1
    echo "$tag: rc $? ($(( $(date +%s) - t0 )) s): $(grep -E '^lora ' "$OUT/train_$tag.log" | tail -1)"
}
want default && run default 200 X=1 -- --compile
want kernels && run kernels 200 $KERNELS -- --compile
want cg && run default-cg 160 X=1 -- --compile-mode reduce-overhead
want cg && run kernels-cg 160 $KERNELS -- --compile-mode reduce-overhead
want profile && fits 200 profile && {
    env $KERNELS timeout 200 python3 simulations/profile_train_step.py --out "$OUT" --tag kernels > "$OUT/profile_kernels.log" 2>&1
    echo "profile: rc $? ($(( $(date +%s) - t0 )) s)"; head -9 "$OUT/kernels_kernels.txt" 2>/dev/null
}
L=$(left); want other && [ "$L" -gt 60 ] && {
    timeout "$L" python3 -m pytest tests/test_short_attention.py tests/test_lora_fused.py tests/test_patch_gemm.py \
        tests/test_gpu.py -m gpu -q -p no:cacheprovider > "$OUT/tests_other.log" 2>&1
    echo "other GPU tests: rc $? ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/tests_other.log")"
}
echo
cat "$OUT"/bench_train_speed_*.md 2>/dev/null | grep -E "^\| lora" || true
