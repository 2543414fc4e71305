"""Megatron-Core's own engines behind :class:`megatron_opd.rollout.engines.Engine`: static and
dynamic.

``StaticEngine`` wires ``StaticInferenceEngine(legacy=True)`` + ``GPTInferenceWrapper`` +
``TextGenerationController`` over a KV cache (``StaticInferenceContext``) and adds what rollouts
need and the stock controller lacks (the constructors differ across Megatron-Core versions;
:mod:`megatron_opd.compat.inference` bridges them):

* padded vocabulary columns (ids >= the true vocab size) get logit -inf before sampling, so they are
  never sampled and carry no probability;
* several stop tokens (the controller knows one), and the stop token kept in the output;
* the log-probability of each generated token, computed from the last-position logits only (the
  stock ``return_log_probs`` materializes ``[batch, prompt, vocab]`` logits at prefill), and only
  when asked for (``return_logprobs``): training rollouts do not read them, and a full-vocabulary
  ``log_softmax`` per step is measurable next to a small model's decode step;
* a truncation flag (``max_new_tokens`` reached without a stop token);
* prompts of different lengths left-padded to the longest, behind a key-padding mask, when the
  attention takes an arbitrary mask (Megatron's local spec): the stock engine starts decoding at the
  *shortest* prompt and feeds the longer ones one prompt token per decode step, so a batch whose
  prompts span 85 to 130 tokens took 173 decode steps for 128 new tokens (45 wasted on every row);
  left-padded, it takes 128. RoPE scores depend only on the distance between positions, so a row
  shifted right by its padding attends exactly as it would unshifted (up to float rounding of
  the angles);
* plain sampling (no top-k / top-p) by one uniform draw per row against the float64 cumulative
  distribution, where ``torch.multinomial`` draws an exponential per vocabulary entry: on a 49k
  vocabulary that was 7 ms of a 33 ms CPU decode step (the distribution sampled is the same).

It runs on every rank of the model-parallel group (TP and PP ranks all return the same result) and
leaves the model in the train/eval mode it found it in.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_opd import compat
from megatron_opd.rollout.engines.base import Generation, Sampling
from megatron_opd.rollout.engines.sampling import sample_categorical
from megatron_opd.runtime.checkpointing import unwrap


class _MegatronTokenizer:
    """The slice of Megatron's tokenizer API the controller touches (prompts arrive as ids)."""

    def __init__(self, tokenizer, pad_id: int):
        self._tokenizer = tokenizer
        self.eod = pad_id  # Megatron pads prompt batches with ``eod``
        self.bos = getattr(tokenizer, "bos_id", None)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def detokenize(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _inference_classes():
    """Megatron's inference classes with the additions above (imported lazily: ~8 s)."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )

    class VocabMaskedWrapper(GPTInferenceWrapper):
        def __init__(self, *args, vocab_size: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.vocab_size = vocab_size

        def left_pad_mask(self, tokens: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
            """Megatron's boolean mask ``[b, 1, s, s]`` (True = not allowed): causal, and no
            row attends to its own left padding."""
            s = tokens.size(1)
            positions = torch.arange(s, device=tokens.device)
            pads = torch.tensor(list(pads), device=tokens.device)
            causal = positions[None, :] > positions[:, None]  # [s, s]
            padding = positions[None, :] < pads[:, None]  # [b, s]
            return (causal[None] | padding[:, None, :])[:, None]

        def run_one_forward_step(self, inference_input, recv_buffer_seq_len=None):
            logits = super().run_one_forward_step(inference_input, recv_buffer_seq_len)
            if logits is not None and logits.size(-1) > self.vocab_size:
                logits[..., self.vocab_size :] = float("-inf")
            return logits

    class RolloutController(compat.inference.controller_class()):
        def __init__(
            self, *args, stop_token_ids: Sequence[int], return_logprobs: bool = True, **kwargs
        ):
            super().__init__(*args, **kwargs)
            self.return_logprobs = return_logprobs
            self.left_pads: dict[int, int] = {}  # request id -> pad tokens in front of its prompt
            self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
            self.token_logprobs: Optional[torch.Tensor] = None
            self.step_logprobs: Optional[torch.Tensor] = None

        def sample_from_logits(
            self, last_token_logits, sampling_params=None, vocab_size=None, **kw
        ):
            # Sample over the true vocabulary only: the padded width depends on TP, and the
            # sampler's random draws depend on the width, so slicing keeps rollouts identical
            # across layouts for the same seed.
            true_vocab = self.inference_wrapped_model.vocab_size
            last_token_logits = last_token_logits[..., :true_vocab]
            params = sampling_params or kw.get("common_inference_params")
            if params.top_k == 0 and params.top_p == 0.0 and not params.top_n_logprobs:
                # plain sampling: our sampler, on every Megatron-Core version (greedy and
                # filtered sampling are Megatron's own code)
                sampled = sample_categorical(
                    last_token_logits, params.temperature, self.sampling_rng
                )
            else:
                sampled = super().sample_from_logits(
                    last_token_logits, sampling_params, vocab_size, **kw
                )
            if self.return_logprobs:
                logprobs = F.log_softmax(last_token_logits.float(), dim=-1)
                self.step_logprobs = logprobs.gather(1, sampled.view(-1, 1).long()).view(-1)
            return sampled

        def prep_inference_input(self, prompts_tokens, active_requests, use_attention_mask=False):
            inference_input = super().prep_inference_input(
                prompts_tokens, active_requests, use_attention_mask
            )
            pads = [self.left_pads.get(request_id, 0) for request_id in active_requests]
            if any(pads):
                wrapped = self.inference_wrapped_model
                inference_input["attention_mask"] = wrapped.left_pad_mask(prompts_tokens, pads)
            return inference_input

        def update_generation_status(
            self,
            updated_prompts_tokens,
            generation_started,
            current_context_end_position,
            is_generation_done_tensor,
            generated_sequence_lengths,
            termination_id=None,
        ):
            # Same bookkeeping as Megatron's, with a set of stop ids, and the stop token counted
            # in the generated length (Megatron drops it).
            position = current_context_end_position
            if self.return_logprobs:
                self.token_logprobs[:, position] = self.step_logprobs
            latest = updated_prompts_tokens[:, position]
            stops = torch.isin(latest, self.stop_ids.to(latest.device)) & generation_started
            generated_sequence_lengths += ~is_generation_done_tensor & generation_started
            return is_generation_done_tensor | stops, generated_sequence_lengths.int()

        def detokenize_generations(self, *args, **kwargs):
            return "", None  # callers get ids; decoding every rollout here would be wasted work

        def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
            requests = list(active_requests.values())
            length = max(len(r.prompt_tokens) for r in requests)
            length += requests[0].sampling_params.num_tokens_to_generate
            self.token_logprobs = torch.zeros(
                len(requests), length, dtype=torch.float32, device=compat.default_device()
            )
            done = super().generate_all_output_tokens_static_batch(active_requests, active_streams)
            for row, request in enumerate(requests):
                start = len(request.prompt_tokens)
                n = int(request.generated_length) if self.return_logprobs else 0
                request.token_logprobs = self.token_logprobs[row, start : start + n].tolist()
            return done

    return VocabMaskedWrapper, RolloutController


def left_padding_supported() -> bool:
    """Whether the static engine may left-pad prompts: the attention must honour an arbitrary
    ``[b, 1, sq, sk]`` mask at prefill and decode, which Megatron's local spec does; the
    transformer-engine spec builds its own causal mask and is left as Megatron runs it."""
    return not compat.transformer_engine_available()


def _padded_vocab_size(core: torch.nn.Module, pp_group) -> int:
    """The logits' width; middle pipeline stages hold neither embedding nor output layer."""
    size = 0
    if core.pre_process:
        size = core.embedding.word_embeddings.num_embeddings
    elif core.post_process:
        size = core.output_layer.output_size
    if torch.distributed.get_world_size(pp_group) > 1:
        width = torch.tensor([size], dtype=torch.long, device=next(core.parameters()).device)
        torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX, group=pp_group)
        size = int(width.item())
    return size


