#!/bin/bash
# GPU smoke test and figures for a machine with NVIDIA GPUs (never run in CI: there is no GPU).
#
#   bash scripts/gpu_check.sh                 # from the checkout, with the package's dependencies
#   PYTHON=.venv/bin/python OUT_DIR=runs/gpu_check bash scripts/gpu_check.sh
#
# In order, stopping at the first failure:
#   1. nvidia-smi, torch's view of the GPUs (CUDA, NCCL, bf16 support)
#   2. transformer-engine imports and megatron_opd.models.layer_spec picks the TE spec
#   3. a small Qwen3 GPTModel in bf16 on the TE spec: forward + backward, finite, timed
#   4. the dynamic inference engine when flash-attn is installed (else says why it is skipped):
#      greedy rollouts against the static engine's, then a short OPD run with it
#   5. a short OPD run: tiny teacher/student from tests/opd_setup.make_pair, torchrun
#      pretrain_opd.py for STEPS steps with --bf16, checkpoint written, per-step figures
#   6. scripts/bench_reward_op.py, scripts/bench_opd_step.py and scripts/bench_e2e.py, when present,
#      with their tables (flags from BENCH_REWARD_OP_ARGS / BENCH_OPD_STEP_ARGS / BENCH_E2E_ARGS)
# Everything printed also goes to OUT_DIR/gpu_check.log (OUT_DIR defaults to a new temp dir).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-5}
OUT_DIR=${OUT_DIR:-$(mktemp -d -t gpu_check.XXXXXX)}
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONWARNINGS=ignore

section() { printf '\n=== %s ===\n' "$*"; }

step_gpus() {
    section "1. GPUs"
    if ! command -v nvidia-smi >/dev/null; then
        echo "nvidia-smi not found: this check is for machines with NVIDIA GPUs" >&2
        return 1
    fi
    nvidia-smi
    "$PYTHON" - <<'EOF'
import torch

assert torch.cuda.is_available(), "torch sees no GPU (CPU-only torch build, or no driver?)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL "
      f"{'.'.join(map(str, torch.cuda.nccl.version()))}, cuDNN {torch.backends.cudnn.version()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
assert torch.cuda.is_bf16_supported(), "this GPU has no bf16"
EOF
}

step_te_spec() {
    section "2. transformer-engine layer spec"
    "$PYTHON" - <<'EOF'
from importlib.metadata import version

import transformer_engine.pytorch  # noqa: F401  (fails here if TE is missing or broken)
from megatron.core.extensions import transformer_engine as te_ext

from megatron_opd import compat, models

print(f"transformer-engine {version('transformer_engine')}, megatron-core "
      f"{compat.megatron_core_version()}")
assert compat.transformer_engine_available(), "compat.transformer_engine_available() is False"
arch = models.ArchConfig(model_type="qwen3", vocab_size=1024, hidden_size=256,
                         intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
attn = models.layer_spec(arch).submodules.self_attention.submodules
qkv, core = attn.linear_qkv, attn.core_attention
print(f"layer_spec: linear_qkv={qkv.__name__}, core_attention={core.__name__}")
assert qkv is te_ext.TELayerNormColumnParallelLinear, qkv
assert core is te_ext.TEDotProductAttention, core
EOF
}

step_bf16_model() {
    section "3. small Qwen3 model in bf16 (TE spec)"
    "$PYTHON" - <<'EOF'
import time

import torch

from megatron_opd import compat, distributed, models

distributed.initialize()  # a world of one, NCCL
try:
    device = compat.default_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    arch = models.ArchConfig(model_type="qwen3", vocab_size=32000, hidden_size=1024,
                             intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
                             num_key_value_heads=8, head_dim=64)
    config = models.transformer_config(arch, dtype=torch.bfloat16)
    (model,) = models.build_model(arch, config)
    params = sum(p.numel() for p in model.parameters())
    b, s = 8, 1024
    tokens = torch.randint(0, arch.vocab_size, (b, s), device=device)
    inputs = (tokens, models.position_ids(b, s, device), models.causal_mask(s, device))
    for _ in range(2):  # warm-up: kernels, cuBLAS workspaces
        model(*inputs).float().logsumexp(-1).mean().backward()
    sync()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        logits = model(*inputs)
        logits.float().logsumexp(-1).mean().backward()
    sync()
    dt = (time.perf_counter() - start) / reps
    assert logits.dtype == torch.bfloat16, logits.dtype
    assert torch.isfinite(logits).all(), "non-finite logits"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), "non-finite gradients"
    print(f"{params / 1e6:.1f}M parameters on {device}, logits {tuple(logits.shape)} {logits.dtype}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"forward + backward, {b} x {s} tokens: {dt * 1e3:.1f} ms, {b * s / dt:,.0f} tokens/s, "
          f"peak {peak:.2f} GiB")
finally:
    distributed.teardown()
EOF
}

