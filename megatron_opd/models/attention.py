"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

:class:`SDPAttention` takes the place of Megatron-Core's local ``DotProductAttention``
(``transformer/dot_product_attention.py``) in the layer spec used without transformer-engine: the
same constructor and forward signatures, the same layouts (query ``[sq, b, np, hn]``, key and
value ``[sk, b, ng, hn]``, output ``[sq, b, np * hn]``, heads per tensor-parallel partition).
Megatron's module materializes the scores (``baddbmm`` into a global buffer, ``masked_fill``,
softmax, ``bmm``) and copies grouped-query keys and values ``np / ng`` times with
``repeat_interleave``; here one fused kernel (flash attention on CPU and, where it applies, on
CUDA) reads the ``ng`` groups directly (``enable_gqa``), forward and backward. A decode step
(one query per row) uses two grouped batched matmuls instead, faster than the kernel there.

Semantics kept from Megatron's module:

* masks are boolean, True where attention is NOT allowed, broadcastable to ``[b, np, sq, sk]``
  (``[1, 1, sq, sk]`` or ``[b, 1, sq, sk]``); a given mask is applied whatever the mask type;
* without a mask, the mask type given at construction decides, as in Megatron's module (which
  ignores the ``attn_mask_type`` passed to ``forward``: the static inference engine passes
  ``no_mask`` there at decode, where one query needs no mask anyway): ``causal`` is causal,
  aligned bottom-right when ``sq != sk`` (query ``i`` sees keys ``<= sk - sq + i``, a chunk
  after a KV cache; Megatron's module refuses that case), anything else attends everywhere;
* softmax scale ``1 / sqrt(hn)`` unless ``softmax_scale`` is given; with
  ``apply_query_key_layer_scaling`` Megatron divides the scores by the layer number and
  multiplies them back in fp32 before the softmax, the same scale overall, so only the
  unscaled one is used here (the fused kernel accumulates in fp32 anyway);
* attention dropout (``config.attention_dropout``) in training only, drawn inside Megatron's
  model-parallel RNG fork unless sequence parallel, as Megatron's module does.

One difference: a query row whose keys are all masked (a left-pad position in prefill) gets
zeros from SDPA where Megatron's ``masked_fill(-10000)`` gives the mean of the values. Both are
finite, and no real token reads such a row (its key is masked for every real query), so the
logits and gradients of real tokens are the same. (The decode path below keeps Megatron's mean.)

Unsupported (raise a one-line error): context parallelism, a softmax offset
(``softmax_type`` other than ``vanilla``), sliding-window attention (at construction), attention
bias and packed sequences (at forward).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Megatron's local core attention, computed by ``scaled_dot_product_attention``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "megatron_opd.models.attention.SDPAttention does not support context parallelism "
                f"(--context-parallel-size {config.context_parallel_size})"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(
                f"megatron_opd.models.attention.SDPAttention does not support softmax_type "
                f"{config.softmax_type!r}"
            )
        if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            raise ValueError(
                "megatron_opd.models.attention.SDPAttention does not support sliding-window "
                "attention "
                f"(window_size {config.window_size})"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head)
            if softmax_scale is None
            else softmax_scale
        )
        self.attention_dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """query ``[sq, b, np, hn]``, key / value ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention does not support packed_seq_params")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention does not support attention_bias")
        sq, b, heads, hn = query.shape
        sk = key.size(0)
        dropout_p = self.attention_dropout_p if self.training else 0.0
        if sq == 1 and dropout_p == 0.0 and (attention_mask is None or attention_mask.dim() == 4):
            return self._decode_step(query, key, value, attention_mask)
        mask, is_causal = self._allowed(attention_mask, sq, sk, query.device)
        args = (query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3))
        kwargs = dict(
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=heads != key.size(2),
        )
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # different dropout on each TP rank (its own heads), as in Megatron's module
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = F.scaled_dot_product_attention(*args, **kwargs)
        else:
            context = F.scaled_dot_product_attention(*args, **kwargs)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)

    def _decode_step(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """One query per row (a decode step against the KV cache): the ``np / ng`` queries of a
        group attend to the group's keys in one batched matmul. On CPU this is 1.1-1.7x faster
        than SDPA's flash kernel for one query (docs/benchmarks.md); no copy of the cache either
        way. A fully masked row gets the mean of the values, as in Megatron's module."""
        _, b, heads, hn = query.shape
        groups = key.size(2)
        sk = key.size(0)
        r = heads // groups
        q = query.reshape(b, groups, r, hn) * self.softmax_scale  # head h = g * r + j
        scores = torch.matmul(q, key.permute(1, 2, 3, 0))  # [b, g, r, sk]
        if attention_mask is not None:
            _check_mask(attention_mask)
            mask = attention_mask.reshape(attention_mask.size(0), -1, 1, sk)
            if mask.size(1) != 1:
                mask = mask.view(mask.size(0), groups, r, sk)
            # the lowest finite value rather than -inf: a fully masked row stays finite
            scores.masked_fill_(mask, torch.finfo(scores.dtype).min)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # attention_softmax_in_fp32, as Megatron's default
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        context = torch.matmul(probs, value.permute(1, 2, 0, 3))  # [b, g, r, hn]
        return context.reshape(1, b, heads * hn)

    def _allowed(
        self, attention_mask: Optional[torch.Tensor], sq: int, sk: int, device: torch.device
    ) -> tuple[Optional[torch.Tensor], bool]:
        """SDPA's boolean mask (True = allowed) and ``is_causal`` for Megatron's mask."""
        if attention_mask is not None:
            _check_mask(attention_mask)
            return ~attention_mask, False
        if self.attn_mask_type != AttnMaskType.causal or sq == 1:
            return None, False
        if sq == sk:
            return None, True
        # SDPA's is_causal aligns top-left; Megatron's KV-cache chunks align bottom-right
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)
        return allowed, False


def _check_mask(attention_mask: torch.Tensor) -> None:
    if attention_mask.dtype != torch.bool:
        raise TypeError(
            f"SDPAttention expects a boolean attention mask, got {attention_mask.dtype}"
        )
