"""Qwen3-MoE teachers: Megatron's MoE layers against transformers' Qwen3MoeForCausalLM, at every
TP x EP x PP layout 4 ranks allow, conversion both ways, one OPD step with the teacher's experts
spread over its own grid, and the refusals.

The tiny model has 4 layers, layer 1 dense among sparse ones (``mlp_only_layers``), 8 experts of
which each token takes 2 (``norm_topk_prob``), fp32; its weights are large enough that routing
differs from token to token."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from opd_setup import SHORT_RUN, read_metrics, torchrun

from megatron_opd.models import convert, gpt
from megatron_opd.models.tiny import save_bpe_tokenizer, save_hf_qwen3
from megatron_opd.runtime.spawn import run_distributed

MOE = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rope_theta=10000.0,
)
# (TP, PP, EP) of the teacher's own grid over 4 ranks
LAYOUTS = [(1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 2), (2, 1, 2), (1, 1, 4)]
RESAVED = [(1, 2, 2), (2, 1, 2)]  # saved again from these layouts, then exported
EP_FLAG = "--opd-teacher-expert-model-parallel-size"


def save_hf_qwen3_moe(directory: Path, vocab: int, seed: int, **changes) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=vocab, **{**MOE, **changes})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> SimpleNamespace:
    """The MoE teacher and a dense 2-layer student, converted, sharing one tokenizer."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("moe")
    tok = root / "tokenizer"
    save_bpe_tokenizer(tok)
    vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    hf_teacher, hf_student = root / "hf_teacher", root / "hf_student"
    save_hf_qwen3_moe(hf_teacher, vocab, seed=1)
    save_hf_qwen3(hf_student, 2, seed=2, vocab=vocab, scale=0.25)
    for hf in (hf_teacher, hf_student):
        for f in tok.iterdir():
            (hf / f.name).write_bytes(f.read_bytes())
    teacher = convert.import_hf(hf_teacher, root / "teacher", dtype=torch.float32)
    student = convert.import_hf(hf_student, root / "student", dtype=torch.float32)
    # one row per student data-parallel rank of 4, of different lengths
    seqs = torch.randint(3, vocab, (4, 2, 14), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(
        str(hf_teacher), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(seqs[0], use_cache=False).logits
        lp = [
            torch.log_softmax(model(s, use_cache=False).logits, -1)[:, :-1].gather(
                -1, s[:, 1:, None]
            )[..., 0]
            for s in seqs
        ]
    return SimpleNamespace(
        root=root, tok=tok, vocab=vocab, hf=hf_teacher, teacher=teacher, student=student,
        seqs=seqs, logits=logits, logprobs=torch.stack(lp),
    )  # fmt: skip


def test_the_architecture_maps_to_megatrons_moe():
    arch = gpt.ArchConfig(model_type="qwen3_moe", vocab_size=100, **MOE)
    assert arch.sparse_layers() == [True, False, True, True]
    config = gpt.transformer_config(arch)
    assert config.num_moe_experts == 8 and config.moe_router_topk == 2
    assert config.moe_layer_freq == [1, 0, 1, 1] and config.moe_ffn_hidden_size == 32
    assert config.moe_expert_capacity_factor is None  # dropless
    assert config.moe_router_pre_softmax is False  # norm_topk_prob: softmax over the top k
    assert config.moe_token_dispatcher_type == "allgather"
    stepped = gpt.ArchConfig(
        model_type="qwen3_moe",
        vocab_size=100,
        **{**MOE, "mlp_only_layers": [], "decoder_sparse_step": 2},
    )
    assert stepped.sparse_layers() == [False, True, False, True]  # HF: (i + 1) % step == 0
    raw = {**arch.to_hf_dict(), "num_local_experts": 8}
    del raw["num_experts"]  # transformers 5 writes num_local_experts
    assert gpt.ArchConfig.from_dict(raw).num_experts == 8


def test_logits_match_hf_and_export_round_trips_exactly(moe, tmp_path):
    """TP1/EP1 in this process: logits within 1e-5 of transformers (fp64 reference), both
    routings (norm_topk_prob true and false); the export gives back every tensor bit for bit."""
    from test_convert import megatron_logits, read_safetensors

    from megatron_opd.runtime import distributed

    grid = distributed.initialize().grid
    chunks, arch = convert.load_checkpoint_model(moe.teacher, grid)
    logits = megatron_logits(chunks[0], moe.seqs[0])
    assert (logits[..., : moe.vocab].double() - moe.logits).abs().max() < 1e-5
    assert type(chunks[0].decoder.layers[0].mlp).__name__ == "MoELayer"
    assert type(chunks[0].decoder.layers[1].mlp).__name__ == "MLP"

    out = convert.export_hf(moe.teacher, tmp_path / "hf")
    exported, original = read_safetensors(out), read_safetensors(moe.hf)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    for key in (
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "mlp_only_layers",
    ):
        assert config[key] == MOE[key], key

    # the other routing: softmax over all experts, top-k not renormalised
    from transformers import AutoModelForCausalLM

    unnormed = tmp_path / "hf_unnormed"
    save_hf_qwen3_moe(unnormed, moe.vocab, seed=3, norm_topk_prob=False)
    for f in moe.tok.iterdir():
        (unnormed / f.name).write_bytes(f.read_bytes())
    ckpt = convert.import_hf(unnormed, tmp_path / "unnormed", dtype=torch.float32)
    chunks, _ = convert.load_checkpoint_model(ckpt, grid)
    hf = AutoModelForCausalLM.from_pretrained(
        str(unnormed), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf(moe.seqs[0], use_cache=False).logits
    got = megatron_logits(chunks[0], moe.seqs[0])[..., : moe.vocab].double()
    assert (got - ref).abs().max() < 1e-5


def test_the_alltoall_dispatcher_runs_on_cpu(moe):
    """compat.moe's stream stand-ins: Megatron's alltoall dispatcher builds and runs without
    CUDA, and gives the allgather dispatcher's logits (TP1 / EP1)."""
    from test_convert import megatron_logits

    from megatron_opd.runtime import distributed

    grid = distributed.initialize().grid
    logits = {}
    for kind in ("allgather", "alltoall"):
        chunks, _ = convert.load_checkpoint_model(moe.teacher, grid, moe_token_dispatcher_type=kind)
        assert chunks[0].decoder.layers[0].mlp.config.moe_token_dispatcher_type == kind
        logits[kind] = megatron_logits(chunks[0], moe.seqs[0])
    torch.testing.assert_close(logits["alltoall"], logits["allgather"], rtol=0, atol=1e-6)


def test_greedy_generation_matches_hf(moe):
    """The MoE model as a model to evaluate: Megatron's static engine (with its KV cache, one
    token's routing at a time) decodes what transformers decodes greedily."""
    from transformers import AutoModelForCausalLM

    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation
    from megatron_opd.runtime import distributed

    grid = distributed.initialize().grid
    chunks, _ = convert.load_checkpoint_model(moe.teacher, grid)
    prompts = [moe.seqs[0, 0, :6].tolist(), moe.seqs[1, 1, :9].tolist()]
    out = generation.generate(
        chunks, load_tokenizer(moe.teacher), prompts, 8, greedy=True, stop_token_ids=[]
    )
    hf = AutoModelForCausalLM.from_pretrained(
        str(moe.hf), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    for prompt, g in zip(prompts, out, strict=True):
        expected = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
        assert g.tokens == expected


def _layouts_worker(
    teacher_dir: str, dense_dir: str, seqs: torch.Tensor, vocab: int, save_root: str
) -> dict:
    import torch.distributed as dist

    from megatron_opd.runtime import checkpointing, distributed
    from megatron_opd.training import teacher
    from megatron_opd.training.opd import MicroBatch, forward_only

    student = distributed.initialize(distributed.ParallelConfig(1, 1)).grid  # the student at DP4
    rank = dist.get_rank()
    out = {}
    for layout in LAYOUTS:
        tp, pp, ep = layout
        grid = distributed.build_model_grid(tp, pp, expert_parallel_size=ep)
        chunks = teacher.load_on_grid(Path(teacher_dir), grid)
        # full logits of the same rows on every rank (an EP group's replicas run together)
        item = MicroBatch(seqs[0], seqs[0], torch.ones(0), first=0)
        (shard,) = forward_only(chunks, [item], vocab, grid, keep_logits=True)
        logits = None
        if shard is not None:
            parts = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(parts, shard.contiguous(), group=grid.tp)
            logits = torch.cat(parts, -1)[..., :vocab]
        # each student DP rank's own rows, one of them shorter: the sampled-token log-probs
        mine = seqs[rank][:, : 14 - rank]
        lp = teacher.score_on_grid(chunks, grid, mine, vocab, rank, micro_batch_size=1)
        out[layout] = (logits, lp)
        if layout in RESAVED:  # the experts sharded over EP, TP and PP, saved as they are
            meta = {**checkpointing.read_meta(teacher_dir), "tokenizer": None}
            sharded = {"model": chunks[0].sharded_state_dict(metadata={"dp_cp_group": grid.dp})}
            directory = Path(save_root) / "x".join(map(str, layout))
            checkpointing.atomic_save(sharded, directory, meta=meta)
    # a dense and an MoE teacher, each prompt routed to one of them; rank 0 routes no row to the
    # MoE teacher, whose EP2 group pairs it with rank 1 (routing both): rank 0 still runs along
    teachers = teacher.build_teachers(
        [Path(dense_dir), Path(teacher_dir)], [(1, 1), (1, 1, 2)], student
    )
    routes = torch.tensor([[0, 0], [1, 1], [0, 1], [1, 0]][rank])
    parts = []
    for k in range(2):
        rows = routes == k
        chunks_k, grid_k = teachers.chunks[k], teachers.grids[k]
        parts.append(teacher.score_on_grid(chunks_k, grid_k, seqs[rank], vocab, rank, 2, rows))
    out["routed"] = (routes, parts[0] + parts[1])
    out["dense_alone"] = teacher.score_on_grid(
        teachers.chunks[0], teachers.grids[0], seqs[rank], vocab, rank, 2
    )
    return out


@pytest.mark.slow
def test_every_layout_matches_hf(moe, tmp_path):
    """Teacher on its own grid at TP x PP x EP = 1x1x1, 1x1x2, 2x1x1, 1x2x2, 2x1x2 and 1x1x4 (4
    ranks): logits within 1e-5 of transformers (fp64), the sampled-token log-probs equal across
    layouts within 1e-6 (relative: a few ulps of values near -8); a dense and an MoE teacher
    routed per row score as each alone (one replica of the MoE teacher's expert group with no
    row routed to it). Saved again at TP1 x PP2 x EP2 and TP2 x EP2, the
    checkpoint exports to the original Hugging Face tensors bit for bit."""
    from test_convert import read_safetensors

    per_rank = run_distributed(
        _layouts_worker, 4, str(moe.teacher), str(moe.student), moe.seqs, moe.vocab,
        str(tmp_path), timeout=600,
    )  # fmt: skip
    reference = None
    for layout in LAYOUTS:
        logits = [r[layout][0] for r in per_rank if r[layout][0] is not None]
        assert len(logits) == 4 // layout[1], layout  # every last-stage rank
        for lg in logits:
            assert (lg.double() - moe.logits).abs().max() < 1e-5, layout
        lps = [r[layout][1] for r in per_rank]
        for rank, lp in enumerate(lps):
            width = 13 - rank
            hf = moe.logprobs[rank][:, :width]
            assert (lp.double() - hf).abs().max() < 1e-5, (layout, rank)
        if reference is None:
            reference = lps
        for lp, ref in zip(lps, reference, strict=True):
            # log-probs of ~-8: 1e-6 relative is a few fp32 ulps (TP and EP reorder the sums)
            torch.testing.assert_close(lp, ref, rtol=1e-6, atol=1e-6)
        spread = max((lp - ref).abs().max().item() for lp, ref in zip(lps, reference, strict=True))
        to_hf = max((lg.double() - moe.logits).abs().max().item() for lg in logits)
        print(f"layout {layout}: logits to HF {to_hf:.2e}, log-prob spread to 1x1x1 {spread:.2e}")
    for rank, r in enumerate(per_rank):
        routes, scored = r["routed"]
        moe_rows, dense_rows = routes == 1, routes == 0
        expected = moe.logprobs[rank][moe_rows].float()
        torch.testing.assert_close(scored[moe_rows], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(scored[dense_rows], r["dense_alone"][dense_rows])
    original = read_safetensors(moe.hf)
    for layout in RESAVED:
        name = "x".join(map(str, layout))
        out = convert.export_hf(
            tmp_path / name, tmp_path / f"hf_{name}", tokenizer_path=moe.teacher
        )
        exported = read_safetensors(out)
        assert sorted(exported) == sorted(original), layout
        for key, tensor in original.items():
            assert torch.equal(exported[key], tensor), (layout, key)


def _flags(moe, *extra: str) -> list[str]:
    return [
        "--load", str(moe.student), "--opd-teacher-load", str(moe.teacher), *SHORT_RUN,
        "--prompt-data", "builtin:32", "--train-iters", "2", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_opd_step_with_the_experts_on_their_own_grid_equals_the_students_grid(moe, tmp_path):
    """Student TP1 x DP2: the MoE teacher on the student's grid (EP1), then on its own grid with
    its 8 experts split over 2 ranks: the same rewards, losses and grad norms for 2 steps."""
    ref, got = tmp_path / "same.jsonl", tmp_path / "ep2.jsonl"
    torchrun(2, _flags(moe, "--metrics-file", str(ref)))
    torchrun(2, _flags(moe, EP_FLAG, "2", "--metrics-file", str(got)))
    a, b = read_metrics(ref), read_metrics(got)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean", "reward/std"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


@pytest.mark.slow
def test_an_moe_student_trains_the_same_at_pp1_and_pp2(moe, tmp_path):
    """The student MoE too (TP1, EP1; the dense model as its teacher): 2 steps on one rank equal
    2 steps at PP2 (the MoE layers' gradients through Megatron's DDP and optimizer)."""
    flags = [
        "--load", str(moe.teacher), "--opd-teacher-load", str(moe.student), *SHORT_RUN,
        "--prompt-data", "builtin:32", "--train-iters", "2",
    ]  # fmt: skip
    one, two = tmp_path / "pp1.jsonl", tmp_path / "pp2.jsonl"
    torchrun(1, [*flags, "--metrics-file", str(one)])
    torchrun(2, [*flags, "--pipeline-model-parallel-size", "2", "--metrics-file", str(two)])
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert a[0]["loss"] != a[1]["loss"]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "reward/mean", "reward/log_ratio_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)


def _evaluate(nproc: int, flags: list[str]) -> None:
    import subprocess
    import sys

    from megatron_opd.runtime.distributed import standalone_env
    from megatron_opd.runtime.spawn import free_port

    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *flags]  # fmt: skip
    env = dict(standalone_env(), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_evaluate_takes_an_moe_model_at_tp1_and_tp2(moe, tmp_path):
    """scripts/evaluate.py with the MoE model to evaluate and the dense one as the gap's teacher:
    at TP2 (the experts split over TP, their tokens all-gathered into Megatron's global buffer
    after the engine generated under inference mode: compat.moe) the same completions and gap
    as at TP1."""
    flags = [
        "--load", str(moe.teacher), "--teacher", str(moe.student), "--data", "builtin:4",
        "--samples", "2", "--max-new-tokens", "8", "--no-progress",
    ]  # fmt: skip
    _evaluate(1, [*flags, "--output", str(tmp_path / "tp1")])
    _evaluate(2, [*flags, "--output", str(tmp_path / "tp2"), "--tensor-model-parallel-size", "2"])
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("tp1", "tp2"))
    assert a["gap"]["mean"]["responses"] == 8
    for key, value in a["gap"]["mean"].items():
        assert b["gap"]["mean"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    rows = [(tmp_path / d / "gap.jsonl").read_text().splitlines() for d in ("tp1", "tp2")]
    ids = [[json.loads(line)["response_ids"] for line in r] for r in rows]
    assert ids[0] == ids[1]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    "change, words",
    [
        ({"shared_expert_intermediate_size": 64}, "shared experts"),
        ({"scoring_func": "sigmoid"}, "scoring_func 'sigmoid'"),
        ({"n_group": 4, "topk_group": 2}, "group-limited routing"),
        ({"topk_method": "noaux_tc"}, "topk_method"),
        ({"routed_scaling_factor": 2.5}, "routed_scaling_factor"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok 9"),
        ({"moe_intermediate_size": None}, "moe_intermediate_size"),
    ],
)
def test_unsupported_routing_is_refused_in_one_line(change, words):
    raw = {"model_type": "qwen3_moe", "vocab_size": 100, **MOE, **change}
    with pytest.raises(ValueError) as e:
        gpt.ArchConfig.from_dict(raw, source="config.json")
    assert words in _one_line(e)


def test_layouts_that_cannot_hold_the_experts_are_refused_in_one_line():
    from megatron_opd.training import teacher

    arch = gpt.ArchConfig(model_type="qwen3_moe", vocab_size=100, **MOE)
    dense = gpt.ArchConfig(
        model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4,
    )  # fmt: skip
    cases = [
        (dense, dict(tp=1, pp=1, world_size=4, ep=2), "needs a mixture-of-experts teacher"),
        (arch, dict(tp=1, pp=1, world_size=6, ep=3), "does not divide the teacher's 8 experts"),
        (arch, dict(tp=2, pp=1, world_size=4, ep=4), "does not divide the teacher's data-parallel"),
        (arch, dict(tp=1, pp=1, world_size=4, ep=0), "must be >= 1"),
    ]
    for a, kw, words in cases:
        with pytest.raises(ValueError) as e:
            teacher.check_layout(a, kw["tp"], kw["pp"], kw["world_size"], "teacher", ep=kw["ep"])
        message = _one_line(e)
        assert words in message and EP_FLAG in message, message
    with pytest.raises(ValueError) as e:
        gpt.validate_layout(arch, 1, 1, expert_parallel_size=3)
    assert "does not divide num_experts 8" in _one_line(e)


def test_the_teacher_flags_resolve_and_refuse_in_one_line(moe):
    """--opd-teacher-expert-model-parallel-size through the launcher's checks: resolved per
    teacher; refused for a dense teacher, and an MoE student at TP > 1 (Megatron's MoE layer
    raises mid-step when it trains at TP > 1 without sequence parallelism)."""
    from megatron_opd.training import arguments, launch

    def check(student: Path, teachers: list[Path], world: int, *extra: str):
        flags = ["--load", str(student), "--opd-teacher-load", *map(str, teachers), *SHORT_RUN]
        flags += ["--prompt-data", "builtin:32", *extra]
        return launch.check_inputs(arguments.parse_args(flags), world)

    (t,) = check(moe.student, [moe.teacher], 4, EP_FLAG, "2").teachers
    assert (t.tensor_parallel_size, t.expert_parallel_size, t.own_layout) == (1, 2, True)
    (t,) = check(moe.student, [moe.teacher], 4).teachers
    assert (t.expert_parallel_size, t.own_layout) == (1, False)
    with pytest.raises(ValueError) as e:
        check(moe.student, [moe.student], 4, EP_FLAG, "2")
    assert f"{EP_FLAG} 2 needs a mixture-of-experts teacher; it is qwen3" in _one_line(e)
    with pytest.raises(ValueError) as e:
        check(moe.teacher, [moe.student], 2, "--tensor-model-parallel-size", "2")
    assert "a mixture-of-experts student trains at --tensor-model-parallel-size 1" in _one_line(e)


@pytest.mark.slow
def test_gpu_check_moe_runs_at_toy_shapes(tmp_path):
    """scripts/gpu_check_moe.py without CUDA (toy shapes): both depths measured, the
    extrapolation written, nothing failed."""
    import subprocess
    import sys

    from megatron_opd.runtime.distributed import standalone_env

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check_moe.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--small", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env=dict(standalone_env(), PYTHONWARNINGS="ignore"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check_moe.json").read_text())
    assert result["failed"] == [] and [r["layers"] for r in result["rows"]] == [2, 4]
    assert all(r["finite"] and r["experts_used"] == 8 for r in result["rows"])
    assert result["summary"]["full_layers"] == 48


def _shares_worker(teacher_dir: str, seqs: torch.Tensor, vocab: int) -> dict:
    from megatron_opd.runtime import distributed
    from megatron_opd.training import teacher

    student = distributed.initialize(distributed.ParallelConfig(1, 2)).grid  # PP2: one DP rank
    teachers = teacher.build_teachers([Path(teacher_dir)], [(1, 1, 2)], student)  # EP2 = DP2
    (chunks,), (grid,), (shares,) = teachers.chunks, teachers.grids, teachers.shares
    split = teacher.score_on_grid(chunks, grid, seqs, vocab, 0, 2, shares=shares)
    whole = teacher.score_on_grid(chunks, grid, seqs, vocab, 0, 2)
    return {"split": split, "whole": whole, "shares": (shares.index, shares.count)}


@pytest.mark.slow
def test_expert_group_replicas_share_a_student_replicas_rows(moe):
    """A PP2 student beside the MoE teacher at EP2 (its two replicas are one expert group): each
    replica scores its own share of the 3 rows (1 and 2, padded to equal micro-batches), and the
    rows come back equal to transformers' and to the rows scored whole."""
    seqs = moe.seqs[:3].reshape(-1, 14)[:3]  # 3 rows: shares of 1 and 2
    per_rank = run_distributed(_shares_worker, 2, str(moe.teacher), seqs, moe.vocab)
    assert sorted(r["shares"] for r in per_rank) == [(0, 2), (1, 2)]
    expected = torch.cat([moe.logprobs[0], moe.logprobs[1]])[:3].float()
    for r in per_rank:
        torch.testing.assert_close(r["split"], expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(r["split"], r["whole"], rtol=1e-6, atol=1e-6)
