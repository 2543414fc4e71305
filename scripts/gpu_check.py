"""One prepared check for a lent GPU: numerics, the reward op's bandwidth, an OPD step on Qwen3
shapes and the rollout's decode rate, printed as one table.

    bash scripts/gpu_check.sh                    # the wrapper: installs carried wheels, logs
    python scripts/gpu_check.py --out-dir DIR    # this file alone (PYTHONPATH=. and megatron-core)
    GPU_CHECK_SMALL=1 python scripts/gpu_check.py    # tiny shapes; the default without CUDA

Sections, each guarded (a failing one prints its error line, the others still run; the exit
status is 1 if any failed):

  env  torch / CUDA / GPU / megatron-core versions; transformer-engine, flash-attn and the dynamic
       inference engine skipped with the reason when absent.
  (a)  numerics: a Qwen3-0.6B-shaped GPTModel on the layer spec ``gpt.layer_spec`` picks (the
       local spec with SDPA attention when transformer-engine is absent), bf16, forward and
       backward against an fp32 copy of the same weights: relative error of the logits and of
       four parameter gradients. Loss: the mean negative log-prob of random targets through
       ``vocab_parallel.sampled_token_logprobs``.
  (b)  bandwidth of the reward op (``sampled_token_logprobs``) and of the full-vocabulary KL op
       on bf16 logits ``[1024, 8, 151936]``, against the card's datasheet peak and a measured
       device-to-device copy. Bytes model, N tokens x V columns x 2 bytes (bf16), the least any
       implementation moves: forward reads the logits once (NV2); forward + backward with the
       gradient written in place reads them twice and writes once (3 NV2); the KL op reads
       student and teacher in both passes and writes the student's gradient (5 NV2). Scratch
       buffers and the [N] vectors are not counted.
  (c)  one OPD step through the project's trainer (``launch.build_student``, ``trainer.Trainer.
       train_one_step``: rollout, teacher scoring, train step) on a Qwen3-0.6B-shaped student and
       a Qwen3-4B-shaped teacher, random weights, bf16, 8 prompts x 1024 new tokens with stop
       tokens ignored; PowerOPD and full_vocab_kl with ``--rollout-engine auto`` (the graph
       engine on CUDA), then PowerOPD with the static engine as the baseline, each after a short
       warm-up step; beside the paper's Table 4.
  (d)  rollout decode rate (``generation.generate``, a fresh random student of (c)'s shape) for
       the static engine, the graph engine (``--rollout-engine graph``) and, where it runs, the
       dynamic one: the time per decode step from two generation lengths (prefill cancels),
       against the bound of reading the weights once per step at the copy bandwidth and at the
       datasheet's; the graph engine's replayed greedy tokens against the same step run eagerly
       (must be equal) and against the static engine's (bf16: near-ties may differ).

They run in the order env, a, b, d, c: (d)'s decode step estimates (c)'s rollouts, and an OPD
step that would end past ``--budget`` seconds (default 360) is skipped, as is any section that
would start after it; each skip counts as a failure.

Writes ``gpu_check.json`` and ``gpu_check.txt`` to ``--out-dir`` ($OUT, else $OUT_DIR, else a new
temporary directory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_reward_op import logits_from_an_output_layer  # noqa: E402

from megatron_opd.models import gpt  # noqa: E402
from megatron_opd.runtime import distributed  # noqa: E402

GIB = 2**30
DATASHEET_TBS = {"H200": 4.8, "H100": 3.35}  # HBM bandwidth by the vendors' datasheets, TB/s
# The paper's Table 4, Qwen3-0.6B <- Qwen3-4B: seconds per step, peak GiB
PAPER_TABLE4 = {"power": (9.03, 60.72), "full_vocab_kl": (22.14, 78.99)}
QWEN3_VOCAB = 151_936
PROMPT_DATA, MAX_PROMPT_LENGTH = "builtin:64", 256


def qwen3(layers, hidden, heads, kv_heads, head_dim, intermediate, vocab=QWEN3_VOCAB):
    return gpt.ArchConfig(
        model_type="qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=1_000_000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


@dataclass
class Shapes:
    numerics: gpt.ArchConfig
    numerics_batch: tuple[int, int]  # (sequences, tokens each)
    op_tokens: tuple[int, int]  # (seq, batch): logits [seq, batch, vocab]
    op_vocab: int
    op_chunks: tuple[int, ...]  # tokens per chunk; the device's default is marked
    op_reps: int
    student: gpt.ArchConfig
    teacher: gpt.ArchConfig
    prompts: int
    new_tokens: int
    warmup_tokens: int
    micro_batch: int
    decode_tokens: tuple[int, int]  # two generation lengths; their difference times decode
    dtype: torch.dtype = torch.bfloat16


def full_shapes() -> Shapes:
    student = qwen3(28, 1024, 16, 8, 128, 3072)  # Qwen3-0.6B
    return Shapes(
        numerics=student,
        numerics_batch=(2, 1024),
        op_tokens=(1024, 8),
        op_vocab=QWEN3_VOCAB,
        op_chunks=(16, 1024),
        op_reps=10,
        student=student,
        teacher=qwen3(36, 2560, 32, 8, 128, 9728),  # Qwen3-4B
        prompts=8,
        new_tokens=1024,
        warmup_tokens=16,
        micro_batch=8,
        decode_tokens=(16, 272),
    )


def small_shapes() -> Shapes:
    """Minutes on two CPU cores: the same code paths at toy sizes (the op at the real vocab)."""
    return Shapes(
        numerics=qwen3(2, 64, 4, 2, 16, 128, vocab=2048),
        numerics_batch=(2, 32),
        op_tokens=(64, 1),
        op_vocab=QWEN3_VOCAB,
        op_chunks=(16,),
        op_reps=2,
        student=qwen3(2, 64, 4, 2, 16, 128, vocab=2048),
        teacher=qwen3(2, 96, 4, 2, 24, 192, vocab=2048),
        prompts=4,
        new_tokens=16,
        warmup_tokens=4,
        micro_batch=2,
        decode_tokens=(4, 20),
    )


@dataclass
class Row:
    section: str
    quantity: str
    value: float
    unit: str = ""
    reference: str = ""


@dataclass
class Context:
    shapes: Shapes
    device: torch.device
    workdir: Path
    grid: Any  # the world of one's ModelGrid (distributed.initialize)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    copy_tbs: Optional[float] = None  # measured in (b)
    peak_tbs: Optional[float] = None  # the datasheet's, when the card is known
    budget: float = math.inf  # seconds for all sections
    deadline: float = math.inf  # time.perf_counter() by which the sections must be done
    prompts: Any = None  # (tokenizer, PromptSet), shared by (c) and (d)
    decode_step: Optional[float] = None  # seconds, measured in (d)
    weight_bytes: Optional[int] = None  # the student's, from (d)
    section_times: dict[str, float] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def row(self, section, quantity, value, unit="", reference="") -> None:
        self.rows.append(Row(section, quantity, float(value), unit, reference))

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def timed(
    ctx: Context,
    fn: Callable[[], Any],
    reps: int,
    before: Optional[Callable[[], Any]] = None,
    warmup: bool = True,
) -> float:
    """Median seconds of ``fn`` over ``reps`` runs, after one untimed run with ``warmup``;
    ``before`` runs untimed ahead of each (refilling an input that ``fn`` consumes)."""
    times = []
    for i in range(reps + 1 if warmup else reps):
        if before is not None:
            before()
        ctx.sync()
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        if i or not warmup:
            times.append(elapsed)
    return statistics.median(times)


def free_memory(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# env


def section_env(ctx: Context) -> None:
    from importlib.metadata import PackageNotFoundError, version

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    try:
        print(f"megatron-core {version('megatron-core')}")
    except PackageNotFoundError:
        import megatron.core

        print(f"megatron-core {getattr(megatron.core, '__version__', '?')} (no package metadata)")
    if ctx.cuda:
        p = torch.cuda.get_device_properties(ctx.device)
        print(
            f"GPU {p.name}, {p.total_memory / GIB:.1f} GiB, sm_{p.major}{p.minor}, "
            f"{p.multi_processor_count} SMs; {torch.cuda.device_count()} visible"
        )
        ctx.peak_tbs = next((v for k, v in DATASHEET_TBS.items() if k in p.name), None)
    else:
        print(f"no CUDA: CPU only ({os.cpu_count()} cores), small shapes; device-only steps skip")
    for name, module in (
        ("transformer-engine", "transformer_engine.pytorch"),
        ("flash-attn", "flash_attn"),
    ):
        try:
            __import__(module)
            print(f"{name}: present")
        except Exception as e:  # ImportError, or a broken build raising anything else
            print(f"skip {name}: not importable ({type(e).__name__}: {str(e)[:100]})")
    from megatron_opd.rollout import generation

    reason = generation.dynamic_engine_unavailable()
    print(f"skip dynamic inference engine: {reason}" if reason else "dynamic engine: available")


# ----------------------------------------------------------------------------------------------
# (a) numerics


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |x - ref| / max |ref|, mean |x - ref| / mean |ref|), in float64."""
    x, ref = x.double(), ref.double()
    diff = (x - ref).abs()
    return float(diff.max() / ref.abs().max()), float(diff.mean() / ref.abs().mean())


