#!/usr/bin/env bash
# The GPU check in one call, for a lent GPU machine (no Rust, no internet there): prints the card,
# distils a short quick-preset run on the CPU, on the GPU in full f32 and on the GPU with TF32
# matmuls, and puts their per-iteration losses side by side, then times paper-size DC iterations
# (width 128, ipc 10, loops 10/50, real batch 256) class-wise and group-wise on the GPU, with TF32
# off and on. The official DC code on an H200 takes 2.77 s and
# 13.4 s per such iteration (protocol §4).
#
# Prepare here with `bash xtask/gpu/prepare.sh` (the CUDA build, stripped and gzipped, and the
# MNIST files, under target/gpu-carry), then run it there with carry = ["target/gpu-carry"]:
#   bash xtask/gpu/check.sh
# The per-iteration histories (JSON lines) and a copy of what it prints go to $OUT (the device
# tool brings that folder back); datasets and synthetic sets to $WORK.
#
# Settings (environment): CARRY, BIN (default: unpacked from $CARRY), MNIST, OUT, WORK, DEVICE
# (cuda), ITERATIONS (3; the first includes start-up), PRESET (paper; `quick` lets the script
# itself be tried on a CPU machine with DEVICE=cpu), TF32 (which settings to time: "off on";
# TF32 has no effect on the CPU).
set -euo pipefail

CARRY=${CARRY:-target/gpu-carry}
BIN=${BIN:-}
MNIST=${MNIST:-$CARRY/mnist}
OUT=${OUT:-/tmp/debiasdd-gpu-check}
WORK=${WORK:-/tmp/debiasdd-gpu-work}
DEVICE=${DEVICE:-cuda}
ITERATIONS=${ITERATIONS:-3}
PRESET=${PRESET:-paper}
TF32=${TF32:-off on}
export MIMALLOC_PURGE_DELAY=-1
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/check.log") 2>&1
if [ -z "$BIN" ]; then
    BIN=/tmp/debiasdd-gpu-check-bin
    gunzip -c "$CARRY/debiasdd.gz" > "$BIN"
    chmod +x "$BIN"
    echo "binary built from commit $(cat "$CARRY/commit" 2>/dev/null || echo unknown)"
fi

losses() { grep -o '"loss":[^,}]*' "$1" | cut -d: -f2 | tr '\n' ' '; }
seconds() { grep -o '"seconds":[^,}]*' "$1" | cut -d: -f2 | tr '\n' ' '; }
# Per iteration: real gradients / matching loss and update / inner-loop training, in seconds.
phases() {
    sed -E 's/.*"real_seconds":([^,}]*).*"synthetic_seconds":([^,}]*).*"inner_seconds":([^,}]*).*/\1 \/ \2 \/ \3/' "$1" |
        tr '\n' ';'
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
runs="cpu:off"
for t in $TF32; do runs="$runs $DEVICE:$t"; done
for run in $runs; do
    dev=${run%:*} t=${run##*:} name="short-${dev//:/}-tf32$t"
    rm -f "$OUT/$name".* "$WORK/$name".*
    "$BIN" distill $(tf32_flag "$t") --data "$data" --preset quick --mode group --iterations 2 \
        --device "$dev" --out "$WORK/$name.safetensors" --history "$OUT/$name.jsonl" 2>&1 | tail -n 1
    echo "losses on $dev, TF32 $t: $(losses "$OUT/$name.jsonl")"
done

echo "== $PRESET preset on $DEVICE, $ITERATIONS iterations per mode (seconds per iteration)"
for t in $TF32; do
    for mode in class group; do
        name="$PRESET-$mode-tf32$t"
        rm -f "$OUT/$name".* "$WORK/$name".*
        "$BIN" distill $(tf32_flag "$t") --data "$data" --preset "$PRESET" --mode "$mode" \
            --iterations "$ITERATIONS" --device "$DEVICE" --out "$WORK/$name.safetensors" \
            --history "$OUT/$name.jsonl" 2>&1 | tail -n 1
        echo "$mode, TF32 $t: seconds $(seconds "$OUT/$name.jsonl")"
        echo "    real / synthetic / inner: $(phases "$OUT/$name.jsonl")"
    done
done