step_dynamic_engine() {
    section "4. dynamic inference engine"
    if ! "$PYTHON" -c "import flash_attn; print('flash-attn', flash_attn.__version__)"; then
        echo "flash-attn is not installed: dynamic engine skipped (rollouts use the static engine)"
        return 0
    fi
    make_tiny_pair
    # greedy rollouts of the tiny student: the dynamic engine must give the static engine's tokens
    "$PYTHON" - "$OUT_DIR/pair/student" <<'EOF'
import sys
import time

import torch

from megatron_opd import convert, data, distributed, generation
from megatron_opd.tokenizer import load_tokenizer

distributed.initialize()
try:
    chunks, arch = convert.load_checkpoint_model(sys.argv[1])
    tokenizer = load_tokenizer(sys.argv[1])
    problems = data.load_prompt_source("builtin:16", seed=0)
    prompts = data.PromptSet.build(problems, tokenizer, 160).token_ids
    out = {}
    for engine in ("static", "dynamic"):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out[engine] = generation.generate(
            chunks, tokenizer, prompts, 48, greedy=True, engine=engine
        )
        torch.cuda.synchronize()
        tokens = sum(len(g.tokens) for g in out[engine])
        print(f"{engine}: {tokens} tokens in {time.perf_counter() - start:.2f} s")
    same = sum(a.tokens == b.tokens for a, b in zip(out["static"], out["dynamic"]))
    print(f"greedy tokens identical for {same} of {len(prompts)} prompts")
    # the engines use different attention kernels: a late argmax tie-break may differ
    assert same >= len(prompts) // 2, "dynamic and static greedy rollouts disagree"
finally:
    distributed.teardown()
EOF
    opd_run dynamic --rollout-engine dynamic
}

make_tiny_pair() {
    if [[ ! -d $OUT_DIR/pair/student ]]; then
        "$PYTHON" - "$OUT_DIR/pair" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from opd_setup import make_pair

print("tiny teacher/student:", make_pair(Path(sys.argv[1])))
EOF
    fi
}

# opd_run NAME [extra pretrain_opd.py flags...]: STEPS steps at TP = min(GPUs, 2), bf16
opd_run() {
    local name=$1 ngpu tp
    shift
    make_tiny_pair
    ngpu=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    tp=$((ngpu >= 2 ? 2 : 1))
    rm -rf "${OUT_DIR:?}/$name"
    "$PYTHON" -m torch.distributed.run --nproc-per-node "$tp" \
        --master-port "$((29500 + RANDOM % 1000))" "$ROOT/scripts/pretrain_opd.py" \
        --load "$OUT_DIR/pair/student" --opd-teacher-load "$OUT_DIR/pair/teacher" \
        --tensor-model-parallel-size "$tp" --bf16 --opd-teacher-bf16 --opd-alpha 5 \
        --global-batch-size 8 --micro-batch-size 4 --lr 1e-4 --lr-warmup-fraction 0 \
        --rollout-max-new-tokens 64 --max-prompt-length 160 --prompt-data builtin:256 \
        --train-iters "$STEPS" --save "$OUT_DIR/$name/ckpt" \
        --metrics-file "$OUT_DIR/$name/metrics.jsonl" "$@"
    "$PYTHON" - "$OUT_DIR/$name" "$STEPS" "$tp" <<'EOF'
import json
import math
import sys
from pathlib import Path

run, steps, tp = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
latest = (run / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip()
assert latest == str(steps), latest
keys = ["loss", "grad_norm", "reward/mean", "time/rollout", "time/teacher", "time/train",
        "time/step", "tokens_per_sec"]
keys = [k for k in keys if k in rows[0]]
print(f"TP{tp}, bf16: " + " | ".join(keys))
for r in rows:
    assert all(math.isfinite(r[k]) for k in keys if isinstance(r[k], float)), r
    print(f"step {r['step']}: " + " | ".join(f"{r[k]:.4g}" for k in keys))
print(f"checkpoint iter {latest} in {run / 'ckpt'}")
EOF
}

step_opd_run() {
    section "5. short OPD run ($STEPS steps, bf16)"
    opd_run opd
}

step_benchmarks() {
    section "6. benchmarks"
    local bench found=0 extra
    for bench in bench_reward_op.py bench_opd_step.py bench_e2e.py; do
        if [[ -f $ROOT/scripts/$bench ]]; then
            found=1
            if [[ $bench == bench_reward_op.py ]]; then
                read -r -a extra <<<"${BENCH_REWARD_OP_ARGS:-}"
            elif [[ $bench == bench_e2e.py ]]; then
                read -r -a extra <<<"${BENCH_E2E_ARGS:---workdir $OUT_DIR/bench_e2e}"
            else
                read -r -a extra <<<"${BENCH_OPD_STEP_ARGS:-}"
            fi
            echo "--- scripts/$bench ${extra[*]}"
            "$PYTHON" "$ROOT/scripts/$bench" "${extra[@]}"
        else
            echo "scripts/$bench not present: skipped"
        fi
    done
    if ((!found)); then echo "no benchmarks to run"; fi
}

main() {
    mkdir -p "$OUT_DIR"
    cd "$ROOT"
    exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
    echo "gpu_check $(date '+%F %T') on $(hostname), checkout $ROOT, output $OUT_DIR"
    step_gpus
    step_te_spec
    step_bf16_model
    step_dynamic_engine
    step_opd_run
    step_benchmarks
    section "all checks passed; log: $OUT_DIR/gpu_check.log"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