def section_numerics(ctx: Context) -> None:
    from megatron_opd.reward.vocab_parallel import sampled_token_logprobs

    arch, (b, s) = ctx.shapes.numerics, ctx.shapes.numerics_batch
    spec = gpt.layer_spec(arch).submodules.self_attention.submodules.core_attention
    print(
        f"(a) layer spec core attention: {spec.__name__}; {arch.num_hidden_layers} layers, "
        f"hidden {arch.hidden_size}, vocab {arch.vocab_size}; {b} x {s} tokens"
    )
    torch.manual_seed(0)
    (ref,) = gpt.build_model(arch, gpt.transformer_config(arch, dtype=torch.float32), ctx.grid)
    (low,) = gpt.build_model(arch, gpt.transformer_config(arch, dtype=ctx.shapes.dtype), ctx.grid)
    low.load_state_dict(ref.state_dict())  # the same weights, rounded to bf16
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, arch.vocab_size, (b, s), generator=gen).to(ctx.device)
    targets = torch.randint(0, arch.vocab_size, (b, s), generator=gen).to(ctx.device)
    inputs = (tokens, gpt.position_ids(b, s, ctx.device), gpt.causal_mask(s, ctx.device))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        out = {}
        for name, model in (("ref", ref), ("low", low)):
            logits = model(*inputs)
            loss = -sampled_token_logprobs(logits, targets, arch.vocab_size).mean()
            loss.backward()
            out[name] = (logits.detach()[..., : arch.vocab_size].float(), float(loss))
            del logits, loss
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    last = arch.num_hidden_layers - 1
    grads = {
        "embedding": "embedding.word_embeddings.weight",
        "layer 0 qkv": "decoder.layers.0.self_attention.linear_qkv.weight",
        f"layer {last} fc2": f"decoder.layers.{last}.mlp.linear_fc2.weight",
        "final norm": "decoder.final_layernorm.weight",
    }
    ref_params, low_params = dict(ref.named_parameters()), dict(low.named_parameters())
    checks = {"logits": (out["low"][0], out["ref"][0])}
    for label, name in grads.items():
        checks[f"grad {label}"] = (low_params[name].grad, ref_params[name].grad)
    worst = 0.0
    for label, (x, r) in checks.items():
        if x is None or r is None:
            raise RuntimeError(f"{label}: no gradient")
        max_rel, mean_rel = relative_errors(x, r)
        ctx.row("a", f"{label}: max rel err", max_rel, "", "bf16 vs fp32")
        ctx.row("a", f"{label}: mean rel err", mean_rel, "", "bf16 vs fp32")
        worst = max(worst, mean_rel)
    ctx.row("a", "loss bf16 - fp32", out["low"][1] - out["ref"][1], "nats")
    # bf16 rounding (2^-9 relative per operand) through the layers: mean errors of a few percent
    # at most; beyond 0.1 something computes the wrong function
    if not math.isfinite(worst) or worst > 0.1:
        raise AssertionError(f"bf16 mean relative error {worst:.3g} is over 0.1")


