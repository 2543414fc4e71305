"""A teacher on its own TP x PP layout, several teachers with routed prompts, and the teacher
flags' errors. The layouts are compared against the same run with both models on the student's
grid; the routed teachers' log-probs against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from opd_setup import SHORT_RUN as COMMON
from opd_setup import make_pair, make_teacher, read_metrics, torchrun

from megatron_opd.runtime.spawn import run_distributed

TP_FLAG = "--opd-teacher-tensor-model-parallel-size"
PP_FLAG = "--opd-teacher-pipeline-model-parallel-size"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    pair = make_pair(root)
    wide = make_teacher(root / "wide", root / "tokenizer", pair["vocab_size"], seed=5)
    return {**pair, "wide": wide, "root": root}


def _flags(models, teachers: list[Path], *extra: str) -> list[str]:
    return [
        "--load", str(models["student"]),
        "--opd-teacher-load", *map(str, teachers),
        *COMMON,
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_teacher_on_its_own_layout_matches_the_same_grid(models, tmp_path):
    """Student TP1 x DP4; teacher TP1 (reference), then TP2 x PP2 for 2 steps, saved, and resumed
    with the teacher at TP4 for step 3: rewards, losses and grad norms equal step for step."""
    ref, got, save = tmp_path / "ref.jsonl", tmp_path / "own.jsonl", tmp_path / "ckpt"
    torchrun(4, _flags(models, [models["wide"]], "--prompt-data", "builtin:64",
                       "--train-iters", "3", "--metrics-file", str(ref)))  # fmt: skip
    run = ["--prompt-data", "builtin:64", "--train-iters", "3", "--save", str(save),
           "--save-interval", "2", "--metrics-file", str(got)]  # fmt: skip
    torchrun(4, _flags(models, [models["wide"]], *run, TP_FLAG, "2", PP_FLAG, "2",
                       "--exit-interval", "2"))  # fmt: skip
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    torchrun(4, _flags(models, [models["wide"]], *run, TP_FLAG, "4"))
    a, b = read_metrics(ref), read_metrics(got)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    assert len({round(r["loss"], 6) for r in a}) == 3  # fresh rollouts, a moving student
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean", "reward/std"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"


@pytest.mark.slow
def test_teacher_with_more_replicas_than_the_student_splits_its_rows(models, tmp_path):
    """Student PP2 (one data-parallel rank) with the teacher at TP1 x DP2: each teacher replica
    scores half of the student's rows, and the steps equal those with the teacher on the
    student's grid."""
    ref, got = tmp_path / "same.jsonl", tmp_path / "split.jsonl"
    run = ["--prompt-data", "builtin:64", "--train-iters", "2"]
    run += ["--pipeline-model-parallel-size", "2"]
    torchrun(2, _flags(models, [models["wide"]], *run, "--metrics-file", str(ref)))
    torchrun(2, _flags(models, [models["wide"]], *run, PP_FLAG, "1", "--metrics-file", str(got)))
    a, b = read_metrics(ref), read_metrics(got)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean", "reward/std"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def _split_worker(teacher_dir: str, vocab: int) -> dict:
    from megatron_opd.runtime import distributed
    from megatron_opd.training import teacher

    student = distributed.initialize(distributed.ParallelConfig(1, 2)).grid  # PP2: one DP rank
    teachers = teacher.build_teachers([Path(teacher_dir)], [(1, 1)], student)  # TP1 x DP2
    (chunk,) = teachers.chunks[0]
    seen = []
    chunk.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))  # rows scored
    seqs = torch.randint(3, vocab, (7, 12), generator=torch.Generator().manual_seed(0))
    (chunks,), (grid,), (shares,) = teachers.chunks, teachers.grids, teachers.shares
    split = teacher.score_on_grid(chunks, grid, seqs, vocab, 0, 1, shares=shares)
    rows_split = sum(seen)
    seen.clear()  # every replica scoring every row, as before the split
    whole = teacher.score_on_grid(chunks, grid, seqs, vocab, 0, 1)
    rows_whole = sum(seen)
    seen.clear()  # a micro-batch larger than the share is not padded past the share
    wide = teacher.score_on_grid(chunks, grid, seqs, vocab, 0, 8, shares=shares)
    rows = (rows_split, rows_whole, sum(seen))
    return {"split": split, "whole": whole, "wide": wide, "rows": rows}


@pytest.mark.slow
def test_teacher_replicas_share_a_student_replicas_rows(models):
    """Each of the two teacher replicas scores its own share (3 and 4 of 7 rows, also when the
    micro-batch is larger than the share), and every rank gets all 7 rows back, equal to the
    rows scored whole."""
    per_rank = run_distributed(_split_worker, 2, str(models["wide"]), models["vocab_size"])
    assert [r["rows"] for r in per_rank] == [(3, 7, 3), (4, 7, 4)]
    for r in per_rank:
        assert torch.equal(r["split"], r["whole"])
        torch.testing.assert_close(r["wide"], r["whole"], rtol=1e-6, atol=1e-6)
        assert r["split"].abs().sum() > 0


