"""On-policy distillation with PowerOPD rewards on Megatron-Core.

    torchrun --nproc-per-node 8 scripts/pretrain_opd.py \\
        --load ckpt/qwen3-0.6b-base --opd-teacher-load ckpt/qwen3-4b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --opd-alpha 0.5 --prompt-data data/deepscaler_math.json --save runs/opd

Each step (``megatron_opd.training.trainer``; the stages are ``megatron_opd.training.opd``):

1. rollout: the step's prompts come from the resumable prompt stream, and the student samples
   ``--rollout-samples-per-prompt`` responses per prompt through the engine ``--rollout-engine``
   names (``auto``: the graph engine, one captured CUDA-graph decode step, on a GPU where it
   supports the model; Megatron-Core's static engine otherwise), from one of three sources
   (``megatron_opd.rollout.sources``):
   * in place, the default: the student's own training weights (no copy, no weight sync);
   * a frozen copy of the student on its own TP x PP layout on the same ranks
     (``--rollout-*-model-parallel-size``), refitted from the training weights before the rollout;
   * rollout ranks of their own (``--rollout-ranks N``): the last N ranks hold only such a copy and
     generate; the training ranks send them the new weights after each optimizer step, and at
     ``--rollout-lag 1`` they sample step k+1's batch while the training ranks train step k.
2. teacher scoring: each frozen teacher scores the sampled tokens of the prompts routed to it in a
   forward-only pipeline pass, on the student's grid or its own; only the sampled tokens'
   log-probs leave it (``full_vocab_kl``: its vocab-sharded logits).
3. reward and loss: r = pi_T^alpha - pi_S^alpha (or another kind, ``--opd-reward``), pi_S from the
   training forward, held constant; the loss -sum(r * log pi_S) / N over the step's response
   tokens (``full_vocab_kl``: the exact reverse KL), through Megatron's forward/backward schedule.
4. optimizer step: Megatron DDP and optimizer, LR schedule, clipping; a step whose rewards or
   gradients are not finite is skipped, and too many in a row stop the run.
5. log: console, tensorboard, wandb, ``--metrics-file``; every ``--eval-interval`` steps Avg@k
   and the held-out distillation gap.
6. checkpoint: every ``--save-interval`` steps, at the end and on ``--exit-signal-handler``'s
   signal, an atomic dist checkpoint of the model, the optimizer, the prompt-stream position and,
   at lag 1, the batch in flight.

Student and teacher are Megatron GPTModels, each read from its own checkpoint directory (written
by ``scripts/convert_hf_to_megatron.py`` or by this script), by default on the same TP x PP grid;
``--opd-teacher-tensor-model-parallel-size`` / ``--opd-teacher-pipeline-model-parallel-size`` give
the teacher its own layout on the same ranks, and ``--opd-teacher-load A B`` several teachers, each
prompt routed by its ``teacher`` field.

Resuming: ``--save`` holding a checkpoint resumes from it (requeued jobs pass the same flags);
otherwise ``--load`` is a converted checkpoint (weights only) or a run to continue (add
``--finetune`` to take only its weights).

The setup (checks, models, optimizer, teachers, rollout source) is
``megatron_opd.training.launch``; the loop is ``megatron_opd.training.trainer``; a rollout rank
runs ``megatron_opd.rollout.remote.serve`` instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_opd.runtime import cli  # noqa: E402

cli.quiet()  # before Megatron is imported: its import-time warnings are filtered here
from megatron_opd.rollout import remote  # noqa: E402
from megatron_opd.runtime import distributed, failures  # noqa: E402
from megatron_opd.training import arguments, launch  # noqa: E402


def main(argv=None) -> None:
    args = arguments.parse_args(argv)
    failures.keep_in(args.save)  # a rank's own error, when another rank prints the job's line
    _, _, world = distributed.env_rank_and_world()
    try:
        inputs = launch.check_inputs(args, world)
    except (ValueError, FileNotFoundError) as e:
        cli.exit_with(e, "pretrain_opd.py")

    pool = launch.initialize(args)
    if pool.is_rollout:  # --rollout-ranks: this rank only samples
        remote.serve(launch.serve_config(args, inputs), inputs.prompts, inputs.tokenizer, pool)
    else:
        launch.build_trainer(args, inputs, pool).run()
    distributed.teardown()  # on success only: a failure ends the process in cli.run


if __name__ == "__main__":
    cli.run(main, "pretrain_opd.py")
