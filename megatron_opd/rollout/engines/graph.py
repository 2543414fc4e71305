"""A fixed-shape decode step over the model's own Megatron-Core modules, captured as one CUDA graph.

Why this exists: a decode step of a small model is hundreds of kernel launches plus Python, so the
eager static engine runs at a fraction of the weight-read bound on a GPU (docs/benchmarks.md).
Megatron-Core's own fast paths need flash-attn (the static engine's CUDA graphs require
``flash_decode``, which calls ``flash_attn_with_kvcache``; the dynamic engine calls flash-attn
directly), and its attention slices the KV cache with Python integers, so it cannot be captured as
it is (docs/findings.md). This engine keeps every shape fixed per bucket (batch, cache length)
and every position in a device tensor, so one decode step, sampling included, is one graph.

What it runs, per layer, are the layer's own submodules with the training weights where they are
(``input_layernorm``, ``self_attention.get_query_key_value_tensors`` -- the fused QKV
projection and Qwen3's q/k norms --, ``linear_proj``, ``pre_mlp_layernorm``, ``mlp``), so tensor
parallelism works as in training (its all-reduces are captured with the rest) and the optimizer
step and the refit, which write the parameters in place, need no new capture. What it adds:

* a KV cache per bucket, ``[cache length, batch, query groups, head dim]`` per layer, written at
  the position tensor with ``index_copy_``;
* RoPE from a table indexed by the position tensor (Megatron's non-interleaved rotation);
* attention against the whole cache with a mask (keys after the position, and each row's left
  padding, get the lowest finite score, as Megatron's local attention does), computed as the
  static path's decode attention (``megatron_opd.models.attention``) computes it; prefill runs
  eagerly through ``scaled_dot_product_attention`` with the static engine's mask;
* the embedding lookup on this rank's vocabulary shard (Megatron's module masks out-of-shard ids
  by boolean-index assignment, a host sync that a graph cannot hold);
* sampling inside the step (:mod:`megatron_opd.rollout.engines.sampling`) from uniforms drawn
  before the rollout, and a done mask (stop tokens, the length limit) that the host reads every
  :data:`CHECK_EVERY` steps.

Positions: prompts are left-padded to the longest and every row decodes at the same column, the
static engine's layout, so greedy tokens equal the static engine's. On CPU the same step runs
eagerly (that is what the tests exercise; ``torch.compile(step, fullgraph=True)`` tracing it
without a graph break is the CPU stand-in for "capturable").

Supported: Megatron GPT models with RoPE (Qwen3, Llama) at any TP, pipeline size 1 (a decode
step on a pipeline visits its stages one after another: use ``--rollout-*-model-parallel-size``
to sample from a copy at PP 1), no sequence parallelism, dense MLPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_opd import compat
from megatron_opd.rollout.engines.base import Generation, Sampling
from megatron_opd.rollout.engines.sampling import sample
from megatron_opd.runtime.checkpointing import unwrap

CHECK_EVERY = 16  # decode steps between host reads of the done mask
MAX_STOP_TOKENS = 16  # the stop-id buffer's fixed size
LENGTH_BUCKET = 256  # cache lengths are rounded up to a multiple of this (fewer captures)

PP_FLAGS = "--rollout-tensor-model-parallel-size / --rollout-pipeline-model-parallel-size"


def unsupported(model_chunks: Sequence[torch.nn.Module]) -> Optional[str]:
    """Why the graph engine cannot run this model (``None`` when it can)."""
    if len(model_chunks) != 1:
        return "the graph engine takes one model chunk per rank (no virtual pipeline)"
    core = unwrap(model_chunks[0])
    if not (getattr(core, "pre_process", False) and getattr(core, "post_process", False)):
        return (
            "--rollout-engine graph needs pipeline size 1 for the rollout model; sample from a "
            f"copy at PP 1 with {PP_FLAGS}"
        )
    config = core.config
    if getattr(core, "position_embedding_type", None) != "rope":
        return "--rollout-engine graph supports RoPE models only"
    if config.rotary_interleaved:
        return "--rollout-engine graph does not support interleaved RoPE"
    if config.sequence_parallel:
        return "--rollout-engine graph does not support --sequence-parallel; use static"
    if config.num_moe_experts:
        return "--rollout-engine graph does not support mixture-of-experts models; use static"
    if config.context_parallel_size != 1:
        return "--rollout-engine graph does not support context parallelism"
    return None


@dataclass
class _Bucket:
    """The persistent state of one (batch, cache length): everything a captured step reads or
    writes lives here, at a fixed address."""

    batch: int
    length: int
    keys: list[torch.Tensor]  # per layer [length, batch, groups, head dim]
    values: list[torch.Tensor]
    token: torch.Tensor  # [batch] the input token of the next step
    position: torch.Tensor  # [] its column
    step: torch.Tensor  # [] the index of the token the next step samples
    limit: torch.Tensor  # [] max_new_tokens
    pads: torch.Tensor  # [batch] left padding of each row
    done: torch.Tensor  # [batch] bool
    uniforms: torch.Tensor  # [length, batch] float64, one per sampled token
    temperature: torch.Tensor  # []
    top_p: torch.Tensor  # []
    stops: torch.Tensor  # [MAX_STOP_TOKENS] stop ids, padded with -1
    tokens: torch.Tensor  # [batch, length] sampled ids
    logprobs: torch.Tensor  # [batch, length] their log-probabilities at temperature 1
    cos: torch.Tensor  # [length, 1, 1, head dim] the rotary table, per bucket: a captured graph
    sin: torch.Tensor  # keeps the address it read, so a table is never replaced
    graphs: dict = field(default_factory=dict)  # sampling key -> torch.cuda.CUDAGraph


class GraphEngine:
    """The captured decode step (see the module docstring)."""

    name = "graph"

    def __init__(self, model_chunks: Sequence[torch.nn.Module], pg_collection=None):
        reason = unsupported(model_chunks)
        if reason:
            raise ValueError(reason)
        self.model = model_chunks[0]
        self.core = unwrap(self.model)
        attention = self.core.decoder.layers[0].self_attention
        self.heads = attention.num_attention_heads_per_partition
        self.groups = attention.num_query_groups_per_partition
        self.head_dim = attention.hidden_size_per_attention_head
        self.scale = 1.0 / float(self.head_dim) ** 0.5
        if getattr(self.core.config, "softmax_scale", None) is not None:
            self.scale = float(self.core.config.softmax_scale)
        embedding = self.core.embedding.word_embeddings
        self.tp_group = embedding.tp_group
        self.vocab_start = embedding.vocab_start_index
        self.vocab_end = embedding.vocab_end_index
        self.dtype = embedding.weight.dtype  # the caches' and the rotary tables'
        self.tp_size = dist.get_world_size(self.tp_group) if dist.is_initialized() else 1
        self.capture = compat.has_cuda()
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = None  # one CUDA graph memory pool for every capture

    # ----------------------------------------------------------------------------------------
    # the rollout

    @torch.no_grad()
    def generate(self, tokenizer, prompts, sampling: Sampling, seed) -> list[Generation]:
        s = sampling
        was_training = self.model.training
        self.model.eval()
        try:
            out = []
            batch = min(len(prompts), s.max_batch_size or len(prompts))
            for start in range(0, len(prompts), batch):
                out += self._generate_batch(
                    tokenizer.pad_id, prompts[start : start + batch], s, seed, start
                )
            return out
        finally:
            self.model.train(was_training)

    def _generate_batch(self, pad_id, prompts, s: Sampling, seed, offset) -> list[Generation]:
        longest = max(len(p) for p in prompts)
        bucket = self._bucket(len(prompts), longest + s.max_new_tokens)
        device = bucket.token.device
        rows = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            rows[row, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        bucket.pads.copy_(torch.tensor([longest - len(p) for p in prompts]))
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed + offset)
        bucket.uniforms.copy_(
            torch.rand(
                bucket.uniforms.shape, generator=generator, dtype=torch.float64, device=device
            )  # fmt: skip
        )
        bucket.temperature.fill_(1.0 if s.greedy else s.temperature)
        bucket.top_p.fill_(s.top_p if s.top_p > 0 else 1.0)
        bucket.limit.fill_(s.max_new_tokens)
        if len(s.stop_token_ids) > MAX_STOP_TOKENS:
            raise ValueError(f"the graph engine takes at most {MAX_STOP_TOKENS} stop tokens")
        bucket.stops.fill_(-1)
        bucket.stops[: len(s.stop_token_ids)] = torch.tensor(s.stop_token_ids, dtype=torch.long)
        bucket.tokens.fill_(pad_id)
        bucket.logprobs.zero_()
        key = (s.greedy, 0 if s.greedy else s.top_k, s.top_p > 0 and not s.greedy,
               s.return_logprobs, s.vocab_size)  # fmt: skip

        logits = self._prefill(bucket, rows.to(device))
        bucket.step.zero_()
        bucket.done.zero_()
        bucket.position.fill_(longest - 1)
        self._sample_and_advance(bucket, logits, key, pad_id)
        step = self._step_for(bucket, key, pad_id)
        for i in range(1, s.max_new_tokens):
            if i % CHECK_EVERY == 0 and bool(bucket.done.all()):
                break
            step()
        tokens = bucket.tokens[:, : s.max_new_tokens].cpu()
        logprobs = bucket.logprobs[:, : s.max_new_tokens].cpu() if s.return_logprobs else None
        stop_set = set(s.stop_token_ids)
        out = []
        for row in range(len(prompts)):
            ids = tokens[row].tolist()
            n = next((i + 1 for i, t in enumerate(ids) if t in stop_set), len(ids))
            lps = logprobs[row, :n].tolist() if logprobs is not None else []
            out.append(Generation(ids[:n], lps, truncated=ids[n - 1] not in stop_set))
        return out

    def release(self) -> None:
        self.buckets.clear()
        self.pool = None
        if compat.has_cuda():
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------
    # buckets and capture

    def _bucket(self, batch: int, needed: int) -> _Bucket:
        length = -(-needed // LENGTH_BUCKET) * LENGTH_BUCKET
        for (b, n), bucket in self.buckets.items():  # reuse a larger cache of this batch
            if b == batch and n >= needed:
                return bucket
        device = compat.default_device()
        dtype = self.dtype
        layers = len(self.core.decoder.layers)
        shape = (length, batch, self.groups, self.head_dim)

        def zeros(*size, dtype=dtype):
            # zeros, not empty: a masked key's score is replaced, but 0 x NaN in the value
            # product would not be
            return torch.zeros(size, dtype=dtype, device=device)

        bucket = _Bucket(
            batch=batch,
            length=length,
            keys=[zeros(*shape) for _ in range(layers)],
            values=[zeros(*shape) for _ in range(layers)],
            token=zeros(batch, dtype=torch.long),
            position=zeros(dtype=torch.long),
            step=zeros(dtype=torch.long),
            limit=zeros(dtype=torch.long),
            pads=zeros(batch, dtype=torch.long),
            done=zeros(batch, dtype=torch.bool),
            uniforms=zeros(length, batch, dtype=torch.float64),
            temperature=zeros(dtype=torch.float32),
            top_p=zeros(dtype=torch.float32),
            stops=zeros(MAX_STOP_TOKENS, dtype=torch.long),
            tokens=zeros(batch, length, dtype=torch.long),
            logprobs=zeros(batch, length, dtype=torch.float32),
            **self._rotary_table(length),
        )
        self.buckets[(batch, length)] = bucket
        return bucket

    def _step_for(self, bucket: _Bucket, key: tuple, pad_id: int):
        """The decode step of ``bucket`` under sampling ``key``: the captured graph's replay on
        CUDA (captured on first use), the eager step elsewhere."""

        def eager():
            self.decode_step(bucket, key, pad_id)

        if not self.capture:
            return eager
        graph = bucket.graphs.get(key)
        if graph is None:
            graph = self._capture(bucket, key, pad_id)
            bucket.graphs[key] = graph
        return graph.replay

    def _capture(self, bucket: _Bucket, key: tuple, pad_id: int):
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()

        def warm_up_and_record():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                # warm-up off the graph: lazy initialisation, allocator state, and TorchScript's
                # profiling runs of Megatron's fused activation (it optimizes after the first)
                for _ in range(3):
                    self.decode_step(bucket, key, pad_id)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph, pool=self.pool):
                self.decode_step(bucket, key, pad_id)

        self.off_the_record(bucket, warm_up_and_record)
        return graph

    @staticmethod
    def off_the_record(bucket: _Bucket, steps) -> None:
        """Run ``steps`` (warm-up and capture execute the step, which writes the state it reads:
        position, counters, caches, outputs) and put back what they changed, since the rollout
        is under way when a bucket meets a new sampling key."""
        state = (bucket.token, bucket.position, bucket.step, bucket.done, bucket.tokens,
                 bucket.logprobs, *bucket.keys, *bucket.values)  # fmt: skip
        saved = [t.clone() for t in state]
        steps()
        for tensor, before in zip(state, saved, strict=True):
            tensor.copy_(before)

    # ----------------------------------------------------------------------------------------
    # the model, one layer's submodules at a time

    def decode_step(self, bucket: _Bucket, key: tuple, pad_id: int) -> None:
        """One token per row at ``bucket.position``: forward, sample, record, advance. Fixed
        shapes, no host reads: the body of the captured graph."""
        position = bucket.position.view(1)
        columns = torch.arange(bucket.length, device=position.device)
        # True where a key may not be attended: after the position, or in the row's padding
        masked = (columns[None, :] > bucket.position) | (columns[None, :] < bucket.pads[:, None])
        hidden = self._embed(bucket.token.view(bucket.batch, 1))  # [1, b, h]
        cos, sin = bucket.cos.index_select(0, position), bucket.sin.index_select(0, position)
        for index, layer in enumerate(self.core.decoder.layers):
            hidden = self._layer(layer, hidden, cos, sin, bucket, index, position, masked)
        self._sample_and_advance(bucket, self._logits(hidden), key, pad_id)

    def _prefill(self, bucket: _Bucket, rows: torch.Tensor) -> torch.Tensor:
        """The prompts ``[b, s]`` (left-padded) through the model, eagerly, their keys and values
        written to the cache; the last position's logits ``[b, vocab]``."""
        b, s = rows.shape
        hidden = self._embed(rows)
        cos, sin = bucket.cos[:s], bucket.sin[:s]
        pads = bucket.pads
        mask = None  # the static engine's: causal, and no row attends to its own left padding
        if bool((pads > 0).any()):
            columns = torch.arange(s, device=rows.device)
            causal = columns[None, :] > columns[:, None]
            padding = columns[None, :] < pads[:, None]
            mask = (causal[None] | padding[:, None, :])[:, None]  # [b, 1, s, s]
        for index, layer in enumerate(self.core.decoder.layers):
            hidden = self._layer(layer, hidden, cos, sin, bucket, index, None, mask)
        return self._logits(hidden[-1:])

    def _layer(self, layer, hidden, cos, sin, bucket: _Bucket, index: int,
               position: Optional[torch.Tensor], mask) -> torch.Tensor:  # fmt: skip
        """One transformer layer; ``position`` is None at prefill (``hidden`` is the whole
        prompt, written to the cache from column 0)."""
        attention = layer.self_attention
        residual = hidden
        normed = layer.input_layernorm(hidden)
        query, key, value = attention.get_query_key_value_tensors(normed, None)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
        keys, values = bucket.keys[index], bucket.values[index]
        if position is None:
            s = key.size(0)
            keys[:s].copy_(key)
            values[:s].copy_(value)
            context = self._prefill_attention(query, key, value, mask)
        else:
            keys.index_copy_(0, position, key)
            values.index_copy_(0, position, value)
            context = self._decode_attention(query, keys, values, mask)
        out, bias = attention.linear_proj(context)
        hidden = residual + (out if bias is None else out + bias)
        residual = hidden
        out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
        return residual + (out if bias is None else out + bias)

    def _prefill_attention(self, query, key, value, mask) -> torch.Tensor:
        """``[s, b, np, hn]`` x ``[s, b, ng, hn]`` -> ``[s, b, np * hn]``, causal; as the
        static engine's prefill computes it (``megatron_opd.models.attention.SDPAttention``)."""
        s, b = query.shape[:2]
        context = F.scaled_dot_product_attention(
            query.permute(1, 2, 0, 3),
            key.permute(1, 2, 0, 3),
            value.permute(1, 2, 0, 3),
            attn_mask=None if mask is None else ~mask,
            is_causal=mask is None and s > 1,
            scale=self.scale,
            enable_gqa=self.heads != self.groups,
        )
        return context.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _decode_attention(self, query, keys, values, masked) -> torch.Tensor:
        """One query per row against the whole cache ``[n, b, ng, hn]``; the ``np / ng``
        queries of a group in one batched matmul, as the static path's decode attention."""
        b = query.size(1)
        r = self.heads // self.groups
        q = query.reshape(b, self.groups, r, self.head_dim) * self.scale
        scores = torch.matmul(q, keys.permute(1, 2, 3, 0))  # [b, g, r, n]
        scores = scores.masked_fill(masked[:, None, None, :], torch.finfo(scores.dtype).min)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()  # attention_softmax_in_fp32, as Megatron's default
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        context = torch.matmul(probs, values.permute(1, 2, 0, 3))  # [b, g, r, hn]
        return context.reshape(1, b, self.heads * self.head_dim)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[b, s]`` ids -> ``[s, b, h]``: this rank's vocabulary rows, summed over TP."""
        weight = self.core.embedding.word_embeddings.weight
        if self.tp_size == 1:
            hidden = F.embedding(tokens, weight)
        else:
            outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
            local = (tokens - self.vocab_start).masked_fill(outside, 0)
            hidden = F.embedding(local, weight).masked_fill(outside[..., None], 0.0)
            dist.all_reduce(hidden, group=self.tp_group)
        hidden = hidden.transpose(0, 1).contiguous()
        if self.core.config.fp32_residual_connection:
            hidden = hidden.float()
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last layer's ``[1, b, h]`` -> full-vocabulary logits ``[b, padded vocab]``."""
        core = self.core
        hidden = core.decoder.final_layernorm(hidden)
        weight = None
        if core.share_embeddings_and_output_weights:
            weight = core.shared_embedding_or_output_weight()
        logits, _ = core.output_layer(hidden, weight=weight, runtime_gather_output=True)
        return logits[-1]

    def _rotary_table(self, length: int) -> dict[str, torch.Tensor]:
        """cos and sin ``[length, 1, 1, hn]`` of Megatron's rotary angles, in the model's dtype
        as Megatron applies them."""
        freqs = self.core.rotary_pos_emb.get_freqs_non_repeated(length)  # [n, hn / 2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        return dict(cos=angles.cos().to(self.dtype), sin=angles.sin().to(self.dtype))

    def _sample_and_advance(self, bucket: _Bucket, logits: torch.Tensor, key: tuple,
                            pad_id: int) -> None:  # fmt: skip
        """Sample the step's token from ``logits`` ``[b, padded vocab]``, record it (pad once a
        row is done), and move every counter on by one."""
        greedy, top_k, use_top_p, return_logprobs, vocab_size = key
        logits = logits[:, :vocab_size] if vocab_size else logits
        u = bucket.uniforms.index_select(0, bucket.step.view(1)).view(-1)
        top_p = bucket.top_p if use_top_p else None
        token = sample(logits.float(), u, greedy, bucket.temperature, top_k, top_p)
        token = token.masked_fill(bucket.done, pad_id)
        at = bucket.step.view(1)
        bucket.tokens.index_copy_(1, at, token.view(-1, 1))
        if return_logprobs:
            logprob = torch.log_softmax(logits.float(), dim=-1).gather(1, token.view(-1, 1))
            bucket.logprobs.index_copy_(1, at, logprob)
        stopped = (token[:, None] == bucket.stops[None, :]).any(dim=1)
        stopped |= bucket.step + 1 >= bucket.limit
        bucket.done.logical_or_(stopped)
        bucket.token.copy_(token)
        bucket.position.add_(1)
        bucket.step.add_(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's non-interleaved RoPE of ``x`` ``[s, b, heads, hn]``."""
    half1, half2 = torch.chunk(x, 2, dim=-1)
    return x * cos + torch.cat((-half2, half1), dim=-1) * sin
