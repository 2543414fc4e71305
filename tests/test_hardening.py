"""Hardening: one-line errors from every script, every numeric flag checked before any model is
built, YAML typed like the command line, checkpoint manifests, and the crash edges (kill -9 during a
save, a killed writer process, SIGTERM mid-step, a full disk)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from opd_setup import ROOT, load_script, make_pair, read_metrics

from megatron_opd import compat
from megatron_opd.runtime import cli, errors, integrity, metrics_logger
from megatron_opd.runtime.distributed import standalone_env
from megatron_opd.runtime.procs import children, cmdline, marked
from megatron_opd.runtime.spawn import free_port
from megatron_opd.training import arguments, resume

PY = sys.executable


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The run failed with ``code`` and exactly one line on stderr, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, lines
    return lines[0]


def _env(**extra: str) -> dict:
    # no PYTHONWARNINGS here: the scripts must be quiet on their own
    env = {k: v for k, v in standalone_env().items() if k != "PYTHONWARNINGS"}
    return dict(env, OMP_NUM_THREADS="1", **extra)


# ---------------------------------------------------------------------------------------------
# --config YAML goes through the same types, choices and actions as the command line


def test_yaml_is_typed_like_the_command_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        'bf16: "false"\nuse-distributed-optimizer: "no"\nopd-mask-terminal-stop: "false"\n'
        "train-iters: '7'\nlr: 1e-6\nopd-reward: boxcox\neval-data: [a.jsonl, b.jsonl]\n"
        "exit-signal-handler: true\n"
    )
    a = arguments.parse_args(["--config", str(cfg)])
    assert a.bf16 is False and a.use_distributed_optimizer is False
    assert a.opd_mask_terminal_stop is False and a.exit_signal_handler is True
    assert a.train_iters == 7 and isinstance(a.train_iters, int)
    assert a.lr == 1e-6 and isinstance(a.lr, float)  # YAML 1.1 reads 1e-6 as a string
    assert a.opd_reward == "boxcox" and a.eval_data == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("train-iters: 2.5\n", "train-iters: invalid literal for int"),
        ("lr: [0.001]\n", "lr: expected one value, got list"),
        ("bf16: maybe\n", "bf16: expected true or false, got 'maybe'"),
        ("train-iters: true\n", "train-iters: expected a int, got True"),
        ("opd-reward: kl\n", "opd-reward: invalid choice 'kl'"),
        ("seed: ~\n", "seed: needs a value"),
        ("opd-alpah: 5\n", "unknown flag 'opd-alpah'"),
        ("lr: 1e-3\n  bad: [\n", "YAML syntax error at line"),
        ("- lr\n", "expected a mapping"),
    ],
)
def test_yaml_errors_name_the_file_and_key(tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(errors.UserError, match=f"--config {cfg}: .*{message}".replace("[", r"\[")):
        arguments.parse_args(["--config", str(cfg)])


def test_missing_yaml_file(tmp_path):
    with pytest.raises(errors.UserError, match=f"--config {tmp_path}/none.yaml does not exist"):
        arguments.parse_args(["--config", str(tmp_path / "none.yaml")])


# ---------------------------------------------------------------------------------------------
# Numeric flags: finite and in range, before anything else


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--rollout-temperature", "nan"], "--rollout-temperature must be a finite number"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--lr", "1e39"], r"--lr must be in \[0, 1\], got 1e\+39"),  # inf in fp32
        (["--opd-alpha", "nan"], "--opd-alpha must be a finite number"),
        (["--adam-beta1", "2"], r"--adam-beta1 must be in \[0, 1\), got 2"),
        (["--adam-eps", "0"], "--adam-eps must be > 0, got 0"),
        (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
        (["--opd-max-consecutive-skips", "0"], "--opd-max-consecutive-skips must be >= 1"),
        (["--save-interval", "0", "--save", "x"], "--save-interval must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be in"),
        (["--rollout-top-k", "-1"], "--rollout-top-k must be >= 0"),
        (["--prompt-data", "builtin:abc"], "--prompt-data builtin:abc: N in builtin:N must be"),
        (["--prompt-data", "builtin:0"], "--prompt-data builtin:0: N in builtin:N must be"),
    ],
)
def test_numeric_flags_are_checked(tmp_path, extra, message):
    (tmp_path / "s").mkdir()
    flags = ["--load", str(tmp_path / "s"), "--opd-teacher-load", str(tmp_path / "s")]
    with pytest.raises(errors.UserError, match=message):
        arguments.validate_args(arguments.parse_args(flags + extra), 1)


# ---------------------------------------------------------------------------------------------
# Every script: a bad flag is one line on stderr, exit code 2; --debug gives the traceback


SCRIPT_ERRORS = [
    ("pretrain_opd.py", ["--lr", "nan"], "--lr must be a finite number"),
    ("evaluate.py", ["--load", "{tmp}/none", "--data", "builtin:4", "--output", "{tmp}/o"],
     "checkpoint {tmp}/none does not exist"),
    ("convert_hf_to_megatron.py", ["--hf-dir", "{tmp}/none", "--save", "{tmp}/o"], "{tmp}/none"),
    ("convert_megatron_to_hf.py", ["--load", "{tmp}/none", "--save", "{tmp}/o"],
     "checkpoint {tmp}/none does not exist"),
    ("make_student.py", ["--load", "{tmp}/none", "--save", "{tmp}/o", "--num-layers", "1"],
     "checkpoint {tmp}/none does not exist"),
    ("pretrain_opd.py", ["--train-iters", "x"], "argument --train-iters: invalid int value"),
]  # fmt: skip


def test_every_script_prints_one_line_for_a_bad_flag(tmp_path):
    def start(script, flags, env):
        flags = [f.format(tmp=tmp_path) for f in flags]
        cmd = [PY, str(ROOT / "scripts" / script), *flags]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    # all at once: each is mostly the interpreter importing torch
    procs = [start(s, f, _env()) for s, f, _ in SCRIPT_ERRORS]
    debug = start(SCRIPT_ERRORS[3][0], SCRIPT_ERRORS[3][1], _env(MEGATRON_OPD_DEBUG="1"))
    for (script, _, expected), proc in zip(SCRIPT_ERRORS, procs, strict=True):
        out, err = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())
        line = _one_line_error(done)
        assert line.startswith(f"{script}: error: "), line
        assert expected.format(tmp=tmp_path) in line, line
    _, err = debug.communicate(timeout=300)
    assert debug.returncode == 1 and b"Traceback" in err  # asked for: the traceback


# ---------------------------------------------------------------------------------------------
# Crash leftovers: metrics rows past the resume point, stale temporaries


def test_metrics_rows_past_the_resume_point_are_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # torn row
    logger = metrics_logger.MetricsLogger(metrics_file=str(path), enabled=True, start_step=2)
    logger.log(3, {"loss": 30.0}, console=False)
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_non_finite_weights_are_never_saved():
    import torch

    from megatron_opd.runtime import checkpointing

    layer = torch.nn.Linear(3, 3)
    assert checkpointing.weights_are_finite([layer])
    with torch.no_grad():
        layer.weight[1, 2] = float("inf")
    assert not checkpointing.weights_are_finite([layer])  # Trainer.save refuses on this


def test_stale_temporaries_are_removed_or_put_back(tmp_path):
    (tmp_path / "iter_0000003.tmp").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt.tmp").write_text("3")
    (tmp_path / "iter_0000002.old").mkdir()  # killed between its two renames: the only copy
    (tmp_path / "iter_0000001").mkdir()
    (tmp_path / "iter_0000001.old").mkdir()  # killed after the second rename
    resume.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002"]


# ---------------------------------------------------------------------------------------------
# With real checkpoints: bad input and damaged checkpoints stop before any model is built


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("harden"))


def _flags(pair, *extra: str) -> list[str]:
    return [
        "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
        "--opd-alpha", "0.5", "--global-batch-size", "4", "--micro-batch-size", "2",
        "--lr", "1e-3", "--lr-warmup-fraction", "0", "--rollout-max-new-tokens", "12",
        "--max-prompt-length", "160", "--prompt-data", "builtin:64", "--seed", "7", *extra,
    ]  # fmt: skip


def _refused(pair, monkeypatch, capsys, *extra) -> str:
    """Run pretrain_opd's main in-process; it must exit 2 before building a model."""
    module = load_script("pretrain_opd")

    def built(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(module.launch, "build_trainer", built)
    monkeypatch.setattr(module.launch, "initialize", built)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exc:
        try:
            module.main(_flags(pair, *extra))
        except Exception as error:  # as cli.run would (which also ends the process)
            cli.exit_with(error, "pretrain_opd.py")
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_input_stops_before_any_model(pair, tmp_path, monkeypatch, capsys):
    def err(*extra):
        return _refused(pair, monkeypatch, capsys, *extra)

    save = tmp_path / "run"
    for extra, message in [
        (["--rollout-temperature", "nan"], "--rollout-temperature must be a finite number"),
        (["--lr", "inf", "--save-interval", "1"], "--lr must be a finite number, got inf"),
        (["--adam-beta1", "2"], "--adam-beta1 must be in [0, 1), got 2"),
        (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
        (["--opd-max-consecutive-skips", "0"], "--opd-max-consecutive-skips must be >= 1"),
        (["--prompt-data", "builtin:abc"], "--prompt-data builtin:abc"),
        (["--prompt-data", "builtin:0"], "--prompt-data builtin:0"),
    ]:
        assert message in err(*extra, "--save", str(save)), extra
        assert not save.exists(), extra  # nothing written
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert f"--prompt-data {empty} holds no prompts" in err("--prompt-data", str(empty))
    regular = tmp_path / "file"
    regular.write_text("x")
    assert f"--save {regular} is not a directory" in err("--save", str(regular))


def _damage(src: Path, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.distcp"))[0]
    if how == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
        return shard.name
    if how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
        return shard.name
    if how == "empty":  # a file every Megatron-Core version writes (0.19 writes no common.pt)
        (dst / "metadata.json").write_bytes(b"")
        return "metadata.json"
    (dst / ".metadata").unlink()
    return ".metadata"


def test_damaged_checkpoint_is_refused_with_the_file(pair, tmp_path, monkeypatch, capsys):
    assert (pair["teacher"] / integrity.MANIFEST_FILE).exists()  # the converter wrote one
    for how in ("flip", "truncate", "empty", "delete"):
        bad = tmp_path / how
        name = _damage(pair["teacher"], bad, how)
        line = _refused(pair, monkeypatch, capsys, "--opd-teacher-load", str(bad))
        assert f"--opd-teacher-load: {bad}: {name}" in line, line
        assert "damaged" in line
    # a checkpoint from before manifests: the presence checks still name the file
    old = tmp_path / "old"
    name = _damage(pair["teacher"], old, "empty")
    (old / integrity.MANIFEST_FILE).unlink()
    assert f"{name} is empty" in _refused(pair, monkeypatch, capsys, "--opd-teacher-load", str(old))


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def _in_mount_namespace(mount: str, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """``cmd`` in a private mount namespace after ``mount`` (a tmpfs of our choosing)."""
    script = f"{mount} && exec " + " ".join(f"'{c}'" for c in cmd)
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], **kw)


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces)")
def test_read_only_save_is_refused_before_any_model(pair, tmp_path):
    save = tmp_path / "ro"
    save.mkdir()
    proc = _in_mount_namespace(
        f"mount -t tmpfs -o ro,size=1m tmpfs {save}",
        [PY, str(ROOT / "scripts/pretrain_opd.py"), *_flags(pair, "--save", str(save))],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    line = _one_line_error(proc)
    assert f"--save {save} is not writable: Read-only file system" in line


def test_output_paths_are_refused_before_any_model(pair, tmp_path, monkeypatch, capsys):
    """A directory where a file is wanted, a file where a directory is wanted, a file in the
    way of a parent: one line naming the flag, exit 2, before any model is built."""
    afile, adir = tmp_path / "file", tmp_path / "dir"
    afile.write_text("x")
    adir.mkdir()
    for extra, message in [
        (["--metrics-file", str(adir)], f"--metrics-file {adir} is a directory; it must name a"),
        (
            ["--metrics-file", f"{afile}/m.jsonl"],
            f"--metrics-file {afile}/m.jsonl: {afile} is not a",
        ),
        (["--tensorboard-dir", str(afile)], f"--tensorboard-dir {afile} is not a directory"),
        (["--tensorboard-dir", f"{afile}/tb/x"], f"--tensorboard-dir {afile}/tb/x: {afile} is not"),
        (["--opd-dump-tokens", str(afile)], f"--opd-dump-tokens {afile} is not a directory"),
        (["--wandb-save-dir", str(afile)], f"--wandb-save-dir {afile} is not a directory"),
    ]:
        line = _refused(pair, monkeypatch, capsys, *extra)
        assert line.startswith("pretrain_opd.py: error: ") and message in line, (extra, line)
    assert afile.read_text() == "x" and list(adir.iterdir()) == []  # nothing written

    evaluate = load_script("evaluate")

    def built(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr("megatron_opd.runtime.distributed.initialize", built)
    base = ["--load", str(pair["student"]), "--data", "builtin:4", "--output", str(tmp_path / "o")]
    for extra, message in [
        (["--output", str(afile)], f"--output {afile} is not a directory"),
        (["--output", f"{afile}/eval"], f"--output {afile}/eval: {afile} is not a directory"),
        (["--metrics-file", str(adir)], f"--metrics-file {adir} is a directory"),
        (["--tensorboard-dir", str(afile)], f"--tensorboard-dir {afile} is not a directory"),
    ]:
        with pytest.raises(SystemExit) as exc:
            try:
                evaluate.main(base + extra)
            except Exception as error:
                cli.exit_with(error, "evaluate.py")
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (extra, lines)


UNWRITABLE = """
import sys
from megatron_opd.runtime import errors, outputs
ro = sys.argv[1]
for check, flag, path in [
    (outputs.check_output_file, "--metrics-file", f"{ro}/m.jsonl"),
    (outputs.check_output_file, "--metrics-file", f"{ro}/sub/m.jsonl"),
    (outputs.check_output_dir, "--tensorboard-dir", f"{ro}/tb"),
    (outputs.check_output_dir, "--opd-dump-tokens", ro),
    (outputs.check_output_dir, "--output", f"{ro}/eval/x"),
]:
    try:
        check(flag, path)
        print("accepted", flag, path)
    except errors.UserError as e:
        print(e)
"""


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces)")
def test_unwritable_output_parents_are_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _in_mount_namespace(
        f"mount -t tmpfs -o ro,size=1m tmpfs {ro}", [PY, "-c", UNWRITABLE, str(ro)],
        capture_output=True, text=True, env=dict(_env(), PYTHONPATH=str(ROOT)), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"--metrics-file {ro}/m.jsonl is not writable: Read-only file system",
        f"--metrics-file {ro}/sub/m.jsonl is not writable: Read-only file system",
        f"--tensorboard-dir {ro}/tb is not writable: Read-only file system",
        f"--opd-dump-tokens {ro} is not writable: Read-only file system",
        f"--output {ro}/eval/x is not writable: Read-only file system",
    ]


# ---------------------------------------------------------------------------------------------
# Crash edges under torchrun (slow): kill -9 during a save, a killed writer, SIGTERM, full disk


def _torchrun_cmd(nproc: int, flags: list[str]) -> list[str]:
    return [
        PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", str(ROOT / "scripts/pretrain_opd.py"), *flags,
    ]  # fmt: skip


@pytest.mark.slow
def test_kill9_during_a_save_leaves_nothing_behind(pair, tmp_path):
    """kill -9 of the rank while it writes a checkpoint: no process of the run survives; on
    resume the half-written temporary is gone and the metrics file holds each iteration once;
    resuming with other flags is refused up front; the log holds no tqdm bar and no warning."""
    save, metrics = tmp_path / "run", tmp_path / "m.jsonl"
    mark = f"OPD_TEST_{uuid.uuid4().hex}"
    flags = _flags(pair, "--train-iters", "6", "--save", str(save), "--save-interval", "1",
                   "--metrics-file", str(metrics))  # fmt: skip
    proc = subprocess.Popen(
        _torchrun_cmd(1, flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=_env(**{mark: "1"}),
    )  # fmt: skip
    killed_at = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if list(save.glob("iter_000000[3-9].tmp")):
                ranks = [p for p in children(proc.pid) if b"pretrain_opd.py" in cmdline(p)]
                if ranks:
                    os.kill(ranks[0], signal.SIGKILL)
                    killed_at = time.time()
                    break
            time.sleep(0.01)
        assert killed_at is not None, "never saw a save in progress"
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    deadline = time.time() + 20
    while marked(mark) and time.time() < deadline:
        time.sleep(0.5)
    assert marked(mark) == [], "processes of the killed run are still alive"
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert list(save.glob("*.tmp"))  # the kill left a temporary behind

    env = _env()
    for extra, message in [
        (["--train-iters", str(latest - 1)], f"--train-iters {latest - 1} is below iteration"),
        (["--seed", "8"], "--seed 8 differs from the checkpoint's (7)"),
        (["--prompt-data", "builtin:63"], "--prompt-data builtin:63 (63 prompts) differs"),
    ]:
        bad = subprocess.run(
            [PY, str(ROOT / "scripts/pretrain_opd.py"), *flags, *extra],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert message in _one_line_error(bad), extra

    out = subprocess.run(_torchrun_cmd(1, flags), capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r["step"] for r in read_metrics(metrics)] == [1, 2, 3, 4, 5, 6]
    assert not list(save.glob("*.tmp")) and not list(save.glob("*.old"))
    log = out.stdout + out.stderr
    assert "static requests" not in log and "it/s]" not in log
    assert "Transformer Engine and Apex" not in log and "Warning" not in log, log[-3000:]


WRITER = """
import sys
from megatron_opd.runtime import cli, errors
cli.quiet()
import torch
from megatron_opd.runtime import checkpointing, distributed
from megatron.core.dist_checkpointing import ShardedTensor
distributed.initialize()
state = {"w": ShardedTensor.from_rank_offsets("w", torch.randn(64, 1 << 20))}  # 256 MiB
def main():
    try:
        checkpointing.atomic_save(state, sys.argv[1])
    finally:
        if not errors.failed_alone():
            distributed.teardown()
cli.run(main, "writer")
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not compat.writers.writers_are_processes(),
    reason="this Megatron-Core writes checkpoints from threads of the rank: no writer process",
)
def test_a_killed_writer_process_is_an_error_not_a_hang(tmp_path):
    """kill -9 of the forked dist-checkpoint writer (what the OOM killer does): one line and an
    exit code within 30 s, no checkpoint under the final name, no temporary left."""
    target = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [PY, "-c", WRITER, str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(_env(), PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    killed = None
    try:
        deadline = time.time() + 240
        shards = target.with_name("ckpt.tmp")
        while killed is None and time.time() < deadline and proc.poll() is None:
            if not shards.exists():  # the save has begun: forks from now on are its writers
                time.sleep(0.005)
                continue
            own = cmdline(proc.pid)
            for child in children(proc.pid):
                if cmdline(child) == own:  # forked writers: the parent's command line
                    os.kill(child, signal.SIGKILL)
                    killed = time.time()
            time.sleep(0.005)
        assert killed is not None, "never saw the writer process"
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    elapsed = time.time() - killed
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    line = _one_line_error(result, errors.RUN_ERROR_EXIT)
    assert "checkpoint writer process" in line and "died" in line and str(target) in line, line
    assert elapsed < 30, elapsed
    assert not target.exists() and not target.with_name("ckpt.tmp").exists()


@pytest.mark.slow
def test_sigterm_mid_step_saves_the_pre_step_state(pair, tmp_path):
    """SIGTERM to torchrun during a step: the step is abandoned between its stages, the pre-step
    state is saved, and the run exits well inside torchrun's 30 s shutdown window."""
    save, metrics = tmp_path / "run", tmp_path / "m.jsonl"
    flags = _flags(pair, "--train-iters", "1000", "--save", str(save), "--metrics-file",
                   str(metrics), "--exit-signal-handler", "--rollout-max-new-tokens", "300",
                   "--opd-mask-terminal-stop")  # fmt: skip
    proc = subprocess.Popen(
        _torchrun_cmd(1, flags), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(),
        text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None and time.time() < deadline, "no step logged"
            time.sleep(0.01)
        sent = time.time()  # the next step's rollout (most of a step) has just begun
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        took = time.time() - sent
    finally:
        proc.kill()
    steps = read_metrics(metrics)
    last = steps[-1]["step"]
    assert f"exit signal: saved iteration {last}" in out, out[-3000:]
    if "abandoned" in out:  # the usual case; a signal that lands in the update finishes the step
        assert f"(iteration {last + 1} abandoned mid-step)" in out
    print("abandoned mid-step" in out, f"{took:.1f} s from SIGTERM to exit")
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == last
    assert took < 15, took


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces)")
def test_full_disk_is_one_line_and_no_temporary(pair, tmp_path):
    save = tmp_path / "small"
    save.mkdir()
    proc = _in_mount_namespace(
        f"mount -t tmpfs -o size=256k tmpfs {save}",
        [PY, str(ROOT / "scripts/pretrain_opd.py"),
         *_flags(pair, "--train-iters", "1", "--save", str(save)), "--global-batch-size", "2"],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    line = _one_line_error(proc, errors.RUN_ERROR_EXIT)
    assert f"no space left on device writing {save}/iter_0000001" in line, line
    assert proc.stdout.count("iter ") == 1  # the step ran, the save failed


@pytest.mark.slow
def test_non_finite_stop_is_one_line(pair, tmp_path):
    """A teacher with NaN weights: every step is skipped; the run stops with one line and its own
    exit code, and without --save says so (not "saved to None")."""
    from opd_setup import make_nan_teacher

    make_nan_teacher(pair, tmp_path / "nan_teacher")
    proc = subprocess.run(
        [PY, str(ROOT / "scripts/pretrain_opd.py"),
         *_flags(pair, "--opd-teacher-load", str(tmp_path / "nan_teacher"), "--train-iters", "5",
                 "--opd-max-consecutive-skips", "2")],
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    line = _one_line_error(proc, errors.NON_FINITE_EXIT)
    assert "2 steps in a row had non-finite" in line and "No --save" in line, line
