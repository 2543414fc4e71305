"""On-policy distillation with PowerOPD rewards on Megatron-Core.

    torchrun --nproc-per-node 8 scripts/pretrain_opd.py \\
        --load ckpt/qwen3-0.6b-base --opd-teacher-load ckpt/qwen3-4b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --opd-alpha 0.5 --prompt-data data/deepscaler_math.json --save runs/opd

Each step: the student samples one response per prompt with its own weights (no copy, no sync);
the frozen teacher scores the sampled tokens in a forward-only pipeline pass; the reward
r = pi_T^alpha - pi_S^alpha (or a baseline, ``--opd-reward``) is held constant and the loss
-sum(r * log pi_S) / N over the step's response tokens is minimized with one optimizer step.
Student and teacher are Megatron GPTModels, each read from its own checkpoint directory (written
by ``scripts/convert_hf_to_megatron.py`` or by this script), by default on the same TP x PP grid;
``--opd-teacher-tensor-model-parallel-size`` / ``--opd-teacher-pipeline-model-parallel-size`` give
the teacher its own layout on the same ranks, and ``--opd-teacher-load A B`` several teachers, each
prompt routed by its ``teacher`` field.

Resuming: ``--save`` holding a checkpoint resumes from it (requeued jobs pass the same flags);
otherwise ``--load`` is a converted checkpoint (weights only) or a run to continue (add
``--finetune`` to take only its weights).

The setup (checks, models, optimizer, teacher) is ``megatron_opd.launch``; the loop is
``megatron_opd.trainer``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_opd import cli  # noqa: E402

cli.quiet()  # before Megatron is imported: its import-time warnings are filtered here
from megatron_opd import arguments, distributed, failures, launch  # noqa: E402


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
        from megatron_opd import remote

        remote.serve(args, inputs, pool)
    else:
        launch.build_trainer(args, inputs, pool).run()
    distributed.teardown()  # on success only: a failure ends the process in cli.run


if __name__ == "__main__":
    cli.run(main, "pretrain_opd.py")
