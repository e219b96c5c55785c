#!/usr/bin/env bash
# The GPU checks, as one run on a device machine (prepare with scripts/gpu_bundle.sh first):
# golden parity on CUDA (preprocessing, batched decoding and fast kernels on the GPU against the
# official pipeline's outputs), then the bench on a 512x512x200 CT: fp32 with the faithful path
# in the same run, and bf16. Results go to $OUT (the device tool's folder) or build/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export SEGVOL_SHARED="$PWD/.gpu/shared" SEGVOL_TEST_CACHE=/tmp/segvol-cache SEGVOL_TEST_DEVICE=cuda
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_golden.py 2>&1 | tee "$out/golden-cuda.txt"
python3 -m segvol bench --device cuda --shape 512 512 200 --faithful 2>&1 | tee "$out/bench-cuda-fp32.txt"
python3 -m segvol bench --device cuda --shape 512 512 200 --precision bf16 2>&1 | tee "$out/bench-cuda-bf16.txt"
