"""The OPD training loop: rollout -> teacher scoring -> reward and loss -> optimizer step -> log ->
checkpoint, one call per arrow (``megatron_opd.training.opd`` owns the stages)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_opd import compat
from megatron_opd.evaluation import accuracy, gap
from megatron_opd.models.tokenizer import CHECKPOINT_TOKENIZER_DIR
from megatron_opd.rollout import sources
from megatron_opd.runtime import checkpointing, errors, failures
from megatron_opd.runtime.distributed import ModelGrid, print_rank0
from megatron_opd.runtime.metrics_logger import MetricsLogger
from megatron_opd.training import data, opd, resume
from megatron_opd.training.config import TrainerConfig
from megatron_opd.training.teacher import per_teacher_metrics


class NonFiniteError(errors.RunStopped):
    pass


def _sync() -> None:
    if compat.has_cuda():
        torch.cuda.synchronize()


class Trainer:
    def __init__(
        self, config: TrainerConfig, inputs, grid: ModelGrid, student, optimizer, scheduler,
        teacher, source=None,
    ):  # fmt: skip
        """``inputs``: what :func:`megatron_opd.training.launch.check_inputs` resolved;
        ``grid``: the student's (``student`` is its chunks on it)."""
        self.config, self.inputs, self.grid = config, inputs, grid
        self.student, self.optimizer, self.scheduler, self.teacher = (
            student,
            optimizer,
            scheduler,
            teacher,
        )
        self.tokenizer = inputs.tokenizer
        self.prompts = inputs.prompts
        self.vocab_size = inputs.student_arch.vocab_size
        self.reward_cfg = config.reward
        self.dp_rank, self.dp_size, self.dp_group = grid.dp_rank, grid.dp_size, grid.dp
        # where rollouts come from (megatron_opd.rollout.sources): the student in place by default
        self.rollouts = source or sources.InPlace(student, self.dp_rank)
        self.stream = data.PromptStream(len(self.prompts), seed=config.seed)
        self.in_flight = None  # a batch in flight saved with the checkpoint (--rollout-lag 1)
        self.iteration = 0
        self.saved_iteration = None  # the iteration the latest checkpoint of this run holds
        self.skipped_total = 0
        self.consecutive_skips = 0
        if inputs.resume_root is not None:
            self.iteration, extra = checkpointing.load_training_checkpoint(
                inputs.resume_root, student, optimizer, scheduler
            )
            self.stream.load_state_dict(extra["data"])
            save = config.checkpoint.save
            if save and Path(save) == Path(inputs.resume_root):
                self.saved_iteration = self.iteration  # already on disk under --save
            self.skipped_total = extra.get("skipped_total", 0)
            self.consecutive_skips = extra.get("consecutive_skips", 0)
            self.in_flight = extra.get("rollout_in_flight")
        is_last_rank = not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1
        log = config.log
        self.logger = MetricsLogger(
            **log.sinks(),
            config=log.flags,
            enabled=is_last_rank,
            # a resumed run redoes the steps after its checkpoint, and a run under --save that
            # has none yet (relaunched before its first save finished) redoes them all: their
            # old rows go
            start_step=(
                self.iteration if inputs.resume_root is not None or config.checkpoint.save else None
            ),
        )
        self.rollout_cfg = config.rollout
        evals = config.eval
        self.eval_benchmarks = None
        if evals.interval:
            self.eval_benchmarks = accuracy.load_benchmarks(evals.data, evals.sampling.limit)
        eval_teacher = None
        if evals.interval and evals.gap and evals.gap_teacher:
            eval_teacher = gap.load_eval_teacher(evals.gap_teacher, config.checkpoint.load, grid)
        self.gap_watch = gap.TrainingGapWatch(
            teacher, config.batch.micro_batch_size, config.reward.alpha, eval_teacher
        )
        # what a resume must agree with; the prompt digest hashes every prompt, so once per run
        self.run_identity = resume.run_identity(config.seed, config.prompt_data, self.prompts)

    # ------------------------------------------------------------------------------------------

    def step_prompts(self) -> list[list[int]]:
        """This DP rank's prompts (each repeated ``--rollout-samples-per-prompt`` times)."""
        batch = self.config.batch
        rows, routes = data.draw_step(
            self.prompts, self.stream, batch.global_batch_size, batch.samples_per_prompt
        )
        local = batch.global_batch_size // self.dp_size
        mine = slice(self.dp_rank * local, (self.dp_rank + 1) * local)
        self.step_routes = torch.tensor(routes[mine])  # the teacher of each local row
        return rows[mine]

    def train_one_step(self) -> dict[str, float]:
        cfg = self.config

        compat.reset_peak_memory()  # the step's own peak: evaluation between steps is not in it
        t0 = time.perf_counter()
        seed = sources.step_seed(cfg.seed, self.iteration)
        extra_times = self.rollouts.update_weights(self.iteration)  # the one weight sync
        batch = opd.rollout(
            self.rollouts, self.tokenizer, self.step_prompts(), self.rollout_cfg, seed
        )
        if self._exit_requested():
            return None  # abandoned before the weights changed
        items = opd.micro_batches(
            batch,
            cfg.batch.micro_batch_size,
            cfg.batch.mask_terminal_stop,
            self.tokenizer.pad_id,
            cfg.batch.max_tokens_per_micro_batch,
        )
        padding = opd.padding_fraction(batch, items)
        _sync()
        t1 = time.perf_counter()
        several = len(self.teacher) > 1
        teacher_out = self.teacher.score(
            batch,
            items,
            self.vocab_size,
            cfg.batch.micro_batch_size,
            routes=self.step_routes if several else None,
            keep_logits=self.reward_cfg.needs_teacher_logits,
        )
        _sync()
        if self._exit_requested():
            return None
        t2 = time.perf_counter()
        dump = [] if cfg.log.dump_tokens or several else None
        result = opd.train_step(
            self.student,
            self.optimizer,
            self.scheduler,
            items,
            teacher_out,
            self.reward_cfg,
            self.vocab_size,
            self.grid,
            dump,
        )
        if dump:
            dump = opd.dump_in_rollout_order(dump, items, batch)
            if cfg.log.dump_tokens:
                self._write_dump(dump, batch)
        _sync()
        t3 = time.perf_counter()
        times = {"time/rollout": t1 - t0, "time/teacher": t2 - t1, "time/train": t3 - t2}
        times.update(extra_times)  # time/refit: part of time/rollout
        times["time/step"] = t3 - t0
        metrics = self._metrics(batch, result, times, padding)
        metrics.update(self.rollouts.step_metrics(t3 - t0))  # rollout ranks: lag, busy, idle
        if several and dump:  # the last pipeline stage holds the per-token values
            metrics.update(
                per_teacher_metrics(
                    dump, self.step_routes, self.teacher.names, self.reward_cfg, self.dp_group
                )
            )
        return metrics

    def _metrics(self, batch: opd.RolloutBatch, result: opd.StepResult, times, padding) -> dict:
        lengths = batch.response_lengths.double()
        local = torch.tensor(
            [
                lengths.sum().item(),
                float(len(lengths)),
                float(batch.truncated.sum()),
                *map(float, padding),
            ],
            dtype=torch.float64,
            device=compat.default_device(),
        )
        longest = torch.tensor([lengths.max().item()], device=local.device)
        if self.dp_size > 1:
            dist.all_reduce(local, group=self.dp_group)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=self.dp_group)
        total, count, truncated, pad, positions = local.tolist()
        metrics: dict[str, Any] = {
            "grad_norm": result.grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "response/mean_len": total / count,
            "response/max_len": longest.item(),
            "response/truncated_frac": truncated / count,
            "tokens_per_sec": total / times["time/step"],
            "batch/padding_frac": pad / max(positions, 1.0),
            "memory/peak_gib": compat.peak_memory_bytes() / 2**30,
            "skipped_steps": float(self.skipped_total + (not (result.applied or result.empty))),
            **times,
        }
        for key, value in result.report.items():
            if key == "loss":
                metrics["loss"] = value
            elif key == "student_entropy":
                metrics["student/entropy"] = value
            elif key.startswith("abs_reward_pos_"):
                metrics["reward_by_position/" + key[len("abs_reward_pos_") :]] = value
            else:
                metrics["reward/" + key.removeprefix("reward_")] = value
        metrics["applied"] = float(result.applied or result.empty)
        return metrics

    def _write_dump(self, dump: list, batch: opd.RolloutBatch) -> None:
        if self.grid.tp_rank != 0:
            return
        out = Path(self.config.log.dump_tokens)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step{self.iteration + 1:07d}_dp{self.dp_rank}.pt"
        payload = {
            "micro_batches": dump,
            "tokens": batch.tokens,  # [B, S]: prompt + response, right-padded
            "teachers": self.step_routes,  # [B]: the teacher each row was scored by
            "response_lengths": batch.response_lengths,
            "truncated": batch.truncated,
        }
        torch.save(payload, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)

    # ------------------------------------------------------------------------------------------

    def save(self) -> None:
        ckpt = self.config.checkpoint
        if not ckpt.save or self.saved_iteration == self.iteration:
            return
        if not checkpointing.weights_are_finite(self.student):
            raise NonFiniteError(
                f"the weights after iteration {self.iteration} are not finite; not saved (the "
                f"latest checkpoint in {ckpt.save} is the last good state). Lower --lr."
            )
        meta = dict(self.inputs.student_meta)
        meta["run"] = self.run_identity
        meta["params_dtype"] = ckpt.params_dtype
        meta["iteration"] = self.iteration
        extra = {
            "data": self.stream.state_dict(),
            "skipped_total": self.skipped_total,
            "consecutive_skips": self.consecutive_skips,
            **self.rollouts.checkpoint_state(self.iteration),
        }
        tokenizer = self.tokenizer

        def add_tokenizer(tmp: Path) -> None:
            tokenizer.save(tmp / CHECKPOINT_TOKENIZER_DIR)

        checkpointing.save_training_checkpoint(
            ckpt.save,
            self.iteration,
            self.student,
            self.optimizer,
            self.scheduler,
            extra,
            meta,
            add_tokenizer,
        )
        self.saved_iteration = self.iteration

    def evaluate(self) -> dict[str, float]:
        cfg, gap_too = self.config.eval.sampling, self.config.eval.gap
        sampler = self.rollouts.eval_sampler(self.iteration)
        scores, records = accuracy.evaluate(
            sampler,
            self.tokenizer,
            self.eval_benchmarks,
            cfg,
            self.grid,
            progress=False,
            keep_token_ids=gap_too,
        )
        out = accuracy.metrics(scores, cfg.samples)
        if gap_too:
            out.update(
                self.gap_watch.evaluate(
                    self.student,
                    self.grid,
                    sampler,
                    self.tokenizer,
                    self.eval_benchmarks,
                    cfg,
                    self.vocab_size,
                    self.iteration,
                    records,
                )  # fmt: skip
            )
        return out

    def _install_signal_handler(self) -> None:
        self._signalled = False
        if self.config.stop.exit_signal is None:
            return

        def handler(signum, frame):
            self._signalled = True

        signal.signal(getattr(signal, self.config.stop.exit_signal), handler)

    def _exit_requested(self) -> bool:
        """True on every rank once any rank received the exit signal."""
        if self.config.stop.exit_signal is None:
            return False
        signalled = getattr(self, "_signalled", False)
        flag = torch.tensor([1.0 if signalled else 0.0], device=compat.default_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def run(self) -> None:
        cfg = self.config
        evals, save, stop = cfg.eval, cfg.checkpoint, cfg.stop
        self._install_signal_handler()
        try:
            self.rollouts.start(self.iteration, self.stream, self.in_flight)
            if evals.interval and evals.at_start and self.iteration == 0:
                self.logger.log(0, self.evaluate(), console=True)  # the starting point
            while self.iteration < cfg.train_iters:
                before = self.stream.state_dict()
                metrics = self.train_one_step()
                if metrics is None:  # exit signal mid-step: keep the pre-step state
                    self.stream.load_state_dict(before)
                    failures.exit_saving()
                    self.save()
                    print_rank0(
                        f"exit signal: saved iteration {self.iteration} (iteration "
                        f"{self.iteration + 1} abandoned mid-step), exiting"
                    )
                    return
                applied = metrics.pop("applied") == 1.0
                self.iteration += 1
                if applied:
                    self.consecutive_skips = 0
                else:
                    self.skipped_total += 1
                    self.consecutive_skips += 1
                if self.iteration % cfg.log.interval == 0 or not applied:
                    self.logger.log(self.iteration, metrics)
                self.gap_watch.step(self.iteration, metrics)
                if self.consecutive_skips >= stop.max_consecutive_skips:
                    self.save()  # the weights are the last good ones: skipped steps changed nothing
                    saved = f"Last good state saved to {save.save}" if save.save else "No --save"
                    raise NonFiniteError(
                        f"{self.consecutive_skips} steps in a row had non-finite rewards or "
                        f"gradients (at iteration {self.iteration}); stopped. {saved}. "
                        "Lower --lr or check the teacher checkpoint."
                    )
                if evals.interval and self.iteration % evals.interval == 0:
                    self.logger.log(self.iteration, self.evaluate(), console=True)
                if save.interval and self.iteration % save.interval == 0:
                    self.save()
                if stop.exit_interval and self.iteration % stop.exit_interval == 0:
                    return
                if self._exit_requested():
                    failures.exit_saving()
                    self.save()
                    print_rank0(f"exit signal: saved iteration {self.iteration}, exiting")
                    return
            self.save()
        finally:
            self.rollouts.close()
            self.logger.close()
