"""One small tokenizer interface for the whole project, over two backends.

``load_tokenizer(path)`` accepts

* a Hugging Face tokenizer directory (``tokenizer.json`` or ``tokenizer_config.json``), read with
  ``transformers.AutoTokenizer``;
* a ``.gguf`` file (the tokenizer embedded in it, through ``transformers``);
* a SentencePiece ``.model`` file, or a directory holding ``tokenizer.model``; its chat template, if
  any, is a ``chat_template.jinja`` next to it;
* a Megatron checkpoint written by this project (its ``tokenizer/`` subdirectory).

Stop tokens are the end-of-sequence token, the ``eos_token_id`` list of a ``generation_config.json``
in the same directory (Qwen3 lists both ``<|im_end|>`` and ``<|endoftext|>`` there), and the usual
end-of-turn tokens when the vocabulary has them.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

# Tokens that end an assistant turn in the chat formats we meet (ChatML, Llama 3, Gemma).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
)

# Files a Hugging Face tokenizer directory may consist of; copied verbatim by ``save``.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHECKPOINT_TOKENIZER_DIR = "tokenizer"

Message = dict[str, Any]


class Tokenizer(ABC):
    """What the project needs from a tokenizer.

    ``vocab_size`` counts every id the tokenizer can produce (added tokens included); the model's
    embedding may be larger (Qwen3 pads it) and Megatron pads it further.
    """

    vocab_size: int
    pad_id: int
    eos_id: Optional[int]
    bos_id: Optional[int]
    stop_token_ids: list[int]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS/EOS added (special tokens written in it are parsed)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(
        self,
        messages: list[Message],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """The chat prompt of ``messages`` (Qwen3: non-thinking mode), as ids or as text."""
        text = self.chat_text(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    @abstractmethod
    def chat_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The chat template rendered for ``messages``."""

    @abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the files that ``load_tokenizer(directory)`` reads back into this tokenizer."""


def _unique(ids: Sequence[Optional[int]]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i >= 0 and i not in out:
            out.append(int(i))
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer (``tokenizer.json`` directory or a GGUF file)."""

    def __init__(self, directory: str | Path, gguf_file: Optional[str] = None):
        from transformers import AutoTokenizer

        self.directory = Path(directory)
        self.gguf_file = gguf_file
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.hf = AutoTokenizer.from_pretrained(str(self.directory), **kwargs)
        self.vocab_size = len(self.hf)
        self.eos_id = self.hf.eos_token_id
        self.bos_id = self.hf.bos_token_id
        vocab = self.hf.get_vocab()
        generation_eos: list[int] = []
        gen_file = self.directory / "generation_config.json"
        if gen_file.exists() and not gguf_file:
            import json

            generation_eos = _as_list(json.loads(gen_file.read_text()).get("eos_token_id"))
        self.stop_token_ids = _unique(
            [self.eos_id, *generation_eos, *(vocab.get(t) for t in END_OF_TURN_TOKENS)]
        )
        pad = self.hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.stop_token_ids or [0])[0]

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        template = self.hf.chat_template
        if not template:
            raise ValueError(f"the tokenizer in {self.directory} has no chat template")
        extra = {}
        if "enable_thinking" in str(template):
            extra["enable_thinking"] = False  # Qwen3's non-thinking mode
        return self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **extra
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.gguf_file:
            self.hf.save_pretrained(str(directory))
            return
        # The original files, verbatim: save_pretrained would rewrite them in this transformers
        # version's format, which older versions may not read.
        for name in HF_TOKENIZER_FILES:
            if (self.directory / name).exists():
                shutil.copy2(self.directory / name, directory / name)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``; the chat template is an optional Jinja file next to it."""

    def __init__(self, model_file: str | Path, chat_template: Optional[str] = None):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        template_file = self.model_file.parent / CHAT_TEMPLATE_FILE
        if chat_template is None and template_file.exists():
            chat_template = template_file.read_text()
        self.chat_template = chat_template
        unk = self.sp.unk_id()
        turn_ends = [self.sp.piece_to_id(t) for t in END_OF_TURN_TOKENS]
        self.stop_token_ids = _unique([self.eos_id, *(i for i in turn_ends if i != unk)])
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.stop_token_ids or [0])[0]

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.stop_token_ids and i != self.bos_id]
        return self.sp.decode(ids)

    def chat_text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if not self.chat_template:
            raise ValueError(
                f"{self.model_file} has no chat template: put a {CHAT_TEMPLATE_FILE} next to it"
            )
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=False,
            bos_token=self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else "",
            eos_token=self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else "",
        )

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.model_file, directory / "tokenizer.model")
        if self.chat_template:
            (directory / CHAT_TEMPLATE_FILE).write_text(self.chat_template)


def load_tokenizer(path: str | Path, gguf_file: Optional[str] = None) -> Tokenizer:
    """The tokenizer at ``path`` (see the module docstring for what ``path`` may be)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return HFTokenizer(path.parent, gguf_file=path.name)
        if path.suffix == ".model":
            return SentencePieceTokenizer(path)
        if path.name in ("tokenizer.json", "tokenizer_config.json"):
            return HFTokenizer(path.parent)
        raise ValueError(
            f"{path}: not a tokenizer file (expected a directory, a .model or a .gguf file)"
        )
    if gguf_file:
        return HFTokenizer(path, gguf_file=gguf_file)
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return HFTokenizer(path)
    if (path / "tokenizer.model").exists():
        return SentencePieceTokenizer(path / "tokenizer.model")
    if (path / CHECKPOINT_TOKENIZER_DIR).is_dir():
        return load_tokenizer(path / CHECKPOINT_TOKENIZER_DIR)
    raise FileNotFoundError(
        f"no tokenizer in {path}: expected tokenizer.json, tokenizer_config.json, tokenizer.model "
        f"or a {CHECKPOINT_TOKENIZER_DIR}/ subdirectory"
    )