class StaticEngine:
    """Megatron-Core's ``StaticInferenceEngine`` (legacy mode) with the additions above. It holds
    nothing between calls: each ``generate`` sizes a KV cache for its batch."""

    name = "static"

    def __init__(self, model_chunks: Sequence[torch.nn.Module], pg_collection=None):
        self.model = model_chunks[0]
        self.pg_collection = pg_collection

    def generate(self, tokenizer, prompts, sampling: Sampling, seed) -> list[Generation]:
        # Megatron's inference stack, imported on first use: ~8 s, and only rollouts need it
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.inference_request import InferenceRequest
        from megatron.core.inference.sampling_params import SamplingParams

        model, s, pad_id = self.model, sampling, tokenizer.pad_id
        padded_vocab, pp_group = model_layout(model)
        vocab_size = s.vocab_size or padded_vocab
        batch = min(len(prompts), s.max_batch_size or len(prompts))
        max_length = max(len(p) for p in prompts) + s.max_new_tokens
        VocabMaskedWrapper, RolloutController = _inference_classes()
        wrapper_config = compat.inference.wrapper_config(
            unwrap(model).config, padded_vocab, batch, max_length
        )
        context = StaticInferenceContext(batch, max_length)
        wrapped = compat.inference.wrap_model(
            VocabMaskedWrapper, model, wrapper_config, context, self.pg_collection,
            vocab_size=vocab_size,
        )  # fmt: skip
        controller = compat.inference.make_controller(
            RolloutController,
            wrapped,
            _MegatronTokenizer(tokenizer, tokenizer.pad_id),
            pp_group,
            stop_token_ids=s.stop_token_ids,
            return_logprobs=s.return_logprobs,
        )
        if seed is not None:
            controller.sampling_rng.manual_seed(seed)
        engine = StaticInferenceEngine(controller, max_batch_size=batch, legacy=True)
        params = SamplingParams(
            temperature=1.0 if s.greedy else float(s.temperature),
            top_k=1 if s.greedy else int(s.top_k),
            top_p=0.0 if s.greedy else float(s.top_p),
            num_tokens_to_generate=s.max_new_tokens,
        )
        longest = max(len(p) for p in prompts)
        left_pad = left_padding_supported()
        request_ids = []
        for prompt in prompts:
            request_id = engine.get_new_request_id()
            pad = longest - len(prompt) if left_pad else 0
            controller.left_pads[request_id] = pad
            request = InferenceRequest(
                request_id=request_id,
                prompt="",
                prompt_tokens=[pad_id] * pad + [int(t) for t in prompt],
                sampling_params=params,
            )
            engine.scheduler.add_request(inference_request=request)
            request_ids.append(request_id)

        was_training = model.training
        try:
            # run_engine rather than engine.generate, which reseeds torch's global RNG on every call
            engine.run_engine()
        finally:
            compat.inference.engine_finished()
            model.train(was_training)

        stops = set(s.stop_token_ids)
        out = []
        for request_id in request_ids:
            request = engine.scheduler.completed_request_pool[request_id]
            tokens = [int(t) for t in request.generated_tokens.tolist()]
            truncated = not tokens or tokens[-1] not in stops
            out.append(Generation(tokens, list(request.token_logprobs), truncated))
        return out

    def release(self) -> None:
        """Nothing is kept between calls."""