# ----------------------------------------------------------------------------------------------
# (b) reward op bandwidth


def measure_copy(ctx: Context) -> float:
    """Device-to-device (or RAM) copy bandwidth, TB/s, counting bytes read plus written."""
    n = (2 * GIB if ctx.cuda else 256 * 2**20) // 4
    src = torch.randn(n, device=ctx.device)
    dst = torch.empty_like(src)
    t = timed(ctx, lambda: dst.copy_(src), reps=10 if ctx.cuda else 3)
    return 2 * n * 4 / t / 1e12


def section_reward_op(ctx: Context) -> None:
    from megatron_opd.reward.vocab_parallel import (
        default_chunk_size,
        full_vocab_reverse_kl,
        sampled_token_logprobs,
    )

    sh = ctx.shapes
    (seq, batch), vocab = sh.op_tokens, sh.op_vocab
    n = seq * batch
    ctx.copy_tbs = measure_copy(ctx)
    peak = ctx.peak_tbs
    ctx.row(
        "b",
        "copy bandwidth (read + write)",
        ctx.copy_tbs,
        "TB/s",
        f"datasheet {peak} TB/s" if peak else "",
    )
    gen = torch.Generator(device=ctx.device).manual_seed(2)
    shape = (seq, batch, vocab)
    pristine = torch.randn(shape, generator=gen, device=ctx.device, dtype=sh.dtype) * 3
    student = torch.empty_like(pristine)
    teacher = torch.randn(shape, generator=gen, device=ctx.device, dtype=sh.dtype) * 3
    targets = torch.randint(0, vocab, (seq, batch), generator=gen, device=ctx.device)
    upstream = torch.randn(seq, batch, generator=gen, device=ctx.device) / n
    unit = n * vocab * pristine.element_size()  # NV2: one pass over one logits tensor
    print(f"(b) logits [{seq}, {batch}, {vocab}] {sh.dtype}: NV2 = {unit / 1e9:.3f} GB")

    def refill():
        student.copy_(pristine)

    for chunk in sh.op_chunks:
        default = chunk == default_chunk_size(ctx.device)
        tag = f"chunk {chunk}" + (" (default)" if default else "")

        def forward(chunk=chunk):
            with torch.no_grad():
                sampled_token_logprobs(student, targets, vocab, None, chunk)

        def forward_backward(chunk=chunk):
            x = logits_from_an_output_layer(student)
            sampled_token_logprobs(x, targets, vocab, None, chunk, True).backward(upstream)

        def kl_forward_backward(chunk=chunk):
            x = logits_from_an_output_layer(student)
            full_vocab_reverse_kl(x, teacher, vocab, None, chunk, True).backward(upstream)

        for label, fn, passes in (
            ("log-prob fwd", forward, 1),
            ("log-prob fwd+bwd", forward_backward, 3),
            ("full-vocab KL fwd+bwd", kl_forward_backward, 5),
        ):
            t = timed(ctx, fn, sh.op_reps, before=refill)
            tbs = passes * unit / t / 1e12
            ref = f"{passes} NV2; {t * 1e3:.2f} ms"
            if peak:
                ref += f"; {tbs / peak:.1%} of {peak} TB/s"
            ref += f"; {tbs / ctx.copy_tbs:.1%} of copy"
            ctx.row("b", f"{label}, {tag}", tbs, "TB/s", ref)


