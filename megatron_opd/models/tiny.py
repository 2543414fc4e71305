"""Tiny real components built from nothing (no downloads), for the toy example, the benchmarks
and the tests: a byte-level BPE tokenizer with ChatML, a random Qwen3 saved by transformers, and
its conversion to a Megatron checkpoint by the project's own converter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from megatron_opd.runtime.distributed import standalone_env
from megatron_opd.training.data import builtin_problems

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_bpe_tokenizer(
    directory, vocab_size: int = 320, corpus=None, split_digits: bool = False
) -> None:
    """A byte-level BPE with ChatML specials and template, trained on ``corpus`` (default: the
    built-in prompt set). ``split_digits``: every digit its own token, as in Llama/Qwen."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast  # heavy: transformers imports in seconds

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if corpus is None:
        corpus = [p.problem for p in builtin_problems(300, seed=0)]
    backend.train_from_iterator([*corpus, "user assistant system"], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    tok.save_pretrained(str(directory))


def save_hf_qwen3(
    directory, layers: int, seed: int, vocab: int, scale: float, num_key_value_heads: int = 2
) -> None:
    """A random tiny Qwen3 (4 heads, GQA, q/k norm) saved by transformers; weights ~ N(0, scale)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM  # heavy, as above

    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, scale)
    model.save_pretrained(str(directory))


def convert_hf_checkpoint(hf_dir, save, tokenizer_dir=None) -> None:
    """``hf_dir`` (with ``tokenizer_dir``'s files copied in) converted by the project's converter,
    in its own process (it initializes Megatron at TP1), to a Megatron checkpoint at ``save``."""
    hf_dir = Path(hf_dir)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (hf_dir / f.name).write_bytes(f.read_bytes())
    script = Path(__file__).resolve().parents[2] / "scripts" / "convert_hf_to_megatron.py"
    subprocess.run(
        [sys.executable, str(script), "--hf-dir", str(hf_dir), "--save", str(save), "--dtype",
         "fp32"],
        check=True,
        capture_output=True,
        env=dict(standalone_env(), PYTHONWARNINGS="ignore"),
    )  # fmt: skip