def model_layout(model: torch.nn.Module) -> tuple[int, object]:
    """The logits' padded width and the model's pipeline group (the one it was built on: its
    grid's, which GPTModel keeps in ``pg_collection``)."""
    core = unwrap(model)
    pp_group = core.pg_collection.pp
    return _padded_vocab_size(core, pp_group), pp_group


# --------------------------------------------------------------------------------------------
# Megatron-Core's dynamic (continuous-batching) engine


def dynamic_engine_unavailable() -> Optional[str]:
    """Why the dynamic engine cannot run here (``None`` when it can): Megatron-Core's
    ``DynamicInferenceEngine`` (0.16 and 0.19 alike) needs CUDA, and in dynamic mode its attention
    calls flash-attn >= 2.7.3, flash-attn 3 or flash-attn 4 itself (``transformer/attention.py``;
    never ``core_attention``, so SDPA cannot stand in), with einops."""
    if not compat.has_cuda():
        return "Megatron-Core's dynamic engine needs CUDA; use --rollout-engine static on CPU"
    if not _flash_attention_present():
        return (
            "Megatron-Core's dynamic engine needs flash-attn >= 2.7.3, flash-attn 3 or "
            "flash-attn 4; use --rollout-engine static"
        )
    try:
        import einops  # noqa: F401
    except ImportError:
        return "Megatron-Core's dynamic engine needs einops; use --rollout-engine static"
    return None