# ----------------------------------------------------------------------------------------------
# random models, the trainer's flags, tokenizer and prompts for (c) and (d)


def random_checkpoint(ctx: Context, arch: gpt.ArchConfig, directory: Path) -> None:
    """A Megatron checkpoint of ``arch`` with Megatron's random initialization."""
    from megatron_opd.runtime import checkpointing

    torch.manual_seed(3)
    chunks = gpt.build_model(arch, gpt.transformer_config(arch, dtype=ctx.shapes.dtype), ctx.grid)
    checkpointing.save_model(chunks, directory)
    del chunks


def random_teacher(ctx: Context, arch: gpt.ArchConfig) -> list[torch.nn.Module]:
    """Frozen and in eval mode, as ``launch.build_teacher`` leaves a loaded teacher."""
    torch.manual_seed(4)
    chunks = gpt.build_model(arch, gpt.transformer_config(arch, dtype=ctx.shapes.dtype), ctx.grid)
    for c in chunks:
        c.eval()
        c.requires_grad_(False)
    return chunks


def opd_args(ctx: Context, student_dir: Path, kind: str, new_tokens: int, engine: str = "auto"):
    from megatron_opd.training import arguments

    sh = ctx.shapes
    flags = [
        "--load", student_dir, "--opd-teacher-load", student_dir,
        "--opd-reward", kind, "--prompt-data", PROMPT_DATA,
        "--max-prompt-length", MAX_PROMPT_LENGTH,
        "--global-batch-size", sh.prompts, "--micro-batch-size", sh.micro_batch,
        "--rollout-max-new-tokens", new_tokens, "--no-opd-mask-terminal-stop",
        "--lr", "1e-6", "--lr-warmup-fraction", 0, "--train-iters", 100, "--seed", 5,
        "--rollout-engine", engine,
    ]  # fmt: skip
    if sh.dtype == torch.bfloat16:
        flags += ["--bf16", "--opd-teacher-bf16"]
    return arguments.parse_args([str(f) for f in flags])


