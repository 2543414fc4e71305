#!/bin/bash
# One command for a lent GPU machine (never run in CI): installs the carried wheels, then
# scripts/gpu_check.py prints one table of numerics, reward-op bandwidth, an OPD step on Qwen3
# shapes and the rollout's decode rate (see its docstring), then scripts/gpu_check_moe.py an MoE
# teacher's scoring time and memory.
#
#   bash scripts/fetch_gpu_wheels.sh          # here, once: the wheels the GPU image lacks -> .whl/
#   bash scripts/gpu_check.sh                 # there (or anywhere: small shapes without CUDA)
#   GPU_CHECK_SMALL=1 bash scripts/gpu_check.sh       # small shapes on a GPU too
#   PYTHON=.venv/bin/python OUT_DIR=runs/gpu_check bash scripts/gpu_check.sh --only a b
#
# On the device machine a session is lent (after fetch_gpu_wheels.sh in the checkout that the tool
# sends): run with command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 540. The
# sections stop starting after --budget (GPU_CHECK_BUDGET_S, 300 s here), and the MoE section is
# cut at GPU_CHECK_MOE_TIMEOUT_S (120 s): under 8 minutes in all, expect 4-6.
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
export GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-300}  # the main table's; the MoE section follows

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PYTHON" "$ROOT/scripts/gpu_check.py" --out-dir "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
# the MoE teacher's section (scripts/gpu_check_moe.py), after the main table, bounded so that the
# whole command stays inside one device call
timeout "${GPU_CHECK_MOE_TIMEOUT_S:-120}" "$PYTHON" "$ROOT/scripts/gpu_check_moe.py" --out-dir "$OUT_DIR" 2>&1 |
    tee "$OUT_DIR/gpu_check_moe.log"
moe=${PIPESTATUS[0]}
((status == 0 && moe == 0)) || exit 1
