"""Record the golden figures of one tiny OPD run, and this Megatron-Core's checkpoint of it.

    python tests/golden/make_golden.py            # ckpt-<megatron-core version>/ only
    python tests/golden/make_golden.py --record   # and golden.json (done once, on 0.16.1)

The run: ``opd_setup.make_pair``'s tiny teacher and student (built from fixed seeds), 3 steps of
``SHORT_RUN`` on one process, saved every step. ``golden.json`` holds each step's loss, grad norm
and reward statistics and the sampled rollouts, and the student's greedy continuation of four
prompts; ``tests/test_versions.py`` checks every supported Megatron-Core against it. The
checkpoint kept is iteration 1 (model, optimizer, scheduler, data position), which every version
that can read it must resume into steps 2 and 3 of the same figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from opd_setup import ROOT, SHORT_RUN, make_pair, read_metrics, torchrun  # noqa: E402

STEPS = 3
KEYS = ("loss", "grad_norm", "reward/mean", "reward/std", "reward/log_ratio_mean")
GREEDY_PROMPTS = ["What is 2 + 3?", "Name a prime number.", "Add 10 and 7.", "Count to five."]


def run_flags(pair: dict, *extra: str) -> list[str]:
    return [
        "--load", str(pair["student"]),
        "--opd-teacher-load", str(pair["teacher"]),
        *SHORT_RUN,
        "--train-iters", str(STEPS),
        *extra,
    ]  # fmt: skip


def sampled_tokens(dump_dir: Path) -> list[list[list[int]]]:
    """Each step's rollouts: prompt + response ids of every row, padding dropped."""
    out = []
    for f in sorted(dump_dir.glob("step*_dp0.pt")):
        payload = torch.load(f)
        rows = payload["tokens"].tolist()
        out.append([[t for t in row] for row in rows])
    return out


def greedy_tokens(student: Path) -> list[list[int]]:
    """The student's greedy continuation (12 tokens) of GREEDY_PROMPTS, in a fresh process."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from megatron_opd.models import convert, tokenizer as tk
from megatron_opd.rollout import generation
from megatron_opd.runtime import distributed
grid = distributed.initialize().grid
chunks, arch = convert.load_checkpoint_model({str(student)!r}, grid)
tok = tk.load_tokenizer({str(student / "tokenizer")!r})
prompts = [tok.encode(p) for p in {GREEDY_PROMPTS!r}]
out = generation.generate(chunks, tok, prompts, max_new_tokens=12, greedy=True, stop_token_ids=[])
print("GREEDY", json.dumps([g.tokens for g in out]))
distributed.teardown()
"""
    from megatron_opd.runtime.distributed import standalone_env

    env = dict(standalone_env(), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    for line in proc.stdout.splitlines():
        if line.startswith("GREEDY "):
            return json.loads(line[len("GREEDY ") :])
    raise RuntimeError(f"greedy generation failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def golden_run(pair: dict, work: Path) -> dict:
    """The run's figures, and its save directory under ``work``."""
    metrics, dump, save = work / "metrics.jsonl", work / "dump", work / "save"
    torchrun(
        1,
        run_flags(
            pair, "--save", str(save), "--save-interval", "1",
            "--metrics-file", str(metrics), "--opd-dump-tokens", str(dump),
        ),
    )  # fmt: skip
    rows = read_metrics(metrics)
    return {
        "steps": [{k: row[k] for k in ("step", *KEYS)} for row in rows],
        "sampled": sampled_tokens(dump),
        "save": save,
    }


def main() -> None:
    from megatron_opd import compat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="also (re)write golden.json")
    args = parser.parse_args()
    version = compat.megatron_core_version()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pair = make_pair(tmp / "pair")
        run = golden_run(pair, tmp)
        dest = HERE / f"ckpt-{version}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        shutil.copytree(run["save"] / "iter_0000001", dest / "iter_0000001")
        (dest / "latest_checkpointed_iteration.txt").write_text("1")
        print(f"wrote {dest}")
        if args.record:
            golden = {
                "megatron_core": version,
                "torch": torch.__version__.split("+")[0],
                "steps": run["steps"],
                "sampled": run["sampled"],
                "greedy": greedy_tokens(pair["student"]),
            }
            (HERE / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
            print(f"wrote {HERE / 'golden.json'}")


if __name__ == "__main__":
    main()
