"""The graph engine (``megatron_opd.rollout.engines.graph``), run eagerly on CPU as a GPU captures
it:

* its logits at every decode position equal a full forward of the same model without a cache;
* its greedy tokens (and log-probs) equal Megatron-Core's static engine's, with left padding,
  mixed prompt lengths, stop tokens and the length limit, on Qwen3 (untied, tied) and Llama, at
  TP1 in-process and TP2 on gloo, on the student in place and on a refitted rollout copy;
* sampling is reproducible under a seed, and its frequencies match the tempered / top-k / top-p
  distribution of the full forward (chi-square, computed here in float64);
* the decode step traces under ``torch.compile(fullgraph=True)`` with no graph break (the CPU
  stand-in for "capturable": no host reads, no data-dependent shapes) and gives the eager step's
  result;
* a weight changed in place changes the next rollout with the same engine and bucket;
* one OPD run with ``--rollout-engine graph`` equals the static engine's, step for step, in
  greedy mode (top-k 1), colocated and on a rollout rank;
* a pipeline-parallel rollout model is a one-line error naming the rollout layout flags.
"""

from __future__ import annotations

import math

import pytest
import torch
from opd_setup import SHORT_RUN, make_pair, read_metrics, torchrun
from test_convert import NEW_TOKENS, TINY, TINY_PROMPTS, load_megatron, megatron_logits, tiny  # noqa: F401,I001

from megatron_opd.models.tokenizer import load_tokenizer
from megatron_opd.rollout import engines, generation
from megatron_opd.rollout.engines import graph
from megatron_opd.rollout.engines.base import Sampling
from megatron_opd.runtime.spawn import run_distributed
from megatron_opd.training import arguments

NAMES = list(TINY)


def _greedy(case, stops=()) -> Sampling:
    return Sampling(
        max_new_tokens=NEW_TOKENS, stop_token_ids=tuple(stops), vocab_size=case.vocab, greedy=True
    )


class RecordingEngine(graph.GraphEngine):
    """The graph engine, keeping a copy of the logits of every position it decodes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def _logits(self, hidden):
        logits = super()._logits(hidden)
        self.seen.append(logits.clone())
        return logits


# ------------------------------------------------------------------------------------------------
# TP1, in-process


def _full_forward(model, tokens: list[int], pad: int) -> torch.Tensor:
    """Logits ``[s, padded vocab]`` of one row by a plain forward (no cache) at the positions the
    engine used: ``pad`` left-padding tokens first, masked as keys."""
    from megatron_opd.models import gpt

    s = len(tokens)
    mask = gpt.causal_mask(s) | (torch.arange(s) < pad)[None, None, None, :]
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), gpt.position_ids(1, s), mask,
                       runtime_gather_output=True)  # fmt: skip
    return logits[0]


def _decode_errors(chunks, tokenizer, case, dtype) -> tuple[float, float, list]:
    """Run the engine with the model in ``dtype``; the largest difference of its logits at every
    decode position from a float64 full forward, the same for a full forward in ``dtype``, and
    the generated tokens."""
    model = chunks[0]
    model.to(dtype)
    engine = RecordingEngine(chunks)
    out = engine.generate(tokenizer, TINY_PROMPTS, _greedy(case), 0)
    assert len(engine.seen) == NEW_TOKENS  # the prefill's, then one per decode step
    longest = max(map(len, TINY_PROMPTS))
    engine_error = forward_error = 0.0
    for row, (prompt, g) in enumerate(zip(TINY_PROMPTS, out, strict=True)):
        assert len(g.tokens) == NEW_TOKENS
        pad = longest - len(prompt)
        tokens = [0] * pad + prompt + g.tokens
        same_dtype = _full_forward(model, tokens, pad)[longest - 1 :, : case.vocab].double()
        reference = _full_forward(model.double(), tokens, pad)[longest - 1 :, : case.vocab]
        model.to(dtype)
        for i in range(NEW_TOKENS):
            got = engine.seen[i][row, : case.vocab].double()
            engine_error = max(engine_error, (got - reference[i]).abs().max().item())
            forward_error = max(forward_error, (same_dtype[i] - reference[i]).abs().max().item())
    return engine_error, forward_error, [g.tokens for g in out]


@pytest.mark.parametrize("name", NAMES)
def test_decode_logits_equal_a_full_forward_without_a_cache(tiny, name):  # noqa: F811
    """In float64 the cached decode is the full forward to rounding (1e-10, logits up to ~10);
    in float32 it is as close to the float64 forward as Megatron's own float32 forward is (both
    about 1e-5 here: float32's floor at these magnitudes, so 1e-5 itself is not a fair bound)."""
    case = tiny[name]
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)
    error64, _, tokens64 = _decode_errors(chunks, tokenizer, case, torch.float64)
    assert error64 < 1e-10
    error32, forward32, tokens32 = _decode_errors(chunks, tokenizer, case, torch.float32)
    assert error32 < 1.5 * forward32, (error32, forward32)
    assert tokens32 == tokens64 == case.greedy  # and transformers' greedy tokens


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_the_static_engine(tiny, name):  # noqa: F811
    case = tiny[name]
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)

    def run(engine, stops):
        return generation.generate(
            chunks, tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, stop_token_ids=stops,
            engine=engine,
        )  # fmt: skip

    # stop on tokens that end two rows early and leave the third to the length limit
    stops = sorted({case.greedy[0][2], case.greedy[1][4]} - set(case.greedy[2]))
    assert stops, "the tiny model's greedy rows share every candidate stop token"
    for stop_ids in ([], stops):
        static, graphed = run("static", stop_ids), run("graph", stop_ids)
        assert [g.tokens for g in graphed] == [g.tokens for g in static]
        assert [g.truncated for g in graphed] == [g.truncated for g in static]
        for a, b in zip(static, graphed, strict=True):
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs),
                                       rtol=0, atol=1e-5)  # fmt: skip
    lengths = [
        next((i + 1 for i, t in enumerate(g) if t in stops), NEW_TOKENS) for g in case.greedy
    ]
    assert [len(g.tokens) for g in graphed] == lengths
    assert [g.truncated for g in graphed] == [n == NEW_TOKENS for n in lengths]
    assert min(lengths) < NEW_TOKENS == max(lengths)  # both endings happened


