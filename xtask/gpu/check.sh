#!/usr/bin/env bash
# The GPU check in one call, for a lent GPU machine (no Rust, no internet there): prints the card,
# distils a short quick-preset run on the CPU, on the GPU in full f32 and on the GPU with TF32
# matmuls, and puts their per-iteration losses side by side, then times paper-size DC iterations
# (width 128, ipc 10, loops 10/50, real batch 256) class-wise and group-wise on the GPU, with TF32
# off and on, and the same iteration in PyTorch on the same GPU
# (`xtask/bench/torch_reference.py --paper-iteration --device cuda`, with the machine's own
# python3 and torch). The official DC code on an H200 takes 2.77 s and 13.4 s per such iteration
# (protocol §4).
#
# Prepare here with `bash xtask/gpu/prepare.sh` (the CUDA build, stripped and gzipped, and the
# MNIST files, under target/gpu-carry), then run it there with carry = ["target/gpu-carry"]:
#   bash xtask/gpu/check.sh
# $OUT gets four files (the device tool brings back at most eight): check.log (what it prints),
# histories.txt (every run's per-iteration JSON lines, each prefixed by the run's name),
# torch.json (the PyTorch timings) and gpu-memory.csv (nvidia-smi's memory.used every 0.5 s).
# Datasets and synthetic sets go to $WORK.
#
# Every timed run gets a share of what is left before DEADLINE seconds (default 480) and is
# stopped with Ctrl-C (SIGINT) when it outlasts it; the iterations it finished stay in its
# history, so a slow card still reports something for every run. On an H100 the whole check took
# 132 s with COMPARE=1 and 105 s with COMPARE=0 (plus about 90 s for the machine's start).
#
# Settings (environment): CARRY, BIN (default: unpacked from $CARRY), MNIST, OUT, WORK, DEVICE
# (cuda), ITERATIONS (2; the first includes start-up), PRESET (paper; `quick` lets the script
# itself be tried on a CPU machine with DEVICE=cpu), TF32 (which settings to time: "off on";
# TF32 has no effect on the CPU), DEADLINE, TORCH (1; 0 skips PyTorch), PYTHON (python3),
# COMPARE (1: also the short run and a class-wise paper run with DEBIASDD_CONV_PATH=candle, the
# candle-conv path that CUDA builds took before the im2col kernels, and a class-wise paper run
# with DEBIASDD_FUSED_NORM=off; 0 skips them).
set -euo pipefail

CARRY=${CARRY:-target/gpu-carry}
BIN=${BIN:-}
MNIST=${MNIST:-$CARRY/mnist}
OUT=${OUT:-/tmp/debiasdd-gpu-check}
WORK=${WORK:-/tmp/debiasdd-gpu-work}
DEVICE=${DEVICE:-cuda}
ITERATIONS=${ITERATIONS:-2}
PRESET=${PRESET:-paper}
TF32=${TF32:-off on}
DEADLINE=${DEADLINE:-480}
TORCH=${TORCH:-1}
PYTHON=${PYTHON:-python3}
COMPARE=${COMPARE:-1}
export MIMALLOC_PURGE_DELAY=-1
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/check.log") 2>&1
if [ -z "$BIN" ]; then
    BIN=/tmp/debiasdd-gpu-check-bin
    gunzip -c "$CARRY/debiasdd.gz" > "$BIN"
    chmod +x "$BIN"
    echo "binary built from commit $(cat "$CARRY/commit" 2>/dev/null || echo unknown)"
fi
# The CUDA libraries the binary links (cuBLAS, cuRAND, the runtime) may sit outside the loader's
# path, in the CUDA toolkit or in the Python wheels of the image: find each one that is missing.
if ldd "$BIN" | grep -q "not found"; then
    for lib in $(ldd "$BIN" | awk '/not found/ {print $1}'); do
        found=$(find /usr/local/cuda*/ /usr/lib /opt -name "$lib" -print -quit 2>/dev/null || true)
        if [ -n "$found" ]; then export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
    done
fi
ldd "$BIN" | grep -E "cu|not found" || true
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv -lms 500 > "$OUT/gpu-memory.csv" 2>&1 &
    smi=$!
    trap 'kill "$smi" 2> /dev/null || true' EXIT
fi