def rollout_inputs(ctx: Context):
    """The tokenizer (stop tokens ignored: every response has the full length) and prompts."""
    if ctx.prompts is None:
        from megatron_opd.models.tiny import save_bpe_tokenizer
        from megatron_opd.models.tokenizer import load_tokenizer
        from megatron_opd.training import data

        save_bpe_tokenizer(ctx.workdir / "tokenizer")
        tokenizer = load_tokenizer(ctx.workdir / "tokenizer")
        tokenizer.stop_token_ids = []
        problems = data.load_prompt_source(PROMPT_DATA, seed=0)
        ctx.prompts = tokenizer, data.PromptSet.build(problems, tokenizer, MAX_PROMPT_LENGTH)
    return ctx.prompts


def weight_bound(ctx: Context, rate: float, batch: int, prefix: str = "") -> None:
    """Rows: the decode rate if every step read the weights once and did nothing else."""
    for label, tbs in (("copy", ctx.copy_tbs), ("datasheet", ctx.peak_tbs)):
        if tbs and ctx.weight_bytes:
            bound = batch / (ctx.weight_bytes / (tbs * 1e12))
            ctx.row(
                "d",
                f"{prefix}bound: weights once per step at {label} {tbs:.3g} TB/s",
                bound,
                "tok/s",
                f"{ctx.weight_bytes / 1e9:.3g} GB of weights; decode {rate / bound:.1%}",
            )


# ----------------------------------------------------------------------------------------------
# (d) decode rate (before (c): its decode step sizes (c)'s budget check)


