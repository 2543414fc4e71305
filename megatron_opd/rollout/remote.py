"""Rollouts on ranks of their own (``--rollout-ranks N``), at most ``--rollout-lag`` steps behind.

The training pool trains; the rollout pool (``megatron_opd.runtime.pools``) holds a copy of the
student at ``--rollout-*-model-parallel-size`` and only generates. Step ``i`` (the one that turns
θ_i into θ_{i+1}) trains on batch ``B_i``, sampled from θ_{max(i - lag, 0)} with step ``i``'s
prompts and
seed (``rollouts.step_seed``, plus the rollout replica's index):

- lag 0: the rollout pool waits for θ_i, then samples ``B_i`` while the training pool waits
  for it: disaggregated, but on-policy (the same tokens as the colocated copy at that layout);
- lag 1: the rollout pool samples ``B_{i+1}`` from θ_i while the training pool trains step
  ``i`` on ``B_i`` (from θ_{i-1}); the first two batches both come from the starting weights.

The protocol over the bridge (the training leader and the rollout ranks) is fixed, so neither
side ever waits on a transfer the other has not started: at start the leader sends the plan of
tensors and a hello (iteration, prompt-stream position, whether the checkpoint holds the batch in
flight), then θ at the start iteration. Per step the leader first receives ``B_i``, then sends
the weights the rollout pool needs next: θ_i right away at lag 1 (it samples ``B_{i+1}`` from
them during step ``i``), θ_{i+1} after the optimizer step at lag 0. Weights go one tensor at a
time: the training ranks that hold a tensor (data-parallel replica 0) gather it on one rank, which
hands it to the leader, which broadcasts it to the rollout ranks; each keeps its shard.

A checkpoint at lag 1 holds the batch in flight (``B_i`` for a checkpoint at iteration ``i``:
sampled from θ_{i-1}, which the checkpoint does not hold), so a resumed run trains on exactly the
batches a straight one would. Both pools draw prompts from the same seeded stream; the rollout
pool starts where the checkpoint says.

Why not ``megatron.core.resharding`` (``swap_model_weights``): it plans and executes over the
default process group, with the source and the destination model on every rank of it
(``all_gather_object`` of both models' parameters, ``broadcast_object_list`` of the plan, a
closing ``dist.barrier()``), while here each pool's default group is its own. See
``docs/findings.md`` for the other reasons, measured on the colocated copy.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_opd.models import gpt
from megatron_opd.rollout import engines, refit
from megatron_opd.rollout.generation import Generation, generate
from megatron_opd.rollout.sources import InPlace, step_seed
from megatron_opd.runtime import failures
from megatron_opd.runtime.distributed import ModelGrid
from megatron_opd.runtime.pools import STOPPED, Pool
from megatron_opd.training import data
from megatron_opd.training.opd import RolloutConfig

IN_FLIGHT = "rollout_in_flight"  # the key of the batch in flight in a checkpoint's extra state


def global_prompts(prompts: data.PromptSet, stream: data.PromptStream, batch: int,
                   samples: int) -> list[list[int]]:  # fmt: skip
    """One step's prompts for the whole batch, in data-parallel order: the trainer's draw
    (:func:`megatron_opd.training.data.draw_step`)."""
    return data.draw_step(prompts, stream, batch, samples)[0]


class Remote(InPlace):
    """The training pool's side: batches from the rollout pool, weights to it."""

    def __init__(self, student, grid: ModelGrid, pool: Pool, lag: int,
                 train_iters: int):  # fmt: skip
        """``student``: its chunks on ``grid``; ``pool``: the training pool."""
        super().__init__(student, grid.dp_rank)
        self.pool, self.lag, self.train_iters = pool, lag, train_iters
        self.dp_size = grid.dp_size
        self.tp_group = grid.tp
        self.gated = bool(refit.unwrap(student[0]).config.gated_linear_unit)
        self.sources = refit.plan_sources(
            refit.global_parameters(student), grid.dp_rank, self.tp_group
        )
        self.held: Optional[tuple[int, list]] = None  # (iteration, the whole batch's generations)
        self.sent: Optional[int] = None  # the newest weights sent
        self.timings: dict[str, float] = {}

    @property
    def leader(self) -> bool:
        return self.pool.bridge is not None

    # -- start ---------------------------------------------------------------------------------

    def start(self, iteration: int, stream: data.PromptStream, in_flight: Optional[dict]) -> None:
        """The plan, the hello and θ at ``iteration`` (``in_flight``: from the checkpoint)."""
        if in_flight is not None and self.lag == 1 and in_flight["iteration"] == iteration:
            self.held = (iteration, _generations(in_flight["generations"]))
        if self.leader:
            plan = [(name, src.shape, src.dtype) for name, src in self.sources.items()]
            self.pool.bridge.broadcast_object(plan)
            hello = {
                "iteration": iteration,
                "stream": stream.state_dict(),
                "in_flight": self.held is not None,
            }
            self.pool.bridge.broadcast_object(hello)
        self._send_weights(iteration)

    # -- per step ------------------------------------------------------------------------------

    def update_weights(self, iteration: int) -> dict[str, float]:
        """The one weight sync, in the bridge's fixed order. Lag 0: θ_i to the rollout pool,
        which samples ``B_i`` from it (θ at the start iteration went with the hello). Lag 1:
        first receive ``B_i`` (sampled from θ_{i-1}), then send θ_i, from which the pool samples
        ``B_{i+1}`` while step ``i`` trains."""
        i = self.iteration = iteration
        wait = 0.0
        if self.lag == 1:
            t0 = time.perf_counter()
            self._batch(i)
            wait = time.perf_counter() - t0
        t1 = time.perf_counter()
        if i + self.lag < self.train_iters and (self.sent is None or self.sent < i):
            self._send_weights(i)
        self.timings = {"time/rollout_wait": wait, "time/refit": time.perf_counter() - t1}
        return dict(self.timings)

    def generate(self, tokenizer, prompts, seed: int, **kwargs) -> list[Generation]:
        """This data-parallel rank's share of ``B_i`` (the rollout pool's seed is the same
        ``seed``: it follows :func:`megatron_opd.rollout.sources.step_seed`)."""
        t0 = time.perf_counter()
        gens = self._batch(self.iteration)
        self.timings["time/rollout_wait"] += time.perf_counter() - t0
        local = len(gens) // self.dp_size
        mine = gens[self.dp_rank * local : (self.dp_rank + 1) * local]
        if len(mine) != len(prompts):
            raise RuntimeError(f"the rollout pool sent {len(gens)} rows; expected {len(prompts)}")
        return mine

    def _batch(self, i: int) -> list[Generation]:
        if self.held is not None and self.held[0] == i:
            return self.held[1]
        message = None
        if self.leader:
            message = self.pool.bridge.broadcast_object(root=1)
            if message is STOPPED or message["iteration"] != i:
                raise RuntimeError(f"the rollout pool sent batch {message}, expected {i}")
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
        self.rollout_pool_times = {
            "pool/rollout_busy_s": message["busy"],
            "pool/rollout_idle_s": message["idle"],
        }
        gens = _generations(message["generations"])
        self.held = (i, gens)
        return gens

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """The pools' busy and idle seconds in the step just done, and the lag."""
        wait = self.timings.get("time/rollout_wait", 0.0)
        out = {
            "rollout/lag": float(self.lag),
            **self.timings,
            "pool/train_idle_s": wait,
            "pool/train_busy_s": step_seconds - wait,
        }
        out.update(getattr(self, "rollout_pool_times", {}))
        return out

    def checkpoint_state(self, iteration: int) -> dict:
        """At lag 1, ``B_iteration`` (sampled from θ_{iteration-1}); received now if need be."""
        if self.lag == 0 or iteration >= self.train_iters:
            return {}
        gens = self._batch(iteration)
        return {
            IN_FLIGHT: {
                "iteration": iteration,
                "generations": [(list(g.tokens), bool(g.truncated)) for g in gens],
            }
        }

    def eval_sampler(self, iteration: int):
        return self.student  # evaluation samples on the training ranks, from θ_iteration

    def close(self) -> None:
        if self.leader:
            self.pool.bridge.stop()

    # -- weights -------------------------------------------------------------------------------

    @torch.no_grad()
    def _send_weights(self, version: int) -> None:
        """θ_version to every rollout rank (collective over the training pool)."""
        params = refit.global_parameters(self.student)
        bridge = self.pool.bridge
        if self.leader:
            bridge.broadcast_object({"version": version})
        for name, src in self.sources.items():
            full = refit.assemble(name, src, params, self.tp_group, self.gated)
            root = src.ranks[0]
            if root != 0:  # the leader is training rank 0
                if dist.get_rank() == root:
                    dist.send(full.contiguous(), dst=0)
                elif self.leader:
                    full = torch.empty(src.shape, dtype=src.dtype, device=_device(self.student))
                    dist.recv(full, src=root)
            if self.leader:
                bridge.broadcast(full)
        self.sent = version


