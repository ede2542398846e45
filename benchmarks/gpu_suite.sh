#!/usr/bin/env bash
# The GPU checks and figures of benchmarks/README.md, in one run on a machine with
# one CUDA GPU (run from the repository root):
#
#   bash benchmarks/gpu_suite.sh [results-folder]                # PART=measure (default)
#   PART=explore bash benchmarks/gpu_suite.sh [results-folder]   # what is not measured yet
#   PART=explore2 bash benchmarks/gpu_suite.sh [results-folder]  # and the rest of it
#
# Each part fits one 10-minute device call; with a 15-minute lease, run explore.
# PART=measure (about 8 minutes, what benchmarks/README.md reports):
# 1. the CUDA tests (tests/test_cuda.py) and the script tests, which then run on the GPU
#    (their slow cases start two processes on the one GPU, which dist_util serves with gloo);
# 2. the issue-8 training target: ours in bf16 with SDPA and torch.compile against the
#    original's fp16 scheme, paper64 config, with model FLOP utilisation;
# 3. NLL at batch size 1 (calc_bpd_loop, 1000 steps): the original, one timestep per
#    call, against ours with --nll_batch in fp32, TF32 and bf16;
# 4. like-for-like training steps (both fp16; both strict fp32).
# PART=explore (at most 9 minutes): the CUDA tests not yet run on a GPU (the TrainLoop's
# two waits per step, the gloo fallback), compiled bf16 training with --channels_last,
# --cudnn_benchmark and --fused_adam against the original's fp16, and eager bf16 with
# the first two, each alone and together.
# PART=explore2 (at most 8 minutes): compiled training in the fp16 scheme, and DDIM
# sampling against the original in fp32 and ours in bf16.
#
# Each step has its own time limit, so a slow one cannot starve the rest, and each
# bench round prints its figures as it finishes. The original package is fetched
# into --cache on first use; set CACHE to a folder holding guided_diffusion_sdk-1.0.0/
# on a machine without network access.
set -u
out=${1:-benchmarks/results/gpu}
py=${PYTHON:-python3}
cache=${CACHE:-$HOME/.cache/guided_diffusion_bench}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# DEVICE=cpu CONFIG=small make a quick dry run of the script itself on a CPU machine.
bench=(benchmarks/bench.py --device "${DEVICE:-cuda}" --config "${CONFIG:-paper64}" --cache "$cache")

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc"
}

part=${PART:-measure}
case $part in
    measure | explore | explore2) ;;
    *) echo "PART must be measure, explore or explore2, got '$part'" >&2; exit 2 ;;
esac

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
  nproc; } 2>&1 | tee "$out/machine.txt"

if [ "$part" = explore ]; then
    step tests_cuda "${T_TESTS:-60}" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_dist_util.py
    # Most telling first: compiled bf16 in channels-last with cuDNN's autotuning and the
    # fused AdamW, then what the layout and the autotuning each bring without the compiler.
    step train_bf16_compile_cl_bench "${T_TRAIN:-360}" "$py" "${bench[@]}" --tasks train --impls original,ours \
        --precision bf16 --original_precision fp16 --compile --channels_last --cudnn_benchmark --fused_adam \
        --flags_for ours --rounds 1 --steps 20 --json "$out/gpu_train_bf16_compile_cl_bench.json"
    for variant in "cl:--channels_last" "bench:--cudnn_benchmark" "cl_bench:--channels_last --cudnn_benchmark"; do
        name=${variant%%:*}
        step "train_bf16_eager_$name" "${T_SAME:-40}" "$py" "${bench[@]}" --tasks train --impls ours \
            --precision bf16 --rounds 1 --steps 20 ${variant#*:} --json "$out/gpu_train_bf16_eager_$name.json"
    done
    exit 0
fi

if [ "$part" = explore2 ]; then
    step train_fp16_compile "${T_TRAIN:-300}" "$py" "${bench[@]}" --tasks train --impls ours --precision fp16 \
        --compile --rounds 1 --steps 20 --json "$out/gpu_train_fp16_compile.json"
    step ddim_fp32 "${T_SAME:-90}" "$py" "${bench[@]}" --tasks ddim --impls original,ours --rounds 1 \
        --json "$out/gpu_ddim_fp32.json"
    step ddim_bf16 "${T_SAME:-90}" "$py" "${bench[@]}" --tasks ddim --impls ours --precision bf16 --rounds 1 \
        --json "$out/gpu_ddim_bf16.json"
    exit 0
fi

step tests "${T_TESTS:-120}" "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_sample_scripts.py tests/test_training_scripts.py tests/test_nll_script.py tests/test_dist_util.py

# Compiling the paper64 training step takes 90-150 s on a 16-core H200 machine.
step train_bf16_compile "${T_TRAIN:-240}" "$py" "${bench[@]}" --tasks train --impls original,ours \
    --precision bf16 --original_precision fp16 --compile --flags_for ours --rounds 1 --steps 20 \
    --json "$out/gpu_train_bf16_compile.json"

step nll_fp32_k100 "${T_NLL:-90}" "$py" "${bench[@]}" --tasks nll --impls original,ours --nll_batch 100 \
    --rounds 1 --json "$out/gpu_nll_k100.json"
for variant in "bf16:--precision bf16" "tf32:--tf32" "fp32_k1:--nll_batch 1"; do
    name=${variant%%:*}
    step "nll_$name" "${T_NLL_OURS:-45}" "$py" "${bench[@]}" --tasks nll --impls ours --nll_batch 100 \
        --rounds 1 ${variant#*:} --json "$out/gpu_nll_$name.json"
done

step train_fp16 "${T_SAME:-45}" "$py" "${bench[@]}" --tasks train --impls original,ours --precision fp16 \
    --rounds 1 --steps 20 --json "$out/gpu_train_fp16.json"
step train_fp32 "${T_SAME:-45}" "$py" "${bench[@]}" --tasks train --impls original,ours --precision fp32 \
    --rounds 1 --steps 10 --json "$out/gpu_train_fp32.json"
step train_bf16_eager "${T_SAME:-45}" "$py" "${bench[@]}" --tasks train --impls ours --precision bf16 \
    --rounds 1 --steps 20 --json "$out/gpu_train_bf16_eager.json"