def section_decode(ctx: Context) -> None:
    from megatron_opd.rollout import engines, generation
    from megatron_opd.rollout.engines.graph import GraphEngine

    sh = ctx.shapes
    tokenizer, prompts = rollout_inputs(ctx)
    torch.manual_seed(6)
    config = gpt.transformer_config(sh.student, dtype=sh.dtype)
    chunks = gpt.build_model(sh.student, config, ctx.grid)
    ctx.weight_bytes = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    batch = prompts.token_ids[: sh.prompts]
    short, long = sh.decode_tokens
    # the graph engine's replay against the same step run eagerly: the same greedy tokens
    eager = GraphEngine(chunks)
    eager.capture = False

    def greedy(run):
        out = run(tokenizer, batch, max_new_tokens=32)
        return [g.tokens for g in out]

    kwargs = dict(greedy=True, stop_token_ids=[], return_logprobs=False)
    replayed = greedy(lambda t, b, **kw: generation.generate(chunks, t, b, engine="graph",
                                                            **kw, **kwargs))  # fmt: skip
    sampling = engines.Sampling(
        max_new_tokens=32, stop_token_ids=(), greedy=True, vocab_size=sh.student.vocab_size,
        return_logprobs=False,
    )  # fmt: skip
    unreplayed = [g.tokens for g in eager.generate(tokenizer, batch, sampling, 0)]
    static = greedy(lambda t, b, **kw: generation.generate(chunks, t, b, engine="static",
                                                          **kw, **kwargs))  # fmt: skip
    eager.release()
    same = sum(a == b for a, b in zip(replayed, unreplayed, strict=True))
    ctx.row("d", "graph: greedy rows equal to eager", same, f"of {len(batch)}", "32 new tokens")
    agree = sum(
        x == y for a, b in zip(replayed, static, strict=True) for x, y in zip(a, b, strict=True)
    )
    ctx.row("d", "graph: greedy tokens equal to static", agree / (32 * len(batch)), "frac",
            "bf16: different kernels may flip near-ties")  # fmt: skip
    if same != len(batch):
        raise AssertionError(f"graph replay differs from eager in {len(batch) - same} rows")
    # the dynamic engine only where it runs (CUDA and flash-attn); env printed why not
    names = ["static", "graph"]
    names += ["dynamic"] if generation.dynamic_engine_unavailable() is None else []
    steps = {}
    for engine in names:
        times = {}
        for n in (long, short):  # the longer first: the graph engine's bucket fits both

            def run(n=n, engine=engine):
                generation.generate(
                    chunks, tokenizer, batch, n, seed=0, return_logprobs=False,
                    stop_token_ids=[], engine=engine,
                )  # fmt: skip

            times[n] = timed(ctx, run, reps=1, warmup=n == long)  # one warm-up for both
        step = steps[engine] = (times[long] - times[short]) / (long - short)
        prefix = "" if engine == "static" else f"{engine} engine: "
        lengths = f"prompts {min(map(len, batch))}-{max(map(len, batch))} tokens"
        ctx.row("d", f"{prefix}decode step, batch {len(batch)}", step * 1e3, "ms",
                f"{long} vs {short} new tokens; {lengths}")  # fmt: skip
        ctx.row("d", f"{prefix}decode tokens/s", len(batch) / step, "tok/s")
        if engine != "static":
            ctx.row("d", f"{prefix}decode step / static", step / steps["static"], "x")
        weight_bound(ctx, len(batch) / step, len(batch), prefix)
    ctx.decode_step = steps[engines.resolve("auto", chunks)]  # what (c)'s rollouts use
    engines.release_engines(chunks)
    kv = kv_bytes(sh.student, len(batch), long + max(map(len, batch)))
    print(f"(d) KV cache read at the last of {long} steps, not in the bound: {kv / 1e9:.3f} GB")


# ----------------------------------------------------------------------------------------------
# (c) one OPD step


