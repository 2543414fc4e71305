"""Train the toy teacher and student from scratch on worked solutions; save Megatron checkpoints.

    python examples/toy_reproduction/make_models.py --out runs/toy/models

Both are Qwen3-architecture Megatron-Core GPTModels trained in this process (TP1) by supervised
next-token prediction on procedurally generated worked solutions (``task.py``): the loss covers
the solution and its end-of-turn token, not the prompt. The teacher is larger and trained longer;
the student is smaller and trained briefly, so it has the format but makes arithmetic mistakes.
Written under ``--out``: ``tokenizer/``, ``teacher/``, ``student/`` (checkpoints that
``scripts/pretrain_opd.py --load/--opd-teacher-load`` read), ``train.jsonl`` and ``heldout.jsonl``
(disjoint problems), and ``models.json`` with both models' held-out Avg@8 / Pass@8.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

import task  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megatron_opd.evaluation import accuracy  # noqa: E402
from megatron_opd.models import convert, gpt  # noqa: E402
from megatron_opd.models.tokenizer import load_tokenizer  # noqa: E402
from megatron_opd.runtime import checkpointing, distributed  # noqa: E402
from megatron_opd.training import data  # noqa: E402


@dataclass
class ModelRecipe:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    steps: int
    lr: float
    batch_size: int = 64

    def arch(self, vocab_size: int) -> gpt.ArchConfig:
        return gpt.ArchConfig(
            model_type="qwen3",
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.hidden // self.heads,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )


TEACHER = ModelRecipe(
    layers=3, hidden=128, heads=4, kv_heads=2, ffn=384, steps=900, lr=3e-3, batch_size=32
)
STUDENT = ModelRecipe(
    layers=2, hidden=64, heads=4, kv_heads=2, ffn=192, steps=400, lr=3e-3, batch_size=32
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-problems", type=int, default=4000)
    p.add_argument("--heldout-problems", type=int, default=64)
    p.add_argument("--teacher-steps", type=int, default=TEACHER.steps)
    p.add_argument("--student-steps", type=int, default=STUDENT.steps)
    p.add_argument("--eval-samples", type=int, default=8)
    return p.parse_args(argv)


def write_data(out: Path, n_train: int, n_heldout: int, seed: int) -> list[list[int]]:
    """Disjoint train and held-out problems (no held-out term list appears in training); returns
    the training problems' terms."""
    pool = task.problems(4 * (n_train + n_heldout), seed=seed)
    seen, unique = set(), []
    for terms in pool:
        if tuple(terms) not in seen:
            seen.add(tuple(terms))
            unique.append(terms)
    if len(unique) < n_train + n_heldout:
        raise ValueError("the task's problem space is too small for the requested sizes")
    task.write_problems(out / "heldout.jsonl", unique[:n_heldout])
    train = unique[n_heldout : n_heldout + n_train]
    task.write_problems(out / "train.jsonl", train)
    return train


def sft_examples(train: list[list[int]], tokenizer) -> list[tuple[list[int], int]]:
    """(prompt + worked solution + end of turn, prompt length) per training problem; the prompt
    exactly as ``--prompt-data`` builds it (instruction added, chat template)."""
    out = []
    for terms in train:
        problem = data.with_instruction(task.problem_text(terms))
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": problem}])
        answer = tokenizer.encode(task.worked_solution(terms))
        out.append((list(prompt) + answer + [tokenizer.eos_id], len(prompt)))
    return out


def sft_batch(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the loss mask (solution tokens only) of a right-padded batch."""
    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.bool)
    for row, (ids, prompt_len) in enumerate(examples):
        tokens[row, : len(ids)] = torch.tensor(ids)
        mask[row, prompt_len : len(ids)] = True
    return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def train(recipe: ModelRecipe, arch: gpt.ArchConfig, grid, examples, pad_id: int, seed: int):
    """Next-token SFT with AdamW, linear warmup then cosine decay; returns the model chunks (on
    ``grid``, the world of one's)."""
    torch.manual_seed(seed)
    config = gpt.transformer_config(arch)
    chunks = gpt.build_model(arch, config, grid)
    model = chunks[0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    warmup = max(1, recipe.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return recipe.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, recipe.steps - warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = random.Random(seed)
    model.train()
    start = time.perf_counter()
    for step in range(recipe.steps):
        tokens, targets, mask = sft_batch(rng.sample(examples, recipe.batch_size), pad_id)
        b, s = tokens.shape
        logits = model(tokens, gpt.position_ids(b, s), gpt.causal_mask(s))
        logits = logits[..., : arch.vocab_size].float()
        loss = F.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            print(
                f"  step {step:5d} | loss {loss.item():.4f} | {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    model.eval()
    return chunks


def heldout_scores(chunks, grid, tokenizer, heldout: Path, samples: int) -> dict[str, float]:
    cfg = eval_config(samples)
    benchmarks = accuracy.load_benchmarks([str(heldout)], None)
    scores, _ = accuracy.evaluate(chunks, tokenizer, benchmarks, cfg, grid, progress=False)
    return accuracy.summary(scores)


def eval_config(samples: int = 8) -> accuracy.EvalConfig:
    """The evaluation every number of the reproduction uses (held-out set, Avg@k / Pass@k)."""
    return accuracy.EvalConfig(
        samples=samples, temperature=0.6, max_new_tokens=96, max_prompt_length=128, seed=1234
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    task.save_tokenizer(out / "tokenizer")
    tokenizer = load_tokenizer(out / "tokenizer")
    train_terms = write_data(out, args.train_problems, args.heldout_problems, args.seed)
    examples = sft_examples(train_terms, tokenizer)

    grid = distributed.initialize(distributed.ParallelConfig(), seed=args.seed).grid
    report = {}
    try:
        for name, recipe, steps in (
            ("teacher", TEACHER, args.teacher_steps),
            ("student", STUDENT, args.student_steps),
        ):
            recipe = ModelRecipe(**{**asdict(recipe), "steps": steps})
            arch = recipe.arch(tokenizer.vocab_size)
            print(f"{name}: {recipe}", flush=True)
            t0 = time.perf_counter()
            chunks = train(recipe, arch, grid, examples, tokenizer.pad_id, args.seed)
            seconds = time.perf_counter() - t0
            heldout = out / "heldout.jsonl"
            scores = heldout_scores(chunks, grid, tokenizer, heldout, args.eval_samples)
            params = sum(p.numel() for p in chunks[0].parameters())
            convert.write_model_checkpoint(
                chunks, arch, tokenizer, out / name, source=f"examples/toy_reproduction {recipe}"
            )
            report[name] = {"recipe": asdict(recipe), "params": params, "train_seconds": seconds}
            report[name].update(scores)
            print(f"{name}: {params} parameters, {seconds:.0f} s, held-out {scores}", flush=True)
    finally:
        distributed.teardown()
    report["gap_avg_at_k"] = report["teacher"]["avg_at_k"] - report["student"]["avg_at_k"]
    checkpointing.write_json_atomic(out / "models.json", report)
    return report


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes that re-import __main__
    main()