def _generations(rows) -> list[Generation]:
    """``[(tokens, truncated)]`` (the bridge's and the checkpoint's form) as generations."""
    return [Generation(list(tokens), [], bool(truncated)) for tokens, truncated in rows]


def _device(student) -> torch.device:
    return next(refit.unwrap(student[0]).parameters()).device


@dataclass
class ServeConfig:
    """What a rollout rank needs to know of the run (built from the flags by
    :func:`megatron_opd.training.launch.serve_config`); the copy's layout is the rollout pool's
    grid (``pool.grid``)."""

    arch: gpt.ArchConfig  # the student's
    vocab_divisor: int
    dtype: torch.dtype
    rollout: RolloutConfig  # the trainer's, exactly: lag 0 equals the colocated run
    seed: int
    global_batch_size: int
    samples_per_prompt: int
    train_iters: int
    lag: int
    ignore_signal: Optional[str]  # the training pool's exit signal: it decides when to stop


def serve(cfg: ServeConfig, prompts: data.PromptSet, tokenizer, pool: Pool) -> None:
    """The rollout pool's side: until the last batch is sent or the leader says stop (then the
    process ends at once: a transfer it abandoned would hold gloo's worker thread at exit)."""
    if cfg.ignore_signal:
        # the training pool saves first, and at lag 1 its checkpoint needs the batch in flight
        # from this pool; its stop flag then ends this rank
        signal.signal(getattr(signal, cfg.ignore_signal), signal.SIG_IGN)
    if not _serve(cfg, prompts, tokenizer, pool):
        failures.exit_after_stop()  # 0, or the code of the failure that stopped the job


