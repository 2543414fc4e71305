"""The library API alone (``megatron_opd.training.launch``, no script import) builds a working
Trainer: its student and teacher are the checkpoints' models (checked against transformers) and one
step's logged loss equals the PowerOPD formula recomputed from the dumped tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opd_setup import make_pair, read_metrics

from megatron_opd.runtime.spawn import run_distributed


def _library_run(flags: list[str]) -> dict:
    from megatron_opd.training import arguments, launch

    args = arguments.parse_args(flags)
    trainer = launch.build_trainer(args)  # checks, initializes, builds, loads
    teacher = [c for chunks in trainer.teacher.chunks for c in chunks]
    assert all(not p.requires_grad for c in teacher for p in c.parameters())
    trainer.run()
    return {"iteration": trainer.iteration}


def _hf_logprobs(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """[B, S-1] float64 log-prob of token i+1 given the prefix, from the transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def test_library_builds_a_working_trainer(tmp_path):
    pair = make_pair(tmp_path / "models")
    metrics, dump_dir = tmp_path / "m.jsonl", tmp_path / "dump"
    flags = [
        "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
        "--opd-alpha", "0.5", "--global-batch-size", "4", "--micro-batch-size", "2",
        "--lr", "1e-3", "--lr-warmup-fraction", "0", "--rollout-max-new-tokens", "10",
        "--max-prompt-length", "160", "--prompt-data", "builtin:16", "--seed", "3",
        "--train-iters", "1", "--metrics-file", str(metrics), "--opd-dump-tokens", str(dump_dir),
    ]  # fmt: skip
    (result,) = run_distributed(_library_run, 1, flags, timeout=300)
    assert result["iteration"] == 1
    (logged,) = read_metrics(metrics)
    dump = torch.load(dump_dir / "step0000001_dp0.pt")
    tokens = dump["tokens"]
    lp_t = torch.cat([m["lp_t"] for m in dump["micro_batches"]]).double()
    lp_s = torch.cat([m["lp_s"] for m in dump["micro_batches"]]).double()
    mask = torch.cat([m["mask"] for m in dump["micro_batches"]]).bool()
    seq = lp_t.shape[1]
    # both models are the checkpoints' (pre-update) weights: transformers agrees token by token
    root = pair["teacher"].parent
    for name, got in (("hf_teacher", lp_t), ("hf_student", lp_s)):
        ref = _hf_logprobs(root / name, tokens[:, : seq + 1])
        torch.testing.assert_close(got[mask], ref[mask], rtol=0, atol=2e-5, msg=name)
    reward = lp_t.exp() ** 0.5 - lp_s.exp() ** 0.5
    expected = -(reward * lp_s)[mask].sum() / mask.sum()
    assert logged["loss"] == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
