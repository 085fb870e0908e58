#!/usr/bin/env bash
# What `--features nccl` needs on top of ../shared/tools/cuda-toolchain.sh: NCCL's library, for
# linking (candle links cudarc's NCCL bindings dynamically, `-lnccl`). It comes from PyPI's
# nvidia-nccl-cu13 wheel, the CUDA 13 build matching the rest of the toolchain.
#
#   eval "$(bash xtask/gpu/nccl-toolchain.sh [DIR])"      # DIR defaults to /opt/cuda13-wheels
#   CARGO_TARGET_DIR=target/cuda cargo build --release -p debiasdd-cli --features nccl
#
# The binary then needs libnccl.so.2 on the GPU machine (PyTorch's CUDA wheels bring one; set
# LD_LIBRARY_PATH to its folder, e.g. .../site-packages/nvidia/nccl/lib).
set -euo pipefail
dir=${1:-/opt/cuda13-wheels}
here=$(cd "$(dirname "$0")" && pwd)
cuda_env=$(bash "$here/../../../shared/tools/cuda-toolchain.sh" "$dir")
"$dir/bin/pip" install -q --disable-pip-version-check nvidia-nccl-cu13==2.30.7 >&2
lib=$(dirname "$(find "$dir"/lib/python3*/site-packages/nvidia -name 'libnccl.so.2' | head -n 1)")
if [ ! -e "$lib/libnccl.so.2" ]; then
    echo "nvidia-nccl-cu13 installed no libnccl.so.2 under $dir" >&2
    exit 1
fi
ln -sf libnccl.so.2 "$lib/libnccl.so"
echo "$cuda_env"
echo "export LIBRARY_PATH=\"\$LIBRARY_PATH:$lib\" DEBIASDD_NCCL_LIB='$lib'"
