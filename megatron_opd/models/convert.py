"""Hugging Face <-> Megatron-Core weights for Qwen3, Qwen3-MoE and Llama, one tensor at a time.

Import builds the GPTModel once at TP1/PP1 without initializing it, copies every parameter from
the Hugging Face tensors it needs (read one by one from safetensors, or taken one by one from a
``transformers`` state dict for GGUF files), and saves a ``dist_checkpointing`` checkpoint that
loads at any TP/PP layout. Export loads such a checkpoint at TP1/PP1 and writes safetensors shards,
releasing each Megatron parameter once it is written. Neither holds two copies of the model.

Megatron's layout (local spec), per layer ``decoder.layers.N``:

* ``self_attention.linear_qkv.weight``: per query group ``g``, the rows of its ``heads/groups``
  query heads, then its key head, then its value head: ``[q_g0 .. q_g(p-1), k_g, v_g]`` per ``g``.
* ``mlp.linear_fc1.weight``: ``[gate; up]`` (SwiGLU applies the activation to the first half).
* a Qwen3-MoE sparse layer: ``mlp.router.weight`` is ``mlp.gate.weight``; expert ``e`` is
  ``mlp.experts.local_experts.<e>.linear_fc1.weight`` (``[gate_e; up_e]``) and
  ``.linear_fc2.weight`` (``down_e``). Converted at EP1, the dist checkpoint names every expert
  by its global index (``SequentialMLP.sharded_state_dict``), so it loads at any TP x EP x PP
  layout.
* the embedding and untied output layer carry ``padded_vocab_size`` rows: zeros on import, dropped
  on export.

A converted checkpoint directory holds the dist checkpoint, ``tokenizer/`` and ``megatron_opd.json``
(written last: the architecture, the vocabulary padding, the original ``config.json`` and
``generation_config.json``), so the model and its tokenizer are rebuilt from the directory alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from megatron_opd.models import gpt
from megatron_opd.models.tokenizer import CHECKPOINT_TOKENIZER_DIR, load_tokenizer
from megatron_opd.runtime import checkpointing, distributed

META_FORMAT = "megatron_opd.checkpoint/1"
DEFAULT_VOCAB_DIVISOR = 128


def vocab_divisor(meta: dict[str, Any]) -> int:
    """The ``--make-vocab-size-divisible-by`` a checkpoint was converted with (its padded
    vocabulary is that times TP): fixed at conversion, recorded in ``megatron_opd.json``."""
    return int(meta.get("make_vocab_size_divisible_by", DEFAULT_VOCAB_DIVISOR))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# ------------------------------------------------------------------------------------------------
# The name mapping (pure tensor functions)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the Hugging Face tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: str  # "copy" | "vocab" | "qkv" | "fc1"


_ATTENTION_RULES = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    (
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    ("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), "copy"),
    ("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), "copy"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
)
_DENSE_MLP_RULES = (
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
_LAYER_RULES = _ATTENTION_RULES + _DENSE_MLP_RULES


def _expert_rules(num_experts: int) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    out = [("mlp.router.weight", ("mlp.gate.weight",), "copy")]
    for e in range(num_experts):
        hf = f"mlp.experts.{e}."
        out.append(
            (f"mlp.experts.local_experts.{e}.linear_fc1.weight",
             (hf + "gate_proj.weight", hf + "up_proj.weight"), "fc1")
        )  # fmt: skip
        out.append(
            (f"mlp.experts.local_experts.{e}.linear_fc2.weight", (hf + "down_proj.weight",), "copy")
        )
    return tuple(out)


# Transformer-engine specs fuse each norm into the linear layer that follows it.
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
# Tensors some Hugging Face checkpoints carry that hold nothing the model needs.
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")


def rules(arch: gpt.ArchConfig) -> dict[str, Rule]:
    """Every parameter of the full (TP1/PP1) Megatron model, by its local-spec name."""
    out = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    qk_norms = ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")
    attention = [r for r in _ATTENTION_RULES if arch.qk_layernorm or r[0] not in qk_norms]
    sparse = _expert_rules(arch.num_experts) if arch.is_moe else ()
    for i, is_sparse in enumerate(arch.sparse_layers()):
        for suffix, hf, kind in (*attention, *(sparse if is_sparse else _DENSE_MLP_RULES)):
            hf_names = tuple(f"model.layers.{i}.{h}" for h in hf)
            out.append(Rule(f"decoder.layers.{i}.{suffix}", hf_names, kind))
    out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not arch.tie_word_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return {r.megatron: r for r in out}


def canonical_name(megatron_name: str) -> str:
    """The local-spec name of a parameter of either spec."""
    for te, local in _TE_ALIASES.items():
        if megatron_name.endswith(te):
            return megatron_name[: -len(te)] + local
    return megatron_name


def hf_shapes(arch: gpt.ArchConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every Hugging Face tensor that ``arch`` implies."""
    h, f, d = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
    }
    dense = {
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    sparse = {}
    if arch.is_moe:
        fe = arch.moe_intermediate_size
        sparse["mlp.gate.weight"] = (arch.num_experts, h)
        for e in range(arch.num_experts):
            sparse[f"mlp.experts.{e}.gate_proj.weight"] = (fe, h)
            sparse[f"mlp.experts.{e}.up_proj.weight"] = (fe, h)
            sparse[f"mlp.experts.{e}.down_proj.weight"] = (h, fe)
    if arch.qk_layernorm:
        layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
    out = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    for i, is_sparse in enumerate(arch.sparse_layers()):
        mlp = sparse if is_sparse else dense
        out.update({f"model.layers.{i}.{k}": v for k, v in {**layer, **mlp}.items()})
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, h)
    return out


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: gpt.ArchConfig
) -> torch.Tensor:
    """``[heads*d, h]``, ``[groups*d, h]`` x2 -> Megatron's ``[(heads + 2*groups)*d, h]``."""
    groups, d = arch.num_key_value_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups
    h = q.shape[-1]
    return torch.cat(
        [q.reshape(groups, per_group * d, h), k.reshape(groups, d, h), v.reshape(groups, d, h)],
        dim=1,
    ).reshape(-1, h)