def test_sampling_is_reproducible_under_a_seed(tiny):  # noqa: F811
    case = tiny["qwen3_untied"]
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)

    def run(seed, **knobs):
        out = generation.generate(
            chunks, tokenizer, TINY_PROMPTS * 4, 12, seed=seed, stop_token_ids=[],
            engine="graph", **knobs,
        )  # fmt: skip
        return [g.tokens for g in out]

    for knobs in ({"temperature": 1.3}, {"top_k": 7}, {"top_p": 0.8}):
        first = run(11, **knobs)
        assert run(11, **knobs) == first
        assert run(12, **knobs) != first
        assert len({tuple(t) for t in first}) > 6  # it did sample


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square p-value of ``counts`` against ``probs`` (float64), pooling the
    cells expected below 5 into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2.0))


def _reference(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=0.0) -> torch.Tensor:
    """The sampling distribution, in float64: tempered, then filtered as Megatron defines it."""
    logits = logits.double() / temperature
    if top_k:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, -1)
    if top_p:
        values, order = probs.sort(descending=True)
        before = values.cumsum(0) - values
        probs = torch.zeros_like(probs).scatter(0, order, values * (before <= top_p))
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize(
    "knobs", [{"temperature": 0.7}, {"temperature": 1.0, "top_k": 5}, {"top_p": 0.6}]
)
def test_sampled_frequencies_match_the_sampling_distribution(tiny, knobs):  # noqa: F811
    case = tiny["qwen3_untied"]  # vocabulary 100
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)
    prompt = TINY_PROMPTS[0]
    n = 6000
    out = generation.generate(
        chunks, tokenizer, [prompt] * n, 1, seed=3, stop_token_ids=[], engine="graph", **knobs
    )
    counts = torch.bincount(torch.tensor([g.tokens[0] for g in out]), minlength=case.vocab)
    logits = megatron_logits(chunks[0], torch.tensor([prompt]))[0, -1, : case.vocab]
    probs = _reference(logits, **knobs)
    assert counts[probs == 0].sum() == 0  # nothing outside the filter
    assert _chi_square_p(counts.double(), probs) > 1e-3
    # the test can tell: the unfiltered, untempered distribution is rejected
    assert _chi_square_p(counts.double(), _reference(logits)) < 1e-3


