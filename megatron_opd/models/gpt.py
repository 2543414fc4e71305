"""Qwen3, Qwen3-MoE and Llama architectures as Megatron-Core GPTModels.

An :class:`ArchConfig` is read from a Hugging Face ``config.json`` or a YAML file with the same
field names. It maps to a ``TransformerConfig`` and a layer spec; :func:`build_model` builds the
chunks of the current pipeline stage. Parallelism lives in Megatron's spec and config; nothing here
touches a process group except reading the current stage.

Qwen3-MoE (``Qwen3MoeForCausalLM``): each sparse layer's MLP is Megatron's ``MoELayer`` (its
``TopKRouter``, the ``allgather`` token dispatcher and a ``SequentialMLP`` of SwiGLU experts),
the dense layers among them (``mlp_only_layers`` / ``decoder_sparse_step``) a plain MLP, chosen
per layer by ``moe_layer_freq``. Routing is Hugging Face's: softmax over all experts then top-k
(``norm_topk_prob=false``: ``moe_router_pre_softmax``), or top-k renormalised
(``norm_topk_prob=true``: softmax over the top-k logits, the same numbers); dropless (no capacity
factor), so no token's score depends on the others in its batch; no load-balancing loss.

Padded vocabulary: Megatron pads the output layer to a multiple of ``make_vocab_size_divisible_by x
TP``. The padded rows are never a valid token; every softmax in this project (the reward op, the
reverse-KL op, sampling) takes the true ``vocab_size`` and gives the padded columns -inf, so they
receive no probability and no gradient.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_opd import compat

ARCHITECTURES = ("qwen3", "llama", "qwen3_moe")
_HF_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Routing that Qwen3-MoE does not have and this project does not build: refused, not ignored.
_UNSUPPORTED_MOE = {
    "shared_expert_intermediate_size": "shared experts",
    "n_shared_experts": "shared experts",
    "n_group": "group-limited routing",
    "topk_group": "group-limited routing",
    "first_k_dense_replace": "first_k_dense_replace",
}


@dataclass
class ArchConfig:
    """The fields of a Qwen3 / Llama ``config.json`` that define the network."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    # Qwen3-MoE only
    num_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None
    moe_intermediate_size: Optional[int] = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: Optional[list[int]] = None

    _REQUIRED = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.model_type!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.is_moe:
            self.mlp_only_layers = sorted(self.mlp_only_layers or [])
            for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
                if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                    raise ValueError(f"qwen3_moe needs {name} >= 1, got {getattr(self, name)}")
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok {self.num_experts_per_tok} is larger than num_experts "
                    f"{self.num_experts}"
                )
            if self.decoder_sparse_step < 1:
                raise ValueError(
                    f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}"
                )

    @property
    def qk_layernorm(self) -> bool:
        return self.model_type in ("qwen3", "qwen3_moe")

    @property
    def is_moe(self) -> bool:
        return self.model_type == "qwen3_moe"

    def sparse_layers(self) -> list[bool]:
        """Per layer: True where the MLP is a mixture of experts (Hugging Face's rule)."""
        if not self.is_moe:
            return [False] * self.num_hidden_layers
        dense = set(self.mlp_only_layers or [])
        return [
            i not in dense and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        ]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ArchConfig:
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type is None:
            raise ValueError(f"{source}: missing required field 'model_type'")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported architecture {model_type!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        for name in cls._REQUIRED:
            if raw.get(name) is None:
                raise ValueError(f"{source}: missing required field {name!r}")
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" in raw and "rope_theta" in rope:
            # transformers reads one and this project would read the other: refuse to guess
            if float(raw["rope_theta"]) != float(rope["rope_theta"]):
                raise ValueError(
                    f"{source}: rope_theta {raw['rope_theta']} and rope_parameters.rope_theta "
                    f"{rope['rope_theta']} disagree; keep one of them"
                )
        elif "rope_theta" in rope:
            raw["rope_theta"] = rope["rope_theta"]
        scaling = raw.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"{source}: rope scaling {scaling} is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported")
        if model_type == "qwen3_moe":
            _check_moe_fields(raw, source)
            if raw.get("num_experts") is None:  # transformers 5 writes num_local_experts
                raw["num_experts"] = raw.get("num_local_experts")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path) -> ArchConfig:
        """Read a Hugging Face ``config.json`` (or a directory holding one) or a YAML file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"architecture file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of architecture fields")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` for transformers (Qwen3ForCausalLM / Qwen3MoeForCausalLM /
        LlamaForCausalLM)."""
        out = {
            "architectures": [_HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.is_moe:
            out.update(
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                decoder_sparse_step=self.decoder_sparse_step,
                mlp_only_layers=list(self.mlp_only_layers or []),
            )
        return out


def _check_moe_fields(raw: dict[str, Any], source: str) -> None:
    """One line for each kind of routing a Qwen3-MoE config may name but this project does not
    build (it would otherwise be ignored and the scores silently wrong)."""
    for key, what in _UNSUPPORTED_MOE.items():
        if raw.get(key):
            raise ValueError(f"{source}: not supported: {what} ({key}={raw[key]})")
    if raw.get("scoring_func", "softmax") != "softmax":
        raise ValueError(
            f"{source}: router scoring_func {raw['scoring_func']!r} is not supported (softmax only)"
        )
    if raw.get("topk_method", "greedy") != "greedy":
        raise ValueError(f"{source}: router topk_method {raw['topk_method']!r} is not supported")
    if raw.get("routed_scaling_factor", 1.0) not in (None, 1.0):
        raise ValueError(
            f"{source}: routed_scaling_factor {raw['routed_scaling_factor']} is not supported"
        )


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's padding: round up to a multiple of ``divisible_by x TP``."""
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def validate_layout(
    arch: ArchConfig,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    virtual_pipeline_size: Optional[int] = None,
    expert_parallel_size: int = 1,
    ep_flag: str = "--expert-model-parallel-size",
) -> None:
    """Raise a ValueError naming the flag when the model cannot be split this way."""
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if expert_parallel_size > 1 and not arch.is_moe:
        raise ValueError(
            f"{ep_flag} {expert_parallel_size} needs a mixture-of-experts model; "
            f"this one is {arch.model_type}"
        )
    if arch.is_moe:
        if arch.num_experts % expert_parallel_size != 0:
            raise ValueError(
                f"{ep_flag} {expert_parallel_size} does not divide num_experts {arch.num_experts}"
            )
        if arch.moe_intermediate_size % tp != 0:
            raise ValueError(
                f"--tensor-model-parallel-size {tp} does not divide moe_intermediate_size (the "
                f"experts' ffn hidden size) {arch.moe_intermediate_size}"
            )
    if arch.num_attention_heads % tp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide num_attention_heads "
            f"{arch.num_attention_heads}"
        )
    if arch.num_key_value_heads % tp != 0:
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide num_key_value_heads (query groups) "
            f"{arch.num_key_value_heads}"
        )
    if arch.intermediate_size % tp != 0 and not all(arch.sparse_layers()):
        # else Megatron fails later, inside ColumnParallelLinear, naming neither
        raise ValueError(
            f"--tensor-model-parallel-size {tp} does not divide intermediate_size (the MLP's "
            f"ffn hidden size) {arch.intermediate_size}"
        )
    if pp > arch.num_hidden_layers:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp} is larger than the number of layers "
            f"{arch.num_hidden_layers}"
        )
    stages = pp * (virtual_pipeline_size or 1)
    if arch.num_hidden_layers % stages != 0:
        raise ValueError(
            f"{arch.num_hidden_layers} layers do not split evenly into "
            f"--pipeline-model-parallel-size {pp} x virtual stages {virtual_pipeline_size or 1}"
        )


