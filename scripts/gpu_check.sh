#!/bin/bash
# One command for a lent GPU machine (never run in CI): installs the carried wheels, then
# scripts/gpu_check.py prints one table of numerics, reward-op bandwidth, an OPD step on Qwen3
# shapes and the rollout's decode rate (see its docstring).
#
#   bash scripts/fetch_gpu_wheels.sh          # here, once: the wheels the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh                 # there (or anywhere: small shapes without CUDA)
#   GPU_CHECK_SMALL=1 bash scripts/gpu_check.sh       # small shapes on a GPU too
#   PYTHON=.venv/bin/python OUT_DIR=runs/gpu_check bash scripts/gpu_check.sh --only a b
#
# On the device machine a session is lent (after fetch_gpu_wheels.sh in the checkout that the tool
# sends): run with command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 480. The
# sections stop starting after --budget (GPU_CHECK_BUDGET_S, default 360 s); expect 3-5 minutes.
#
# Wheels: every .whl/*.whl built for this Python (its cpXY tag, or py3-none-any) is installed with
# --no-deps into GPU_CHECK_SITE (default /tmp/site), which goes first on PYTHONPATH; nothing is
# installed when none matches (here, where the venv already has megatron-core). Output: the table
# and gpu_check.json under $OUT (the device tool's folder), else $OUT_DIR, else a new temporary
# directory, with the whole log as gpu_check.log. Exit status: 1 if any section failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-${OUT_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}}
mkdir -p "$OUT_DIR"

tag=$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') || exit 1
wheels=()
for w in "$ROOT"/.whl/*.whl; do
    case $(basename "$w") in
    *-"$tag"-*.whl | *-py3-none-any.whl) wheels+=("$w") ;;
    esac
done
if ((${#wheels[@]})); then
    site=${GPU_CHECK_SITE:-/tmp/site}
    echo "installing ${#wheels[@]} carried wheel(s) into $site: ${wheels[*]##*/}"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}" || exit 1
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
elif compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    echo "no carried wheel is built for this Python ($tag): none installed"
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PYTHON" "$ROOT/scripts/gpu_check.py" --out-dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