def test_decode_step_traces_with_no_graph_break(tiny):  # noqa: F811
    case = tiny["qwen3_tied"]
    chunks = load_megatron(case.megatron_dir)
    engine = graph.GraphEngine(chunks)
    tokenizer = load_tokenizer(case.megatron_dir)
    sampling = Sampling(max_new_tokens=6, stop_token_ids=(), vocab_size=case.vocab, top_k=5)
    engine.generate(tokenizer, TINY_PROMPTS, sampling, seed=1)
    (bucket,) = engine.buckets.values()
    key = (False, 5, False, True, case.vocab)
    state = ("token", "position", "step", "done", "tokens", "logprobs")
    start = {name: getattr(bucket, name).clone() for name in state}
    cache = [k.clone() for k in bucket.keys]
    torch._dynamo.reset()
    compiled = torch.compile(engine.decode_step, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(bucket, key, tokenizer.pad_id)  # raises on a graph break
    after_compiled = {name: getattr(bucket, name).clone() for name in state}
    for name in state:
        getattr(bucket, name).copy_(start[name])
    for k, k0 in zip(bucket.keys, cache, strict=True):
        k.copy_(k0)
    with torch.no_grad():
        engine.decode_step(bucket, key, tokenizer.pad_id)
    for name in state:
        torch.testing.assert_close(after_compiled[name], getattr(bucket, name), rtol=0, atol=1e-6)
    assert int(bucket.step) == int(start["step"]) + 1


def test_capturing_mid_rollout_leaves_the_rollout_as_it_was(tiny):  # noqa: F811
    """On a GPU a bucket meets a new sampling key after its prefill, and the warm-up and the
    capture run the step: what they change is put back (here the same steps run eagerly)."""
    case = tiny["qwen3_untied"]
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)
    sampling = Sampling(max_new_tokens=NEW_TOKENS, stop_token_ids=(), vocab_size=case.vocab)
    straight = graph.GraphEngine(chunks).generate(tokenizer, TINY_PROMPTS, sampling, seed=4)

    class CapturingEngine(graph.GraphEngine):
        def _step_for(self, bucket, key, pad_id):
            def capture():  # the 3 warm-up runs and the recorded one
                for _ in range(4):
                    self.decode_step(bucket, key, pad_id)

            self.off_the_record(bucket, capture)
            return super()._step_for(bucket, key, pad_id)

    captured = CapturingEngine(chunks).generate(tokenizer, TINY_PROMPTS, sampling, seed=4)
    assert [g.tokens for g in captured] == [g.tokens for g in straight]
    assert [g.logprobs for g in captured] == [g.logprobs for g in straight]


def test_a_weight_changed_in_place_changes_the_next_rollout(tiny):  # noqa: F811
    case = tiny["llama_tied"]
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)

    def run(engine):
        out = generation.generate(
            chunks, tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, stop_token_ids=[],
            engine=engine,
        )  # fmt: skip
        return [g.tokens for g in out]

    before = run("graph")
    engine = engines.engine_for(chunks, "graph")
    buckets = dict(engine.buckets)
    weight = chunks[0].decoder.layers[0].mlp.linear_fc2.weight
    with torch.no_grad():  # as the optimizer step and the refit write: in place
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    after = run("graph")
    assert engines.engine_for(chunks, "graph") is engine
    assert engine.buckets == buckets  # the same bucket, not a rebuilt one
    assert after != before
    assert after == run("static")


def test_a_pipeline_rollout_model_is_one_line(tmp_path):
    ckpts = ["--load", str(tmp_path), "--opd-teacher-load", str(tmp_path)]
    for extra, world in (
        (["--pipeline-model-parallel-size", "2"], 2),
        (["--rollout-pipeline-model-parallel-size", "2"], 2),
        (["--rollout-ranks", "2", "--rollout-pipeline-model-parallel-size", "2"], 4),
    ):
        args = arguments.parse_args([*ckpts, "--rollout-engine", "graph", *extra])
        with pytest.raises(ValueError, match="--rollout-pipeline-model-parallel-size 1") as err:
            arguments.validate_args(args, world)
        assert "\n" not in str(err.value)
    # a pipeline-parallel student sampling from a PP-1 copy is fine
    args = arguments.parse_args(
        [*ckpts, "--rollout-engine", "graph", "--pipeline-model-parallel-size", "2",
         "--rollout-pipeline-model-parallel-size", "1"]
    )  # fmt: skip
    arguments.validate_args(args, 2)


def test_auto_is_static_on_cpu(tiny):  # noqa: F811
    chunks = load_megatron(tiny["qwen3_untied"].megatron_dir)
    assert engines.resolve("auto", chunks) == "static"  # the golden figures' engine
    assert graph.unsupported(chunks) is None


# ------------------------------------------------------------------------------------------------
# TP2 and a rollout copy, on gloo