def _flash_attention_present() -> bool:
    if any(importlib.util.find_spec(m) for m in ("flash_attn_3", "flashattn_hopper")):
        return True
    for dist, oldest in (("flash-attn-4", (4, 0)), ("flash-attn", (2, 7, 3))):
        try:
            found = version(dist)
        except PackageNotFoundError:
            continue
        release = tuple(int(p) for p in found.split("+")[0].split(".")[:3] if p.isdigit())
        if release >= oldest:
            return True
    return False


class DynamicEngine:
    """Megatron-Core's continuous-batching engine: a finished sequence leaves the batch at once
    and its KV blocks go to the next request, so no step computes a sequence that is done. Stop
    tokens: the first is the engine's ``termination_id``; the others are one-token stop words
    (finished one step later, the stop token kept, as in the static path)."""

    name = "dynamic"

    def __init__(self, model_chunks: Sequence[torch.nn.Module], pg_collection=None):
        reason = dynamic_engine_unavailable()
        if reason:
            raise ValueError(f"--rollout-engine dynamic: {reason}")
        if pg_collection is not None:
            raise ValueError("--rollout-engine dynamic runs on the training layout only")
        self.model = model_chunks[0]

    def generate(self, tokenizer, prompts, sampling: Sampling, seed) -> list[Generation]:
        from megatron.core.inference.inference_request import DynamicInferenceRequest
        from megatron.core.inference.sampling_params import SamplingParams

        model, s = self.model, sampling
        padded_vocab, _ = model_layout(model)
        vocab_size = s.vocab_size or padded_vocab
        batch = min(len(prompts), s.max_batch_size or len(prompts))
        max_length = max(len(p) for p in prompts) + s.max_new_tokens
        wrapper_config = compat.inference.wrapper_config(
            unwrap(model).config, padded_vocab, batch, max_length
        )
        params = SamplingParams(
            temperature=1.0 if s.greedy else float(s.temperature),
            top_k=1 if s.greedy else int(s.top_k),
            top_p=0.0 if s.greedy else float(s.top_p),
            num_tokens_to_generate=s.max_new_tokens,
            return_log_probs=s.return_logprobs,
            skip_prompt_log_probs=True,
        )
        VocabMaskedWrapper, _ = _inference_classes()
        stops = sorted(set(s.stop_token_ids))
        params.termination_id = stops[0] if stops else -1
        compat.inference.keep_stop_tokens(params)
        context = compat.inference.make_dynamic_context(
            model, wrapper_config, batch, max_length, DYNAMIC_KV_BUFFER_GB
        )
        wrapped = compat.inference.wrap_model(
            VocabMaskedWrapper, model, wrapper_config, context, vocab_size=vocab_size
        )
        wrapped.prep_model_for_inference()
        controller = compat.inference.controller_class()(
            wrapped, _MegatronTokenizer(tokenizer, tokenizer.pad_id)
        )
        if seed is not None:
            controller.sampling_rng.manual_seed(seed)
        engine = compat.inference.make_dynamic_engine(controller, context, int(seed or 0))
        device = compat.default_device()
        for request_id, prompt in enumerate(prompts):
            request = DynamicInferenceRequest(
                request_id=request_id,
                prompt_tokens=torch.tensor(
                    [int(t) for t in prompt], dtype=torch.int64, device=device
                ),
                sampling_params=params,
            )
            # the public add_request takes stop *words* (text); our stops are token ids already
            request.stop_word_ids = [[s] for s in stops[1:]]
            engine._add_request(request)
        was_training = model.training
        records = []
        try:
            while engine.has_unfinished_requests():
                records.extend(engine.step_modern()["finished_request_records"])
        finally:
            compat.inference.engine_finished()
            model.train(was_training)
        by_id = {}
        for record in records:
            request = record.merge()
            by_id[request.request_id] = request
        out = []
        for request_id in range(len(prompts)):
            request = by_id[request_id]
            tokens = [int(t) for t in request.generated_tokens]
            logprobs = [float(x) for x in (request.generated_log_probs or [])]
            truncated = not tokens or tokens[-1] not in stops
            out.append(Generation(tokens, logprobs, truncated))
        return out

    def release(self) -> None:
        """Nothing is kept between calls."""


DYNAMIC_KV_BUFFER_GB = 4.0  # the engine's KV block pool; rollouts of small models need little