def split_qkv(
    qkv: torch.Tensor, arch: gpt.ArchConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    groups, d = arch.num_key_value_heads, arch.head_dim
    per_group = arch.num_attention_heads // groups
    h = qkv.shape[-1]
    q, k, v = torch.split(qkv.reshape(groups, (per_group + 2) * d, h), [per_group * d, d, d], 1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def to_megatron(
    rule: Rule, tensors: list[torch.Tensor], arch: gpt.ArchConfig, padded_vocab: int
) -> torch.Tensor:
    """The Megatron parameter of ``rule`` from its Hugging Face tensors (in ``rule.hf`` order)."""
    if rule.kind == "qkv":
        return fuse_qkv(*tensors, arch)
    if rule.kind == "fc1":
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    if rule.kind == "vocab" and padded_vocab > t.shape[0]:
        t = torch.cat([t, t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])])
    return t


def to_hf(rule: Rule, tensor: torch.Tensor, arch: gpt.ArchConfig) -> list[tuple[str, torch.Tensor]]:
    """The Hugging Face tensors of ``rule`` from its Megatron parameter (contiguous)."""
    if rule.kind == "qkv":
        parts: tuple[torch.Tensor, ...] = split_qkv(tensor, arch)
    elif rule.kind == "fc1":
        parts = tuple(torch.chunk(tensor, 2, dim=0))
    elif rule.kind == "vocab":
        parts = (tensor[: arch.vocab_size],)
    else:
        parts = (tensor,)
    return [(name, t.contiguous()) for name, t in zip(rule.hf, parts, strict=True)]