def _tp2_worker(cases: list[dict]) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_opd.models import convert
    from megatron_opd.rollout import refit
    from megatron_opd.runtime import distributed

    results = {}
    for layout in ((2, 1), (1, 2)):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        grid = distributed.initialize(distributed.ParallelConfig(*layout)).grid
        for case in cases:
            directory = case["megatron_dir"]
            chunks, _ = convert.load_checkpoint_model(directory, grid)
            tokenizer = load_tokenizer(directory)

            def run(model, engine, tokenizer=tokenizer, stops=case["stops"]):
                out = generation.generate(
                    model, tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, engine=engine,
                    stop_token_ids=stops,
                )  # fmt: skip
                return [g.tokens for g in out]

            if layout == (2, 1):  # the student in place, at TP2
                results[("tp2", case["name"])] = (run(chunks, "static"), run(chunks, "graph"))
                continue
            # PP2: the student cannot decode with graph, its TP1 copy can
            try:
                run(chunks, "graph")
                results[("pp2", case["name"])] = "no error"
            except ValueError as e:
                results[("pp2", case["name"])] = str(e)
            arch, meta = convert.read_checkpoint(directory)
            divisor = meta.get("make_vocab_size_divisible_by", 128)
            copy = refit.RolloutModel(chunks, grid, arch, divisor, 1, 1)
            copy.refit(chunks)
            gens = copy.generate(
                tokenizer, TINY_PROMPTS, seed=0, max_new_tokens=NEW_TOKENS, greedy=True,
                stop_token_ids=case["stops"], engine="graph",
            )  # fmt: skip
            results[("copy", case["name"])] = [g.tokens for g in gens]
    return results


@pytest.mark.slow
def test_tp2_and_a_rollout_copy_equal_the_static_engine(tiny):  # noqa: F811
    cases = []
    for name, case in tiny.items():
        stops = sorted({case.greedy[0][2]} - set(case.greedy[1]) - set(case.greedy[2]))
        cases.append(dict(name=name, megatron_dir=case.megatron_dir, stops=stops))
    results = run_distributed(_tp2_worker, 2, cases, timeout=600)
    assert results[0] == results[1]  # every rank returns the same tokens
    for case in cases:
        expected = [
            g[: g.index(s) + 1] if (s := next((t for t in g if t in case["stops"]), None)) else g
            for g in tiny[case["name"]].greedy
        ]
        static, graphed = results[0][("tp2", case["name"])]
        assert static == expected
        assert graphed == expected
        assert results[0][("copy", case["name"])] == expected
        assert "--rollout-pipeline-model-parallel-size" in results[0][("pp2", case["name"])]


# ------------------------------------------------------------------------------------------------
# The OPD loop


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("graph") / "models")


@pytest.mark.slow
def test_an_opd_run_with_graph_equals_static_in_greedy_mode(pair, tmp_path):
    """Top-k 1 is greedy in both engines: the same tokens, then the same training steps, bit
    for bit (the training pass never sees which engine sampled)."""
    iters = 2

    def run(nproc, name, *extra):
        proc = torchrun(nproc, [
            "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
            *SHORT_RUN, "--prompt-data", "builtin:32", "--train-iters", str(iters),
            "--rollout-top-k", "1", "--metrics-file", str(tmp_path / f"{name}.jsonl"),
            "--opd-dump-tokens", str(tmp_path / name), *extra,
        ])  # fmt: skip
        rows = [r for r in read_metrics(tmp_path / f"{name}.jsonl") if "loss" in r]
        tokens = [
            torch.load(tmp_path / name / f"step{s:07d}_dp0.pt", weights_only=False)["tokens"]
            for s in range(1, iters + 1)
        ]
        return rows, tokens, proc.stdout

    static, static_tokens, _ = run(1, "static", "--rollout-engine", "static")
    graphed, graph_tokens, _ = run(1, "graph", "--rollout-engine", "graph")
    remote, remote_tokens, log = run(
        2, "remote", "--rollout-engine", "graph", "--rollout-ranks", "1"
    )
    assert "rollout ranks: 1 replica(s) sampling with the graph engine" in log
    for tokens in (graph_tokens, remote_tokens):
        assert all(torch.equal(a, b) for a, b in zip(static_tokens, tokens, strict=True))
    for a, b in zip(static, graphed, strict=True):
        for key in ("loss", "grad_norm", "reward/mean", "response/mean_len"):
            assert b[key] == a[key], key
    for a, b in zip(static, remote, strict=True):  # lag 0 on a rollout rank: same tokens
        assert b["response/mean_len"] == a["response/mean_len"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert len({r["loss"] for r in static}) == iters  # a moving student, fresh rollouts
