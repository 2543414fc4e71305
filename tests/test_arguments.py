"""pretrain_opd flags: YAML config + command-line override, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from megatron_opd.training import arguments, config


@pytest.fixture
def ckpts(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "teacher").mkdir()
    return ["--load", str(tmp_path / "student"), "--opd-teacher-load", str(tmp_path / "teacher")]


def test_defaults_follow_the_paper():
    a = arguments.parse_args([])
    assert (a.lr, a.lr_decay_style, a.lr_warmup_fraction) == (5e-7, "constant", 0.05)
    assert (a.global_batch_size, a.train_iters) == (32, 1500)
    assert (a.rollout_temperature, a.rollout_samples_per_prompt) == (1.0, 1)
    assert a.rollout_max_new_tokens == 1024 and a.opd_mask_terminal_stop
    assert (a.eval_samples, a.eval_temperature, a.eval_max_new_tokens) == (8, 0.6, 4096)


def test_config_file_then_command_line_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "opd-alpha: 50\nopd_reward: boxcox\ntensor-model-parallel-size: 2\n"
        "opd-mask-terminal-stop: false\nlr: 1.0e-6\n"
    )
    a = arguments.parse_args(["--config", str(cfg), "--opd-alpha", "0.5"])
    assert a.opd_alpha == 0.5  # command line wins
    assert a.opd_reward == "boxcox" and a.tensor_model_parallel_size == 2
    assert a.opd_mask_terminal_stop is False and a.lr == 1e-6


def test_config_unknown_key(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("opd-alpah: 5\n")
    with pytest.raises(ValueError, match="unknown flag 'opd-alpah'"):
        arguments.parse_args(["--config", str(cfg)])


@pytest.mark.parametrize(
    "extra,world,message",
    [
        (["--opd-alpha", "0"], 1, "--opd-alpha must be > 0, got 0"),
        (["--opd-alpha", "-1"], 1, "--opd-alpha must be > 0, got -1"),
        (["--opd-clip-min", "2"], 1, r"--opd-clip-min \(2\) must be < --opd-clip-max \(1\)"),
        (["--opd-tanh-temperature", "0"], 1, "--opd-tanh-temperature must be > 0"),
        (["--opd-tropd-alpha", "1.5"], 1, r"--opd-tropd-alpha must be in \(0, 1\], got 1.5"),
        (["--opd-tropd-alpha", "0"], 1, r"--opd-tropd-alpha must be in \(0, 1\], got 0"),
        (
            ["--global-batch-size", "6", "--micro-batch-size", "4"],
            1,
            "--global-batch-size 6 is not divisible by --micro-batch-size 4 x data-parallel size 1",
        ),
        (
            ["--global-batch-size", "6", "--tensor-model-parallel-size", "2"],
            8,
            "--global-batch-size 6 is not divisible by --micro-batch-size 1 x data-parallel size 4",
        ),
        (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible"),
        (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs --pipeline-model-parallel"),
        (["--rollout-top-p", "0"], 1, "--rollout-top-p must be in"),
    ],
)
def test_bad_input_names_the_flag(ckpts, extra, world, message):
    with pytest.raises(ValueError, match=message):
        arguments.validate_args(arguments.parse_args(ckpts + extra), world)


def test_missing_checkpoints(tmp_path, ckpts):
    with pytest.raises(ValueError, match="--load .*nope does not exist"):
        arguments.validate_args(arguments.parse_args(ckpts + ["--load", str(tmp_path / "nope")]), 1)
    with pytest.raises(ValueError, match="--opd-teacher-load .*gone does not exist"):
        arguments.validate_args(
            arguments.parse_args(ckpts + ["--opd-teacher-load", str(tmp_path / "gone")]), 1
        )
    with pytest.raises(ValueError, match="--opd-teacher-load .* is required"):
        arguments.validate_args(arguments.parse_args(["--load", str(tmp_path)]), 1)


def test_unknown_reward_kind_is_one_line(capsys):
    with pytest.raises(SystemExit):
        arguments.parse_args(["--opd-reward", "kl"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --opd-reward: invalid choice: 'kl'" in err


def test_valid_arguments_pass(ckpts):
    arguments.validate_args(arguments.parse_args(ckpts + ["--global-batch-size", "8"]), 2)


def test_trainer_config_carries_every_flag_the_loop_reads():
    a = arguments.parse_args([
        "--train-iters", "7", "--seed", "11", "--prompt-data", "builtin:9",
        "--global-batch-size", "12", "--rollout-samples-per-prompt", "3",
        "--micro-batch-size", "2", "--max-tokens-per-micro-batch", "512",
        "--no-opd-mask-terminal-stop", "--rollout-top-p", "1", "--rollout-top-k", "4",
        "--opd-reward", "tanh", "--opd-alpha", "0.3",
        "--load", "l", "--save", "s", "--save-interval", "5", "--bf16",
        "--log-interval", "4", "--metrics-file", "m.jsonl", "--tensorboard-dir", "tb",
        "--opd-dump-tokens", "d", "--eval-interval", "6", "--eval-data", "builtin:4",
        "--eval-at-start", "--no-eval-gap", "--eval-teacher", "t", "--eval-samples", "2",
        "--eval-temperature", "0.7", "--eval-limit", "3", "--max-prompt-length", "99",
        "--exit-signal-handler", "--exit-signal", "SIGUSR1", "--exit-interval", "8",
        "--opd-max-consecutive-skips", "5",
    ])  # fmt: skip
    c = arguments.trainer_config(a)
    assert (c.train_iters, c.seed, c.prompt_data) == (7, 11, "builtin:9")
    assert c.batch == config.BatchConfig(12, 3, 2, 512, mask_terminal_stop=False)
    assert (c.rollout.top_p, c.rollout.top_k) == (0.0, 4)  # top-p 1: no filter
    assert (c.reward.kind, c.reward.alpha) == ("tanh", 0.3)
    assert c.checkpoint == config.CheckpointConfig("s", 5, "l", params_dtype="bfloat16")
    log = c.log
    assert (log.interval, log.metrics_file, log.tensorboard_dir, log.dump_tokens) == (
        4, "m.jsonl", "tb", "d"
    )  # fmt: skip
    assert log.flags == vars(a)  # every flag, recorded as the wandb run's config
    e = c.eval
    assert (e.interval, e.data, e.at_start, e.gap) == (6, ["builtin:4"], True, False)
    assert e.gap_teacher == "t"
    s = e.sampling
    assert (s.samples, s.temperature, s.limit, s.max_prompt_length, s.seed) == (2, 0.7, 3, 99, 11)
    assert c.stop == config.StopConfig("SIGUSR1", 8, 5)
    # without --exit-signal-handler no signal is caught, whatever --exit-signal says
    quiet = arguments.trainer_config(arguments.parse_args(["--exit-signal", "SIGUSR1"]))
    assert quiet.stop.exit_signal is None