# ------------------------------------------------------------------------------------------------
# Hugging Face weights, one tensor at a time
# ------------------------------------------------------------------------------------------------


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SafetensorsWeights:
    """A single-file or sharded safetensors checkpoint; ``get`` reads one tensor.

    Tensors are read with plain file reads rather than through a memory map, so a converted
    tensor's source pages do not stay mapped into this process (with ``safe_open`` the whole
    checkpoint ends up resident next to the model being filled).
    """

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map'")
            files = sorted(set(weight_map.values()))
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{directory}: no model.safetensors or model.safetensors.index.json "
                "(only safetensors checkpoints are supported)"
            )
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{directory}: missing weight files {', '.join(missing)}")
        self._entries: dict[str, _Entry] = {}
        for name in files:
            self._entries.update(_read_safetensors_header(directory / name))

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def get(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        out = torch.empty(entry.shape, dtype=_SAFETENSORS_DTYPES[entry.dtype])
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(entry.path, "rb", buffering=0) as f:
            f.seek(entry.offset)
            done = 0
            while done < entry.nbytes:
                n = f.readinto(buffer[done:])
                if not n:
                    raise ValueError(f"{entry.path}: truncated tensor {name}")
                done += n
        return out


def _read_safetensors_header(path: Path) -> dict[str, _Entry]:
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = _Entry(
            path, info["dtype"], tuple(info["shape"]), 8 + header_len + begin, end - begin
        )
    return out


class StateDictWeights:
    """A ``transformers`` state dict; ``get`` hands a tensor over and forgets it."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self._state = state_dict

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._state.pop(name)


def check_hf_weights(weights, arch: gpt.ArchConfig, source: str) -> None:
    """One error naming what is missing, unexpected or of the wrong shape."""
    expected = hf_shapes(arch)
    found = set(weights.names())
    missing = sorted(set(expected) - found)
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} tensors that config.json implies are missing, "
            f"e.g. {missing[:3]}"
        )
    tied_head = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    unexpected = sorted(n for n in found - set(expected) - tied_head if not _IGNORED_HF.match(n))
    if unexpected:
        raise ValueError(
            f"{source}: tensors the {arch.model_type} architecture does not have, "
            f"e.g. {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if weights.shape(name) != shape:
            raise ValueError(
                f"{source}: tensor {name} has shape {list(weights.shape(name))}, but config.json "
                f"implies {list(shape)}"
            )


def load_gguf_model(directory: str | Path, gguf_file: str, dtype: torch.dtype = torch.float32):
    """A ``transformers`` model from a GGUF file, dequantized and savable with save_pretrained."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file, dtype=dtype)
    # Dequantized weights are plain tensors; drop the marker that forbids save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


# ------------------------------------------------------------------------------------------------
# Import and export
# ------------------------------------------------------------------------------------------------


def _single_process_megatron() -> distributed.ModelGrid:
    """The grid of Megatron at TP1/PP1 in this process (initialized here unless it already is)."""
    if distributed.is_initialized():
        grid = distributed.student_grid()
    else:
        grid = distributed.initialize(distributed.ParallelConfig()).grid
    if (grid.tp_size, grid.pp_size) != (1, 1):
        layout = (grid.tp_size, grid.pp_size)
        raise RuntimeError(f"conversion runs at TP1/PP1, but Megatron is initialized at {layout}")
    return grid


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def _check_hf_config(raw: dict[str, Any], source: str) -> None:
    if raw.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")


@dataclass
class _HfModel:
    """A Hugging Face model to import: its architecture, ``config.json``, generation config and
    weights, and ``source``, where they came from (for messages and the metadata)."""

    arch: gpt.ArchConfig
    config: dict[str, Any]
    generation_config: Optional[dict[str, Any]]
    weights: Any  # SafetensorsWeights or StateDictWeights
    source: str

    def check(self) -> None:
        _check_hf_config(self.config, self.source)
        check_hf_weights(self.weights, self.arch, self.source)


def import_hf(
    hf_dir: str | Path,
    save_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    gguf_file: Optional[str] = None,
    tokenizer_path: Optional[str | Path] = None,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
) -> Path:
    """Convert a Hugging Face checkpoint (or a GGUF file in ``hf_dir``) to a Megatron checkpoint."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"--hf-dir {hf_dir} is not a directory")
    if gguf_file:
        if not (hf_dir / gguf_file).exists():
            raise FileNotFoundError(f"--gguf-file {hf_dir / gguf_file} does not exist")
        # GGUF files hold small models: dequantized in memory by transformers, then handed over.
        tokenizer = load_tokenizer(tokenizer_path or hf_dir / gguf_file)
        return import_transformers_model(
            load_gguf_model(hf_dir, gguf_file),
            tokenizer,
            save_dir,
            dtype,
            make_vocab_size_divisible_by,
            source=str(hf_dir / gguf_file),
        )
    hf_config = _read_json(hf_dir / "config.json")
    arch = gpt.ArchConfig.from_dict(hf_config, source=str(hf_dir / "config.json"))
    gen_file = hf_dir / "generation_config.json"
    generation_config = _read_json(gen_file) if gen_file.exists() else None
    hf = _HfModel(arch, hf_config, generation_config, SafetensorsWeights(hf_dir), str(hf_dir))
    hf.check()
    tokenizer = load_tokenizer(tokenizer_path or hf_dir)
    return _import(hf, tokenizer, save_dir, dtype, make_vocab_size_divisible_by)


def import_transformers_model(
    model: torch.nn.Module,
    tokenizer,
    save_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    source: str = "model",
) -> Path:
    """Convert an in-memory ``transformers`` model (its tensors are taken one at a time)."""
    arch = gpt.ArchConfig.from_dict(model.config.to_dict(), source=f"{source} config")
    if arch.is_moe:  # transformers 5 fuses the experts in memory (gate_up_proj [E, 2f, h])
        raise ValueError(f"{source}: Qwen3-MoE converts from safetensors files only, not GGUF")
    hf_config = json.loads(model.config.to_json_string(use_diff=True))  # what config.json holds
    generation_config = model.generation_config.to_diff_dict() if model.generation_config else None
    weights = StateDictWeights(dict(model.state_dict()))
    hf = _HfModel(arch, hf_config, generation_config, weights, source)
    hf.check()
    return _import(hf, tokenizer, save_dir, dtype, make_vocab_size_divisible_by)


def _import(
    hf: _HfModel,
    tokenizer,
    save_dir: str | Path,
    dtype: torch.dtype,
    make_vocab_size_divisible_by: int,
) -> Path:
    arch, weights = hf.arch, hf.weights
    grid = _single_process_megatron()
    config = gpt.transformer_config(arch, dtype=dtype, perform_initialization=False)
    chunks = gpt.build_model(arch, config, grid, make_vocab_size_divisible_by)
    padded = gpt.padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, 1)
    mapping = rules(arch)
    filled = set()
    with torch.no_grad():
        for name, param in chunks[0].named_parameters():
            rule = mapping[canonical_name(name)]
            param.copy_(to_megatron(rule, [weights.get(n) for n in rule.hf], arch, padded))
            filled.add(rule.megatron)
    assert filled == set(mapping), sorted(set(mapping) - filled)

    return write_model_checkpoint(
        chunks,
        arch,
        tokenizer,
        save_dir,
        make_vocab_size_divisible_by,
        hf.source,
        hf_config=hf.config,
        generation_config=hf.generation_config,
    )


def write_model_checkpoint(
    chunks: list[torch.nn.Module],
    arch: gpt.ArchConfig,
    tokenizer,
    save_dir: str | Path,
    make_vocab_size_divisible_by: int = DEFAULT_VOCAB_DIVISOR,
    source: str = "model",
    hf_config: Optional[dict[str, Any]] = None,
    generation_config: Optional[dict[str, Any]] = None,
) -> Path:
    """A weights-only checkpoint that ``--load`` / ``--opd-teacher-load`` read: the model chunks
    (dist checkpoint, any layout on load), the tokenizer, and the metadata file, written last."""
    save_dir = Path(save_dir)
    dtype = chunks[0].config.params_dtype
    checkpointing.save_model(chunks, save_dir)
    tokenizer.save(save_dir / CHECKPOINT_TOKENIZER_DIR)
    hf_config = dict(hf_config) if hf_config is not None else arch.to_hf_dict()
    for key in ("quantization_config", "transformers_version"):
        hf_config.pop(key, None)
    meta = {
        "format": META_FORMAT,
        "arch": arch.to_dict(),
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "padded_vocab_size": gpt.padded_vocab_size(
            arch.vocab_size, make_vocab_size_divisible_by, 1
        ),
        "params_dtype": _DTYPE_NAMES[dtype],
        "tokenizer": CHECKPOINT_TOKENIZER_DIR,
        "hf_config": hf_config,
        "generation_config": generation_config,
        "source": source,
    }
    # Written last: its presence marks a complete checkpoint.
    checkpointing.write_json_atomic(save_dir / checkpointing.META_FILE, checkpointing.stamp(meta))
    return save_dir


def read_checkpoint(directory: str | Path) -> tuple[gpt.ArchConfig, dict[str, Any]]:
    """The architecture and metadata of a checkpoint written by this project."""
    meta_file = Path(directory) / checkpointing.META_FILE
    try:
        meta = checkpointing.read_meta(directory)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_file} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file} holds a JSON {type(meta).__name__}, not an object")
    if "arch" not in meta:
        raise ValueError(f"{directory}/{checkpointing.META_FILE} has no 'arch' entry")
    return gpt.ArchConfig.from_dict(meta["arch"], source=str(directory)), meta


def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """The dtype the checkpoint's embedding was saved in."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return metadata["embedding.word_embeddings.weight"].properties.dtype


def load_checkpoint_model(
    directory: str | Path,
    grid: distributed.ModelGrid,
    dtype: Optional[torch.dtype] = None,
    **config_overrides: Any,
) -> tuple[list[torch.nn.Module], gpt.ArchConfig]:
    """This rank's model chunks on ``grid`` (its TP / PP / EP layout), loaded from
    ``directory``."""
    from torch.distributed.checkpoint.api import CheckpointException

    arch, meta = read_checkpoint(directory)
    config = gpt.transformer_config(
        arch,
        grid.tp_size,
        grid.pp_size,
        dtype=dtype or checkpoint_dtype(directory),
        perform_initialization=False,
        expert_parallel_size=grid.ep_size,
        **config_overrides,
    )
    divisor = vocab_divisor(meta)
    chunks = gpt.build_model(arch, config, grid, divisor)
    try:
        checkpointing.load_model(chunks, directory, strict=False)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        damaged = damaged_checkpoint_files(directory)
        if damaged:
            raise ValueError(
                f"{directory}: the checkpoint is damaged (a file is truncated or corrupt): "
                f"{'; '.join(damaged)}; restore or re-save it ({reason})"
            ) from e
        raise ValueError(
            f"{directory}: the checkpoint does not match the architecture in "
            f"{checkpointing.META_FILE}: {reason}"
        ) from e
    return chunks, arch


def damaged_checkpoint_files(directory: str | Path) -> list[str]:
    """The files of a dist checkpoint that are missing, empty, or shorter than its ``.metadata``
    says (what a crash or a full disk leaves), each with what is wrong; ``[]`` when none is.

    Only sizes are checked: a file of the right size with wrong bytes is not found here."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    try:
        storage = FileSystemReader(str(directory)).read_metadata().storage_data
    except Exception as e:
        return [f".metadata is unreadable ({type(e).__name__})"]
    needed: dict[str, int] = {}
    for info in storage.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    out = []
    for name, size in sorted(needed.items()):
        path = directory / name
        if not path.exists():
            out.append(f"{name} is missing")
        elif path.stat().st_size < size:
            out.append(f"{name} is truncated ({path.stat().st_size} of {size} bytes)")
    for name in ("common.pt", "metadata.json"):
        if (directory / name).exists() and (directory / name).stat().st_size == 0:
            out.append(f"{name} is empty")
    return out


class _ShardWriter:
    """Safetensors shards of at most ``max_bytes`` each, named and indexed like transformers'."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self.files):05d}.tmp"
        save_file(self.pending, str(self.directory / tmp), metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.directory / self.files[0][0], self.directory / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / tmp, self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"1024"`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--max-shard-size {text!r} is not a size like 5GB or 500MB")
    unit = match.group(2).upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(match.group(1)) * scale)


def export_hf(
    load_dir: str | Path,
    save_dir: str | Path,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: int = 5 * 2**30,
    tokenizer_path: Optional[str | Path] = None,
) -> Path:
    """Write a Hugging Face checkpoint (config, generation config, safetensors, tokenizer).

    The export is written to ``<save_dir>.tmp`` and then swapped in, so ``save_dir`` holds exactly
    its weights: an earlier export's weight files there (another sharding) are removed, and said
    so; other files in ``save_dir`` are kept."""
    load_dir, save_dir = Path(load_dir), Path(save_dir).absolute()
    if save_dir.exists() and not save_dir.is_dir():
        raise ValueError(f"--save {save_dir} exists and is not a directory")
    arch, meta = read_checkpoint(load_dir)
    tokenizer_src = Path(tokenizer_path) if tokenizer_path else load_dir / meta.get("tokenizer", "")
    if not tokenizer_path and not meta.get("tokenizer"):
        raise FileNotFoundError(f"{load_dir} records no tokenizer; pass --tokenizer")
    tokenizer = load_tokenizer(tokenizer_src)

    chunks, _ = load_checkpoint_model(load_dir, _single_process_megatron())
    out_dtype = dtype or checkpoint_dtype(load_dir)
    tmp = _export_tmp_dir(save_dir)
    if tmp.exists():  # left by an export that crashed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, max_shard_size)
    mapping = rules(arch)
    for name, param in list(chunks[0].named_parameters()):
        rule = mapping[canonical_name(name)]
        for hf_name, tensor in to_hf(rule, param.detach(), arch):
            writer.add(hf_name, tensor.to(out_dtype))
        # Drop the parameter; its storage lives on only in the pending shard, so the peak is
        # the model plus one shard.
        param.data = torch.empty(0, dtype=param.dtype)
    writer.finish()
    del chunks

    tokenizer.save(tmp)
    for name, obj in _hf_json_files(arch, meta, out_dtype).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    stale = _swap_in_export(tmp, save_dir)
    if stale:
        print(
            f"removed {len(stale)} weight file(s) of an earlier export from {save_dir}: "
            + ", ".join(stale),
            flush=True,
        )
    return save_dir


def _is_weight_file(name: str) -> bool:
    """Files that hold (or index) a Hugging Face model's weights: an export owns all of them."""
    return (
        name.endswith(".safetensors")
        or name == "model.safetensors.index.json"
        or (name.startswith("pytorch_model") and (name.endswith(".bin") or name.endswith(".json")))
    )


def _export_tmp_dir(save_dir: Path) -> Path:
    """Where an export is written before it replaces ``save_dir``: beside it, or inside it when
    it is a mount point (a container's volume, say), which cannot be renamed."""
    if os.path.ismount(save_dir):
        return save_dir / ".export.tmp"
    return save_dir.with_name(save_dir.name + ".tmp")


def _swap_in_export(tmp: Path, save_dir: Path) -> list[str]:
    """Make the finished export in ``tmp`` the contents of ``save_dir``; return the names of the
    weight files of an earlier export that it drops.

    Everything else already in ``save_dir`` that the export does not rewrite (a README, say) is
    linked (or copied) into ``tmp`` first; then two renames swap the directories, so a reader, or
    a crash, sees either the old export or the new one, never a mix of their weights. A ``tmp``
    inside ``save_dir`` (a mount point) is moved in file by file instead, after all the old weight
    files are deleted: a crash in between leaves too few weights, not a mix."""
    if not save_dir.exists():
        os.replace(tmp, save_dir)
        return []
    in_place = tmp.parent == save_dir
    stale = []
    for entry in sorted(save_dir.iterdir()):
        if entry == tmp or (tmp / entry.name).exists():
            continue
        if _is_weight_file(entry.name):
            stale.append(entry.name)
        elif in_place:
            continue
        elif entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, tmp / entry.name)
    if in_place:
        # every old weight file goes before any new one comes in, the index first, so that no
        # reader follows it to shards that are gone
        old_weights = [p for p in save_dir.iterdir() if p != tmp and _is_weight_file(p.name)]
        for path in sorted(old_weights, key=lambda p: not p.name.endswith(".json")):
            path.unlink()
        for entry in sorted(tmp.iterdir()):
            target = save_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        tmp.rmdir()
        return stale
    old = save_dir.with_name(save_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(save_dir, old)
    os.replace(tmp, save_dir)
    shutil.rmtree(old)
    return stale


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _hf_json_files(
    arch: gpt.ArchConfig, meta: dict[str, Any], dtype: torch.dtype
) -> dict[str, dict[str, Any]]:
    config = dict(meta.get("hf_config") or {})
    for key in ("torch_dtype", "transformers_version", "quantization_config", "_name_or_path"):
        config.pop(key, None)
    config.update(arch.to_hf_dict())
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": arch.rope_theta}
    config["dtype"] = _DTYPE_NAMES[dtype]
    generation = dict(meta.get("generation_config") or {})
    if not generation:
        generation = {"bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id}
    generation.pop("transformers_version", None)
    return {"config.json": config, "generation_config.json": generation}
