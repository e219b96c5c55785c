#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what scripts/gpu_check.sh needs on a device machine. That machine
# has torch, numpy, transformers, safetensors and pytest but no network and no ../shared: this
# copies the golden cases, the seeded-checkpoint generator and its inputs, and a nibabel wheel.
# About 28 MB (the device tool carries at most 64 MiB, tree included). Then, with the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SEGVOL_SHARED:-../shared}"
[ -d .gpu ] && chmod -R u+w .gpu && rm -rf .gpu
mkdir -p .gpu/shared/reference .gpu/shared/tools .gpu/whl
cp -r --no-preserve=mode "$shared/reference/clip_tokenizer" "$shared/reference/segvol_state_dict.json" \
    .gpu/shared/reference/
# the golden cases without zoomout_logits.npz, which the tests do not read (3.6 MB a case)
cp -r --no-preserve=mode "$shared/reference/golden" .gpu/shared/reference/
rm .gpu/shared/reference/golden/*/zoomout_logits.npz
cp --no-preserve=mode "$shared/tools/seeded_checkpoint.py" .gpu/shared/tools/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl nibabel==5.4.2
du -sh .gpu