def _hf_logprobs(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]


def _prompt_file(path: Path, routes: list[int]) -> Path:
    from megatron_opd.training.data import builtin_problems

    problems = builtin_problems(len(routes), seed=3, add_instruction=False)
    rows = [
        {"problem": p.problem, "answer": p.answer, "teacher": t}
        for p, t in zip(problems, routes, strict=True)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dumped(dump_dir: Path) -> dict:
    """Every row of step 1 on both DP ranks: tokens, teacher index, lp_t, lp_s, mask."""
    parts = [torch.load(f) for f in sorted(dump_dir.glob("step0000001_dp*.pt"))]
    assert len(parts) == 2
    width = max(p["tokens"].shape[1] for p in parts)

    def pad(t, to):
        return torch.nn.functional.pad(t, (0, to - t.shape[1]))

    cat = {
        "tokens": torch.cat([pad(p["tokens"], width) for p in parts]),
        "teachers": torch.cat([p["teachers"] for p in parts]),
    }
    for key in ("lp_t", "lp_s", "mask"):  # [B, S - 1]: position i predicts token i + 1
        rows = [torch.cat([m[key] for m in p["micro_batches"]]) for p in parts]
        cat[key] = torch.cat([pad(r, width - 1) for r in rows])
    cat["mask"] = cat["mask"].bool()
    return cat


@pytest.mark.slow
def test_two_teachers_route_each_prompt(models, tmp_path):
    """teacher0 (TP2) and teacher1 (the student's TP1 grid) on 2 ranks, token-budget
    micro-batches: each row's teacher log-probs are its routed teacher's (transformers), the
    logged per-teacher rewards equal a recount from the dump, and swapping some prompts' teacher
    changes exactly those rows."""
    routes = [k % 2 for k in range(16)]
    swapped = [1 - t if k % 3 == 0 else t for k, t in enumerate(routes)]
    teachers = [models["teacher"], models["wide"]]
    runs = {}
    for name, r in (("a", routes), ("b", swapped)):
        data = _prompt_file(tmp_path / f"{name}.jsonl", r)
        flags = _flags(models, teachers, "--prompt-data", str(data), "--train-iters", "1",
                       TP_FLAG, "2", "1", "--metrics-file", str(tmp_path / f"{name}.m.jsonl"),
                       "--opd-dump-tokens", str(tmp_path / name),
                       # rows regrouped by length: teacher rows must follow the reordering
                       "--max-tokens-per-micro-batch", "256")  # fmt: skip
        torchrun(2, flags)
        runs[name] = (_dumped(tmp_path / name), read_metrics(tmp_path / f"{name}.m.jsonl")[0])

    hf = [models["root"] / "hf_teacher", models["wide"].parent / "hf_teacher"]
    for name, (d, logged) in runs.items():
        assert set(d["teachers"].tolist()) == {0, 1}, name
        seq = d["lp_t"].shape[1]
        for k in (0, 1):
            rows = d["teachers"] == k
            ref = _hf_logprobs(hf[k], d["tokens"][rows][:, : seq + 1])
            m = d["mask"][rows]
            torch.testing.assert_close(d["lp_t"][rows][m].double(), ref[m], rtol=0, atol=2e-5)
            lp_t, lp_s = d["lp_t"][rows].double(), d["lp_s"][rows].double()
            reward = lp_t.exp() ** 0.5 - lp_s.exp() ** 0.5
            assert logged[f"reward/teacher{k}/tokens"] == m.sum().item()
            assert logged[f"reward/teacher{k}/mean"] == pytest.approx(
                reward[m].mean().item(), rel=1e-5, abs=1e-7
            )
            assert logged[f"reward/teacher{k}/log_ratio_mean"] == pytest.approx(
                (lp_t - lp_s)[m].mean().item(), rel=1e-5, abs=1e-7
            )
    (a, _), (b, _) = runs["a"], runs["b"]
    assert torch.equal(a["tokens"], b["tokens"])  # the same rollouts: routing is not sampling
    changed = a["teachers"] != b["teachers"]
    assert 0 < changed.sum() < len(changed)
    diff = torch.where(a["mask"], (a["lp_t"] - b["lp_t"]).abs(), 0.0).amax(dim=1)
    assert (diff[changed] > 1e-2).all() and (diff[~changed] < 1e-5).all(), diff
    assert torch.equal(a["lp_s"], b["lp_s"])


# ---------------------------------------------------------------------------------------------
# Errors before any model is built


@pytest.fixture(scope="module")
def metadata_only(tmp_path_factory):
    """Student (2 layers) and teachers as metadata + tokenizer only: the checks need no weights."""
    from opd_setup import metadata_only_checkpoint

    from megatron_opd.models.tiny import save_bpe_tokenizer

    root = tmp_path_factory.mktemp("meta")
    save_bpe_tokenizer(root / "tok")
    vocab = len(json.loads((root / "tok" / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    return {
        "root": root,
        "student": metadata_only_checkpoint(
            root / "student", root / "tok", vocab_size=vocab, num_hidden_layers=2,
            num_key_value_heads=2,
        ),
        "teacher": metadata_only_checkpoint(
            root / "teacher", root / "tok", vocab_size=vocab, num_key_value_heads=2
        ),
        "wide": metadata_only_checkpoint(root / "wide", root / "tok", vocab_size=vocab),
        "narrow_ffn": metadata_only_checkpoint(
            root / "narrow_ffn", root / "tok", vocab_size=vocab, intermediate_size=130
        ),
    }  # fmt: skip


def _check(models, world: int, *extra: str, teachers=None):
    from megatron_opd.training import arguments, launch

    args = arguments.parse_args(_flags(models, teachers or [models["wide"]], *extra))
    return launch.check_inputs(args, world)


def test_teacher_flag_errors(metadata_only, tmp_path):
    models = metadata_only

    def err(world, *extra, teachers=None) -> str:
        with pytest.raises(ValueError) as e:
            _check(models, world, "--prompt-data", "builtin:32", *extra, teachers=teachers)
        return str(e.value)

    assert f"{TP_FLAG} 3 x {PP_FLAG} 1 does not divide the world size 4" in err(4, TP_FLAG, "3")
    small = [models["teacher"]]  # 4 heads, 2 query groups, 4 layers
    assert f"{TP_FLAG} 4 does not divide the teacher's num_key_value_heads" in err(
        4, TP_FLAG, "4", teachers=small
    )
    assert f"{TP_FLAG} 8 does not divide the teacher's num_attention_heads 4" in err(
        8, TP_FLAG, "8"
    )
    assert f"{TP_FLAG} 4 does not divide the teacher's intermediate_size (ffn) 130" in err(
        4, TP_FLAG, "4", teachers=[models["narrow_ffn"]]
    )
    assert f"{PP_FLAG} 8 is larger than the teacher's 4 layers" in err(8, PP_FLAG, "8")
    assert f"{PP_FLAG} 3 does not divide the teacher's 4 layers" in err(
        3, PP_FLAG, "3", "--global-batch-size", "6"
    )
    assert f"{TP_FLAG} must be >= 1, got 0" in err(4, TP_FLAG, "0")
    # the rollout copy's layout (megatron_opd.rollout.refit) is checked against the student
    r_tp, r_pp = "--rollout-tensor-model-parallel-size", "--rollout-pipeline-model-parallel-size"
    assert f"{r_tp} 3 x {r_pp} 1 does not divide the world size 4 (student)" in err(4, r_tp, "3")
    assert f"{r_pp} 4 is larger than the student's 2 layers" in err(4, r_pp, "4")
    assert f"{r_tp} 8 does not divide the student's num_attention_heads 4" in err(8, r_tp, "8")
    assert "full_vocab_kl needs one teacher on the student's layout" in err(
        4, TP_FLAG, "2", "--opd-reward", "full_vocab_kl"
    )
    # the held-out gap reads logits in the student's sharding: its teacher must sit there
    evals = ("--eval-interval", "2", "--eval-data", "builtin:4")
    assert "--eval-gap reads a teacher's logits in the student's TP sharding" in err(
        4, TP_FLAG, "2", *evals
    )
    _check(models, 4, "--prompt-data", "builtin:32", TP_FLAG, "2", *evals, "--no-eval-gap")
    assert f"{TP_FLAG} takes one value or one per --opd-teacher-load (1), got 2" in err(
        4, TP_FLAG, "2", "1"
    )
    # several teachers: every prompt names one, in range
    two = [models["teacher"], models["wide"]]
    assert "prompt 0 has no 'teacher' field" in err(2, teachers=two)
    data = _prompt_file(tmp_path / "p.jsonl", [0, 1, 2, 1] * 8)
    assert "routes to teacher 2, but --opd-teacher-load names 2" in err(
        2, "--prompt-data", str(data), teachers=two
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2", "teacher": "one"}\n')
    assert f"{bad}:1: 'teacher' must be a 0-based teacher index" in err(
        2, "--prompt-data", str(bad), teachers=two
    )
    # a teacher with another tokenizer (same vocabulary size) is refused
    other = tmp_path / "other_tok_teacher"
    shutil.copytree(models["wide"], other)
    tok = json.loads((other / "tokenizer" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[40:42]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    assert "the teacher's tokenizer differs from the student's" in err(4, teachers=[other])
    # the accepted cases: layouts resolved per teacher
    inputs = _check(models, 4, "--prompt-data", "builtin:32", TP_FLAG, "2", PP_FLAG, "2")
    (t,) = inputs.teachers
    assert (t.tensor_parallel_size, t.pipeline_parallel_size, t.own_layout) == (2, 2, True)
    data = _prompt_file(tmp_path / "ok.jsonl", [0, 1] * 16)
    inputs = _check(models, 4, "--prompt-data", str(data), TP_FLAG, "2", "4", teachers=two)
    assert [(t.name, t.tensor_parallel_size) for t in inputs.teachers] == [
        ("teacher0", 2),
        ("teacher1", 4),
    ]
    assert inputs.own_teacher_layout
