#!/bin/bash
# Download into .whl/ (git-ignored) the wheels that the lent GPU machine's image lacks, for its
# Python 3.12 on x86-64; scripts/gpu_check.sh installs them there with --no-deps.
#
#   bash scripts/fetch_gpu_wheels.sh          # megatron-core at the newest tested version
#   MEGATRON_CORE_VERSION=0.16.1 bash scripts/fetch_gpu_wheels.sh
#   bash scripts/fetch_gpu_wheels.sh --print-version    # the version it would fetch, nothing else
#
# The version: NEWEST_TESTED in megatron_opd/compat/versions.py (the machine's Python 3.12 is the
# newest stack's). What the image lacks: of this project's run-time dependencies (pyproject.toml)
# only megatron-core; torch 2.11, triton, numpy, packaging (megatron-core's own requirements),
# pyyaml, sentencepiece, transformers, tokenizers, safetensors, tensorboard, psutil, tqdm and einops
# are there (the device's KINDS.md). wandb is not, and is imported only with --wandb-project.
# Never add torch or anything depending on it: it would replace the image's CUDA build.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
tested=$(sed -n 's/^OLDEST, NEWEST_TESTED = "[^"]*", "\([^"]*\)"$/\1/p' \
    "$ROOT/megatron_opd/compat/versions.py")
version=${MEGATRON_CORE_VERSION:-$tested}
if [[ -z $version ]]; then
    echo "NEWEST_TESTED not found in megatron_opd/compat/versions.py; set MEGATRON_CORE_VERSION" >&2
    exit 1
fi
if [[ ${1:-} == --print-version ]]; then
    echo "$version"
    exit 0
fi
dest=$ROOT/.whl
mkdir -p "$dest"
rm -f "$dest"/megatron_core-*.whl # one version only: two stop the whole install there
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$dest" "megatron-core==$version"
ls -l "$dest"
du -sh "$dest"