def transformer_config(
    arch: ArchConfig,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    virtual_pipeline_size: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    expert_parallel_size: int = 1,
    **overrides: Any,
):
    """The Megatron ``TransformerConfig`` of ``arch`` on a TP x PP (x VPP) (x EP) grid."""
    from megatron.core.transformer import TransformerConfig

    validate_layout(
        arch, tensor_parallel_size, pipeline_parallel_size, virtual_pipeline_size,
        expert_parallel_size,
    )  # fmt: skip
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_hidden_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tensor_parallel_size,
        pipeline_model_parallel_size=pipeline_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    if arch.is_moe:
        kwargs.update(moe_config(arch, expert_parallel_size))
    kwargs.update(compat.transformer_config_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_config(arch: ArchConfig, expert_parallel_size: int = 1) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of Qwen3-MoE's sparse layers.

    Hugging Face: ``p = softmax(router logits)``, the top-k of ``p``, renormalised to sum to 1 when
    ``norm_topk_prob``. Megatron's ``topk_routing_with_score_function`` computes the same with
    ``moe_router_pre_softmax=True`` (softmax, then top-k) and, for the renormalised weights, with
    ``False`` (top-k of the logits, then softmax over those k: ``p_i / sum_topk p``, the same
    experts since softmax keeps the order). No capacity factor: every token reaches its k experts
    whatever else is in the batch. The experts' TP is the attention's (Megatron's default
    ``expert_tensor_parallel_size``)."""
    return dict(
        num_moe_experts=arch.num_experts,
        moe_router_topk=arch.num_experts_per_tok,
        moe_ffn_hidden_size=arch.moe_intermediate_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.norm_topk_prob,
        moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_layer_freq=[int(s) for s in arch.sparse_layers()],
        expert_model_parallel_size=expert_parallel_size,
    )


def layer_spec(
    arch: ArchConfig, config=None, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None
):
    """Transformer-engine spec when TE imports and CUDA is present, else Megatron's local spec
    with its core attention computed by ``scaled_dot_product_attention``
    (:class:`megatron_opd.models.attention.SDPAttention`).

    A mixture of experts gets Megatron's block spec of this pipeline stage's layers (``config``,
    ``vp_stage``, ``pp_rank``: the stage), dense or MoE per layer from ``config.moe_layer_freq``."""
    from megatron.core.models.gpt import gpt_layer_specs

    # attention.py imports Megatron-Core at module level: the package imports it only once a
    # model is built (scripts filter its import-time warnings first; a bad flag fails fast)
    from megatron_opd.models.attention import SDPAttention

    if arch.is_moe:
        te = compat.transformer_engine_available()
        block = gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=te, normalization="RMSNorm",
            vp_stage=vp_stage, pp_rank=pp_rank,
        )  # fmt: skip
        if not te:
            for spec in block.layer_specs:
                spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return block
    if compat.transformer_engine_available():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=arch.qk_layernorm
        )
    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"
    )
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_model(
    arch: ArchConfig,
    config,
    grid,
    make_vocab_size_divisible_by: int = 128,
    max_sequence_length: Optional[int] = None,
) -> list[torch.nn.Module]:
    """The GPTModel chunks of this pipeline stage of ``grid`` (a
    :class:`megatron_opd.runtime.distributed.ModelGrid`; one chunk per virtual stage), on the
    default device."""
    from megatron.core.models.gpt import GPTModel

    vocab = padded_vocab_size(
        arch.vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size
    )
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(arch, config, stage, grid.pp_rank),
            vocab_size=vocab,
            max_sequence_length=max_sequence_length or arch.max_position_embeddings,
            pre_process=grid.is_first_stage and vp_stage == 0,
            post_process=grid.is_last_stage and vp_stage == (vpp or 1) - 1,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=float(arch.rope_theta),  # not int(): 10000.5 is a valid base
            rotary_percent=1.0,
            vp_stage=stage,
            pg_collection=grid.model_groups(),
        )
        compat.ensure_tensor_parallel_attributes(model)
        if config.bf16 or config.fp16:
            # every parameter in the half type, norms included (Megatron's torch-norm fallback
            # creates fp32 norms), as Megatron-LM's Float16Module does: the optimizer keeps fp32
            # main copies of all of them
            model.to(config.params_dtype)
        model.to(compat.default_device())
        # GPTModel.vocab_size stays the padded width (0.19's inference controller reads it as
        # the logits' width); ids at or above the true size are never sampled
        model.true_vocab_size = arch.vocab_size
        chunks.append(model)
    return chunks


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's boolean mask ``[1, 1, s, s]``: True where attention is NOT allowed."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


def position_ids(batch: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, seq_len)