losses() { grep -o '"loss":[^,}]*' "$1" | cut -d: -f2 | tr '\n' ' '; }
seconds() { grep -o '"seconds":[^,}]*' "$1" | cut -d: -f2 | tr '\n' ' '; }
# Per iteration: real gradients / matching loss and update / inner-loop training, in seconds.
phases() {
    sed -E 's/.*"real_seconds":([^,}]*).*"synthetic_seconds":([^,}]*).*"inner_seconds":([^,}]*).*/\1 \/ \2 \/ \3/' "$1" |
        tr '\n' ';'
}
keep_history() { if [ -f "$WORK/$1.jsonl" ]; then sed "s/^/$1 /" "$WORK/$1.jsonl" >> "$OUT/histories.txt"; fi; }
# Seconds for the next run: its weight's share of what is left before DEADLINE, among the
# weights of the runs still to come (at least 20).
share() {
    local left=$((DEADLINE - SECONDS))
    local s=$((left * $1 / $2))
    if [ "$s" -lt 20 ]; then s=20; fi
    echo "$s"
}
# Runs the binary under a time limit; a stopped run is reported, not fatal.
timed() {
    local limit=$1
    shift
    local rc=0
    timeout -s INT -k 20 "$limit" "$BIN" "$@" 2>&1 | tail -n 1 || rc=$?
    if [ "$rc" -ne 0 ]; then echo "(stopped or failed after at most ${limit} s, exit $rc)"; fi
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "(no nvidia-smi)"
nproc
"$BIN" --version

echo "== Colored MNIST, seed preset, ratio 0.1"
data="$WORK/seed-ratio0.1-seed0.safetensors"
"$BIN" generate --mnist-dir "$MNIST" --ratio 0.1 --out "$data"

tf32_flag() { if [ "$1" = on ]; then echo --tf32; fi; }

echo "== CPU vs $DEVICE: quick preset, group-wise, 2 iterations (TF32 on $DEVICE: $TF32)"
# A run is device:tf32:variant; the variant sets DEBIASDD_CONV_PATH / DEBIASDD_FUSED_NORM.
variant_env() {
    case "$1" in
        candle) echo DEBIASDD_CONV_PATH=candle ;;
        unfused) echo DEBIASDD_FUSED_NORM=off ;;
        *) echo DEBIASDD_VARIANT=default ;;
    esac
}
runs="cpu:off:default"
for t in $TF32; do runs="$runs $DEVICE:$t:default"; done
if [ "$COMPARE" = 1 ]; then runs="$runs $DEVICE:off:candle"; fi
for run in $runs; do
    IFS=: read -r dev t variant <<< "$run"
    name="short-${dev}-tf32$t-$variant"
    rm -f "$WORK/$name".*
    (
        export "$(variant_env "$variant")"
        timed 120 distill $(tf32_flag "$t") --data "$data" --preset quick --mode group \
            --iterations 2 --device "$dev" --out "$WORK/$name.safetensors" \
            --history "$WORK/$name.jsonl"
    )
    keep_history "$name"
    echo "losses on $dev, TF32 $t, $variant: $(losses "$WORK/$name.jsonl")"
done

# The timed runs in order, as tf32-mode-variant:weight (a group-wise iteration costs about three
# class-wise ones); PyTorch after the first TF32 setting's pair.
plan=""
first=1
for t in $TF32; do
    plan="$plan $t-class-default:1 $t-group-default:3"
    if [ "$first" = 1 ] && [ "$TORCH" = 1 ]; then plan="$plan torch:3"; fi
    first=0
done
if [ "$TORCH" = 1 ] && [ -z "$TF32" ]; then plan="$plan torch:3"; fi
if [ "$COMPARE" = 1 ]; then plan="$plan off-class-unfused:2 off-class-candle:2"; fi
weights_left=0
for step in $plan; do weights_left=$((weights_left + ${step##*:})); done

echo "== $PRESET preset on $DEVICE, $ITERATIONS iterations per mode (seconds per iteration); deadline ${DEADLINE} s, now ${SECONDS} s"
for step in $plan; do
    what=${step%:*} weight=${step##*:}
    limit=$(share "$weight" "$weights_left")
    weights_left=$((weights_left - weight))
    if [ "$what" = torch ]; then
        echo "PyTorch $($PYTHON -c 'import torch; print(torch.__version__)' 2> /dev/null), the same iteration on $DEVICE (up to $limit s):"
        rc=0
        timeout -s INT -k 20 "$limit" "$PYTHON" xtask/bench/torch_reference.py --paper-iteration \
            --device "$DEVICE" --runs 1 --warmup 1 > "$OUT/torch.json" || rc=$?
        if [ "$rc" -ne 0 ]; then echo "(PyTorch stopped or failed after at most $limit s, exit $rc)"; fi
        continue
    fi
    IFS=- read -r t mode variant <<< "$what"
    name="$PRESET-$mode-tf32$t-$variant"
    rm -f "$WORK/$name".*
    (
        export "$(variant_env "$variant")"
        timed "$limit" distill $(tf32_flag "$t") --data "$data" --preset "$PRESET" --mode "$mode" \
            --iterations "$ITERATIONS" --device "$DEVICE" --out "$WORK/$name.safetensors" \
            --history "$WORK/$name.jsonl"
    )
    keep_history "$name"
    echo "$mode, TF32 $t, $variant (up to $limit s): seconds $(seconds "$WORK/$name.jsonl" 2>/dev/null)"
    echo "    real / synthetic / inner: $(phases "$WORK/$name.jsonl" 2>/dev/null)"
done
echo "== done after ${SECONDS} s"
if [ -s "$OUT/gpu-memory.csv" ]; then
    echo "most GPU memory in use: $(awk -F', ' 'NR > 1 {gsub(/ MiB/, "", $2); if ($2 + 0 > m) m = $2 + 0} END {print m}' "$OUT/gpu-memory.csv") MiB"
fi