def section_opd_step(ctx: Context) -> None:
    from megatron_opd.rollout import engines
    from megatron_opd.training import arguments, launch
    from megatron_opd.training.teacher import on_student_grid
    from megatron_opd.training.trainer import Trainer

    sh = ctx.shapes
    tokenizer, prompts = rollout_inputs(ctx)
    student_dir = ctx.workdir / "student"
    t0 = time.perf_counter()
    random_checkpoint(ctx, sh.student, student_dir)
    teacher = random_teacher(ctx, sh.teacher)
    inputs = launch.Inputs(
        student_dir=student_dir,
        resume_root=None,
        teacher_dir=student_dir,
        student_arch=sh.student,
        student_meta={},
        teacher_arch=sh.teacher,
        teacher_meta={},
        tokenizer=tokenizer,
        prompts=prompts,
    )
    args = opd_args(ctx, student_dir, "power", sh.new_tokens)
    student, optimizer, scheduler = launch.build_student(args, inputs, ctx.grid)
    params = sum(p.numel() for c in student for p in c.parameters()) / 1e9
    t_params = sum(p.numel() for c in teacher for p in c.parameters()) / 1e9
    teachers = on_student_grid(teacher, ctx.grid)
    print(
        f"(c) student {params:.3f} B parameters, teacher {t_params:.3f} B; built in "
        f"{time.perf_counter() - t0:.1f} s; {sh.prompts} prompts x {sh.new_tokens} new tokens, "
        f"micro-batch {sh.micro_batch}"
    )
    estimate = None  # seconds for a kind's warm-up and timed step
    if ctx.decode_step:
        estimate = 1.3 * ctx.decode_step * (sh.new_tokens + sh.warmup_tokens) + 15
    skipped = []
    auto = engines.resolve("auto", student)
    runs = [("power", auto), ("full_vocab_kl", auto)]
    runs += [("power", "static")] if auto != "static" else []  # the engine (c) had before
    for kind, engine in runs:
        left = ctx.deadline - time.perf_counter()
        if estimate is not None and estimate > left:
            skipped.append(f"{kind} skipped: about {estimate:.0f} s needed, {left:.0f} s left")
            continue
        t_kind = time.perf_counter()
        for new_tokens in (sh.warmup_tokens, sh.new_tokens):  # warm-up, then the timed step
            args = opd_args(ctx, student_dir, kind, new_tokens, engine)
            config = arguments.trainer_config(args)
            trainer = Trainer(config, inputs, ctx.grid, student, optimizer, scheduler, teachers)
            m = trainer.train_one_step()
        estimate = 1.2 * (time.perf_counter() - t_kind)
        label = kind if engine == auto else f"{kind} ({engine} engine)"
        if m["response/mean_len"] != sh.new_tokens:
            raise AssertionError(f"{kind}: mean response {m['response/mean_len']} tokens")
        bad = [k for k in ("loss", "reward/mean", "grad_norm") if not math.isfinite(m.get(k, 0))]
        if bad or not m["applied"]:
            raise AssertionError(f"{kind}: step not applied or non-finite {bad}: {m}")
        paper_s, paper_gib = PAPER_TABLE4[kind]
        for phase in ("rollout", "teacher", "train"):
            ctx.row("c", f"{label}: {phase}", m[f"time/{phase}"], "s")
        ctx.row("c", f"{label}: step", m["time/step"], "s", f"paper {paper_s} s")
        ctx.row("c", f"{label}: response tokens/s", m["tokens_per_sec"], "tok/s", "over the step")
        rollout_rate = sh.prompts * sh.new_tokens / m["time/rollout"]
        reference = "prefill included"
        if ctx.copy_tbs and ctx.weight_bytes:
            bound = sh.prompts / (ctx.weight_bytes / (ctx.copy_tbs * 1e12))
            reference += f"; {rollout_rate / bound:.1%} of (d)'s bound at copy bandwidth"
        ctx.row("c", f"{label}: rollout tokens/s", rollout_rate, "tok/s", reference)
        ctx.row("c", f"{label}: peak memory", m["memory/peak_gib"], "GiB", f"paper {paper_gib} GiB")
    if skipped:
        raise TimeoutError("; ".join(skipped) + f" of the budget (--budget {ctx.budget:.0f} s)")


def kv_bytes(arch: gpt.ArchConfig, batch: int, positions: int, element: int = 2) -> int:
    return (
        2
        * arch.num_hidden_layers
        * arch.num_key_value_heads
        * arch.head_dim
        * (batch * positions * element)
    )


# ----------------------------------------------------------------------------------------------


SECTIONS = (
    ("env", section_env),
    ("a", section_numerics),
    ("b", section_reward_op),
    ("d", section_decode),
    ("c", section_opd_step),
)
NOTES = (
    "(a) bf16 model vs an fp32 copy of its weights, forward + backward; max rel err = "
    "max|x - ref| / max|ref|, mean rel err = mean|x - ref| / mean|ref|",
    "(b) bytes model, N tokens x V columns x 2 bytes: log-prob fwd 1 NV2 (logits read once), "
    "fwd+bwd 3 NV2 (read twice, gradient written in place), KL fwd+bwd 5 NV2 (student and "
    "teacher read in both passes, gradient written); scratch and [N] vectors not counted",
    "(c) trainer.Trainer.train_one_step after a short warm-up step; random weights, stops "
    "ignored; paper: Table 4 (Qwen3-0.6B <- 4B)",
    "(d) a fresh random student, before (c); decode step = (time at the longer - time at the "
    "shorter generation) / the difference in steps; bound = batch / (weight bytes / bandwidth); "
    "the KV cache read is not in it",
)