def _serve(cfg: ServeConfig, prompts: data.PromptSet, tokenizer, pool: Pool) -> bool:
    """False when stopped before the last batch."""
    grid = pool.grid  # the rollout pool's: Megatron's groups there are the copy's layout
    tp = grid.tp_size
    chunk = refit.build_copy(cfg.arch, grid, cfg.dtype, cfg.vocab_divisor)
    targets = refit.copy_targets(chunk)
    gated = bool(chunk.config.gated_linear_unit)
    tp_rank, replica, replicas = grid.tp_rank, grid.dp_rank, grid.dp_size
    bridge = pool.bridge
    device = next(chunk.parameters()).device

    plan = bridge.broadcast_object()
    hello = bridge.broadcast_object()
    if plan is STOPPED or hello is STOPPED:
        return False
    stream = data.PromptStream(len(prompts), seed=cfg.seed)
    stream.load_state_dict(hello["stream"])
    n = hello["iteration"]
    if hello["in_flight"]:  # B_n is in the checkpoint: the next to sample is B_{n+1}
        stream.take(cfg.global_batch_size // cfg.samples_per_prompt)
        n += 1

    version = None

    @torch.no_grad()
    def receive() -> bool:
        nonlocal version
        header = bridge.broadcast_object()
        if header is STOPPED:
            return False
        for name, shape, dt in plan:
            full = bridge.broadcast(torch.empty(shape, dtype=dt))
            if full is None:
                return False
            refit.load_full(targets, name, full.to(device), tp_rank, tp, gated)
        version = header["version"]
        return True

    if not receive():
        return False
    kwargs = cfg.rollout.sampling_kwargs()
    if pool.rank == 0:
        engine = engines.resolve(kwargs["engine"], [chunk])
        print(f"rollout ranks: {replicas} replica(s) sampling with the {engine} engine", flush=True)
    idle_since = time.perf_counter()
    while n < cfg.train_iters:
        while version < max(n - cfg.lag, 0):
            if not receive():
                return False
        rows = global_prompts(prompts, stream, cfg.global_batch_size, cfg.samples_per_prompt)
        t0 = time.perf_counter()
        bounds = [len(rows) * r // replicas for r in range(replicas + 1)]
        share = rows[bounds[replica] : bounds[replica + 1]]
        gens = []
        if share:
            seed = step_seed(cfg.seed, n) + replica
            gens = generate([chunk], tokenizer, share, seed=seed, **kwargs)
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (replica, [(g.tokens, g.truncated) for g in gens]))
        by_replica = dict(every)
        busy = time.perf_counter() - t0
        idle, idle_since = t0 - idle_since, time.perf_counter()  # waits for weights, or to send
        message = None
        if pool.rank == 0:
            message = {
                "iteration": n,
                "generations": [g for r in range(replicas) for g in by_replica[r]],
                "busy": busy,
                "idle": idle,
            }
        if bridge.broadcast_object(message, root=1) is STOPPED:
            return False
        n += 1
    return True
