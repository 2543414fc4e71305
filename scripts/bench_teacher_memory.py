"""Peak memory per rank: a large teacher on the student's grid vs on its own layout.

    python scripts/bench_teacher_memory.py [--hidden 768] [--layers 8] [--nproc 4]
    python scripts/bench_teacher_memory.py --experts 16 [--hidden 384] [--layers 4]

Builds a tiny student (2 layers, hidden 64) and a larger Qwen3 teacher (``--hidden``,
``--layers``, ffn 4 x hidden), then runs one OPD step at student TP1 x DP``nproc`` three times
through the library (``megatron_opd.training.launch``, one process per rank): the teacher on the
student's grid (every rank holds all of it), at TP ``nproc``, and at TP2 x PP(nproc/2). Each rank
reports its process's peak resident set (VmHWM: the whole process from start to the end of the
step, interpreter, libraries, checkpoint loading and both models included) and the bytes of the
teacher parameters it holds. Prints a table with the ratios to the same-grid run.

``--experts E``: the teacher is a Qwen3-MoE (E experts of ffn ``--hidden``, 2 per token, every
layer sparse), run on the student's grid (EP1: every rank holds every expert) and on its own grid
with its experts split over 2 and over ``nproc`` ranks
(``--opd-teacher-expert-model-parallel-size``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoints(root: Path, hidden: int, layers: int, experts: int = 0) -> tuple[Path, Path]:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_opd.models.tiny import convert_hf_checkpoint, save_bpe_tokenizer, save_hf_qwen3

    tok = root / "tokenizer"
    save_bpe_tokenizer(tok)
    vocab = 323
    save_hf_qwen3(root / "hf_student", layers=2, seed=2, vocab=vocab, scale=0.25)
    heads = 8  # divides by TP 2, 4, 8
    shape = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    if experts:
        config = Qwen3MoeConfig(
            **shape, num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=hidden,
            norm_topk_prob=True,
        )  # fmt: skip
        Qwen3MoeForCausalLM(config).save_pretrained(str(root / "hf_teacher"))
    else:
        Qwen3ForCausalLM(Qwen3Config(**shape)).save_pretrained(str(root / "hf_teacher"))
    for name in ("student", "teacher"):
        hf = root / f"hf_{name}"
        convert_hf_checkpoint(hf, root / name, tok)
    return root / "student", root / "teacher"


def one_step(flags: list[str]) -> dict:
    """Build through the library, run one step; this rank's peak RSS and teacher bytes."""
    from megatron_opd.training import arguments, launch

    args = arguments.parse_args(flags)
    trainer = launch.build_trainer(args)
    chunks = trainer.teacher.chunks
    teacher_bytes = sum(
        p.numel() * p.element_size() for model in chunks for c in model for p in c.parameters()
    )
    trainer.run()
    with open("/proc/self/status") as f:  # not reset: the whole process, loading included
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"peak": peak, "teacher_bytes": teacher_bytes}


def main() -> None:
    from megatron_opd.runtime.spawn import run_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE teacher with this many")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    n = args.nproc
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_teacher_memory_"))
    if not (root / "teacher").exists():
        print(f"building checkpoints in {root}", flush=True)
        build_checkpoints(root, args.hidden, args.layers, args.experts)
    common = [
        "--load", str(root / "student"), "--opd-teacher-load", str(root / "teacher"),
        "--global-batch-size", str(n), "--micro-batch-size", "1", "--train-iters", "1",
        "--rollout-max-new-tokens", "8", "--max-prompt-length", "160",
        "--prompt-data", "builtin:64", "--lr", "1e-4",
    ]  # fmt: skip
    layouts = {
        "same grid (TP1)": [],
        f"own layout TP{n}": ["--opd-teacher-tensor-model-parallel-size", str(n)],
        f"own layout TP2 x PP{n // 2}": [
            "--opd-teacher-tensor-model-parallel-size", "2",
            "--opd-teacher-pipeline-model-parallel-size", str(n // 2),
        ],
    }  # fmt: skip
    if args.experts:
        ep = "--opd-teacher-expert-model-parallel-size"
        layouts = {
            "same grid (EP1)": [],
            "own grid EP2": [ep, "2"],
            f"own grid EP{n}": [ep, str(n)],
        }
    results = {}
    for name, extra in layouts.items():
        print(f"running: {name}", flush=True)
        results[name] = run_distributed(one_step, n, common + extra, timeout=900)
    gib = 2**30
    base = max(r["peak"] for r in next(iter(results.values())))
    moe = f", {args.experts} experts of ffn {args.hidden}, top-2" if args.experts else ""
    print(
        f"\nteacher: hidden {args.hidden}, {args.layers} layers, ffn {4 * args.hidden}{moe}; "
        f"student TP1 x DP{n}; one OPD step\n"
    )
    print(
        "| teacher layout | teacher params per rank | peak RSS per rank (rank 0..) | max | ratio |"
    )
    print("|---|---:|---|---:|---:|")
    for name, rows in results.items():
        peaks = [r["peak"] / gib for r in rows]
        t = max(r["teacher_bytes"] for r in rows) / gib
        print(
            f"| {name} | {t:.3f} GiB | {', '.join(f'{x:.2f}' for x in peaks)} GiB | "
            f"{max(peaks):.2f} GiB | {max(r['peak'] for r in rows) / base:.3f}x |"
        )


if __name__ == "__main__":
    main()