def run_section(ctx: Context, name: str, fn) -> None:
    t0 = time.perf_counter()
    print(f"\n=== {name} ===", flush=True)
    if t0 > ctx.deadline and name != "env":
        line = f"{name}: skipped: the budget of {ctx.budget:.0f} s (--budget) is spent"
        ctx.failed.append(line)
        print(f"FAILED {line}", flush=True)
        return
    try:
        fn(ctx)
    except Exception as e:
        traceback.print_exc()
        line = f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ctx.failed.append(line)
        print(f"FAILED {line}", flush=True)
    free_memory(ctx)  # the section's tensors went with its frame
    elapsed = time.perf_counter() - t0
    ctx.section_times[name] = round(elapsed, 1)
    print(f"--- {name}: {elapsed:.1f} s", flush=True)


def format_value(v: float) -> str:
    if v != v or abs(v) == math.inf:
        return str(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def table(ctx: Context, mode: str, notes: list[str]) -> str:
    lines = [
        f"gpu_check ({mode}): {ctx.device}",
        "",
        "| section | quantity | value | unit | reference |",
        "|---|---|---:|---|---|",
    ]
    for r in ctx.rows:
        lines.append(
            f"| {r.section} | {r.quantity} | {format_value(r.value)} | {r.unit} | {r.reference} |"
        )
    lines.append("")
    lines += NOTES
    lines += notes
    lines.append(f"failed: {len(ctx.failed)}" + "".join(f"\n  {f}" for f in ctx.failed))
    return "\n".join(lines)


def write_results(ctx: Context, mode: str, out_dir: Path, total: float, budget: float) -> None:
    """gpu_check.txt (the table) and gpu_check.json (the same rows, failures, section times)."""
    times = ", ".join(f"{k} {v:.0f} s" for k, v in ctx.section_times.items())
    notes = [*ctx.notes, f"total {total:.0f} s ({times}); budget {budget:.0f} s"]
    (out_dir / "gpu_check.txt").write_text(table(ctx, mode, notes) + "\n")
    result = {
        "mode": mode,
        "device": str(ctx.device),
        "rows": [vars(r) for r in ctx.rows],
        "failed": ctx.failed,
        "notes": notes,
        "section_seconds": ctx.section_times,
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--small", action="store_true", help="tiny shapes (default without CUDA)")
    p.add_argument(
        "--budget",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET_S", 360)),
        help="seconds for all sections (default $GPU_CHECK_BUDGET_S or 360): a section that "
        "would start later, or an OPD step estimated not to fit, is skipped and counts as failed",
    )
    p.add_argument("--only", nargs="*", choices=[n for n, _ in SECTIONS], default=None)
    args = p.parse_args(argv)
    out_dir = args.out_dir or Path(
        os.environ.get("OUT") or os.environ.get("OUT_DIR") or tempfile.mkdtemp(prefix="gpu_check_")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    small = args.small or os.environ.get("GPU_CHECK_SMALL") == "1" or not cuda
    mode = "small shapes" if small else "Qwen3 shapes"
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    grid = distributed.initialize().grid  # a world of one: NCCL on the GPU, gloo on the CPU
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    ctx = Context(small_shapes() if small else full_shapes(), device, workdir, grid)
    t0 = time.perf_counter()
    ctx.budget, ctx.deadline = args.budget, t0 + args.budget
    try:
        for name, fn in SECTIONS:
            if args.only is None or name in args.only or name == "env":
                run_section(ctx, name, fn)
                # after every section: a run killed at the device's time limit keeps its rows
                write_results(ctx, mode, out_dir, time.perf_counter() - t0, args.budget)
    finally:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + (out_dir / "gpu_check.txt").read_text(), flush=True)
    print(f"written: {out_dir / 'gpu_check.json'}, {out_dir / 'gpu_check.txt'}")
    distributed.teardown()
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
