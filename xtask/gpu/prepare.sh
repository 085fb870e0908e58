#!/usr/bin/env bash
# Builds what xtask/gpu/check.sh needs on a lent GPU machine and packs it under one carried
# folder, small enough for the device tool (64 MiB in all): the CUDA build of `debiasdd`,
# stripped and gzipped (about 14 MB; 140 MB with line tables), and the four MNIST .gz files.
#
#   bash xtask/gpu/prepare.sh [MNIST_DIR]     # MNIST_DIR defaults to ../shared/data/mnist
#   then on the GPU machine, carry = ["target/gpu-carry"]:  bash xtask/gpu/check.sh
#
# The first CUDA build takes about 25 minutes on 2 cores (candle's kernels through nvcc); later
# ones recompile the workspace's crates only (under a minute).
set -euo pipefail
cd "$(dirname "$0")/../.."
mnist=${1:-../shared/data/mnist}
carry=target/gpu-carry
eval "$(../shared/tools/cuda-toolchain.sh)"
CARGO_TARGET_DIR=target/cuda cargo build --release -p debiasdd-cli --features debiasdd-cli/cuda
rm -rf "$carry" && mkdir -p "$carry/mnist"
strip -o "$carry/debiasdd" target/cuda/release/debiasdd
gzip -9 "$carry/debiasdd"
for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    if [ -f "$mnist/$f.gz" ]; then cp "$mnist/$f.gz" "$carry/mnist/"; else gzip -9 -c "$mnist/$f" > "$carry/mnist/$f.gz"; fi
done
git rev-parse HEAD > "$carry/commit"
du -sh "$carry"
