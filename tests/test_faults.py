"""Faults on one rank of several, under torchrun with 2 ranks: exactly one rank prints one line,
every rank exits with the documented code, no rank prints a traceback or waits forever.

Each rank's output is kept apart (torchrun ``--redirects 3 --log-dir``), so that torchrun's own
``ChildFailedError`` summary (expected) is not mistaken for a rank's traceback, and the exit code
of every rank is read from that summary. The failing rank and the layout (TP2, PP2, DP2) vary
from case to case."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from opd_setup import ROOT, load_script, make_pair, read_metrics

from megatron_opd import compat
from megatron_opd.runtime import errors, failures
from megatron_opd.runtime.distributed import standalone_env
from megatron_opd.runtime.procs import rank_pids, writer_pids
from megatron_opd.runtime.spawn import free_port

PY = sys.executable
LAYOUTS = {
    "TP2": ["--tensor-model-parallel-size", "2"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
    "DP2": [],
}


@dataclass
class Job:
    returncode: int
    console: str  # torchrun's own stdout + stderr
    out: dict  # rank -> its stdout
    err: dict  # rank -> its stderr
    codes: dict  # rank -> its exit code (0 when torchrun lists no failure for it)

    def lines(self) -> list[str]:
        """Every rank's non-empty stderr lines."""
        return [line for r in sorted(self.err) for line in self.err[r].splitlines() if line.strip()]

    def assert_one_line(self, code: int, expected: str) -> str:
        """Exactly one rank printed exactly one line holding ``expected``; every rank exited
        ``code``; no rank printed a traceback or a stack dump."""
        for r, text in self.err.items():
            assert "Traceback" not in text and "Stack (most" not in text, (r, text[-3000:])
        lines = self.lines()
        assert len(lines) == 1, (lines, self.returncode, self.out, self.console[-3000:])
        assert expected in lines[0], lines[0]
        assert self.codes == {r: code for r in self.err}, (self.codes, self.console[-3000:])
        return lines[0]


def torchrun_cmd(nproc: int, argv: list[str], logs: Path) -> list[str]:
    """torchrun running ``argv`` (a script and its flags), each rank's output in its own files
    under ``logs``."""
    return [
        PY, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}", "--log-dir", str(logs), "--redirects", "3", *argv,
    ]  # fmt: skip


def job_env() -> dict:
    env = dict(standalone_env(), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)  # the scripts must be quiet on their own
    return env


def start(cmd: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env(), **popen
    )


_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def finish(proc: subprocess.Popen, logs: Path, nproc: int, timeout: float = 600) -> Job:
    try:
        console = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the job did not finish within {timeout} s") from None
    out, err = {}, {}
    for r in range(nproc):
        found = sorted(logs.glob(f"*/attempt_0/{r}"))
        assert found, (r, console[-3000:])
        out[r] = (found[-1] / "stdout.log").read_text()
        err[r] = (found[-1] / "stderr.log").read_text()
    codes = {r: 0 for r in range(nproc)}
    codes.update({int(r): int(c) for r, c in _FAILURE.findall(console)})
    return Job(proc.returncode, console, out, err, codes)


# ---------------------------------------------------------------------------------------------
# The protocol alone: a small script with real process groups raises on one rank


FAULTS = """
import os, signal, sys, threading, time
from megatron_opd.runtime import cli, errors
cli.quiet()
import torch.distributed as dist
from megatron_opd.runtime import distributed, failures
case, bad, tp, pp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
failures.keep_in(sys.argv[5])
rank = int(os.environ["RANK"])

def main():
    if case == "early" and rank == bad:  # before the process groups exist, on one rank
        raise errors.UserError(f"--load x: damaged (seen by rank {rank})", rank_local=True)
    distributed.initialize(distributed.ParallelConfig(tp, pp))
    dist.barrier()
    if rank == bad:
        if case == "user":
            raise errors.UserError(f"--opd-teacher-load t: damaged (rank {rank})", rank_local=True)
        if case == "disk":
            raise errors.RunError(f"no space left on device writing x (rank {rank})")
        if case == "bug":
            raise KeyError(f"a bug on rank {rank}")
        if case == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
    if case == "two":  # two ranks fail differently, 1 s apart: the bug first, then the disk
        if rank == bad:
            raise KeyError(f"a bug on rank {rank}")
        time.sleep(1)
        raise errors.RunError(f"no space left on device writing x (rank {rank})")
    if case == "stuck":  # as under --exit-signal-handler: SIGTERM only sets a flag, and the
        signal.signal(signal.SIGTERM, lambda *_: None)  # survivor waits where no error reaches
        if rank == bad:
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()
    if case == "stop":  # every rank decides to stop
        raise errors.RunStopped(f"stopped (rank {rank})")
    dist.barrier()  # the other ranks wait here for the failed one
    distributed.teardown()

cli.run(main, "faults")
"""

# (case, failing rank, TP, PP, every rank's exit code, the line)
PROTOCOL_CASES = [
    ("early", 1, 1, 2, errors.USER_ERROR_EXIT, "faults: error: --load x: damaged (seen by rank 1)"),
    ("user", 0, 2, 1, errors.USER_ERROR_EXIT,
     "faults: error: --opd-teacher-load t: damaged (rank 0)"),  # fmt: skip
    ("disk", 1, 1, 1, errors.RUN_ERROR_EXIT, "faults: error: no space left on device writing x"),
    ("stop", 0, 1, 2, errors.NON_FINITE_EXIT, "faults: error: stopped (rank"),
    ("bug", 1, 2, 1, 1, None),
    ("kill", 0, 1, 1, None, "faults: error: another rank of the job failed or was killed"),
    ("stuck", 1, 1, 1, None, "faults: error: another rank of the job failed or was killed"),
    ("two", 0, 1, 1, errors.RUN_ERROR_EXIT, "faults: error: no space left on device writing x"),
]  # fmt: skip


WAKEUP = """
import os, signal, threading
from megatron_opd.runtime import failures
failures.start_watching("wakeup")
signal.signal(signal.SIGTERM, lambda *_: None)  # as --exit-signal-handler's: it sets a flag

def wait():
    while not failures._sigterm.is_set():
        failures._pause(0.5)

threads = [threading.Thread(target=wait, daemon=True) for _ in range(4)]
for t in threads:
    t.start()
threading.Event().wait(1.0)  # every thread waits in select on the wakeup fd
os.kill(os.getpid(), signal.SIGTERM)
for t in threads:
    t.join(5.0)
print(sum(not t.is_alive() for t in threads), "of", len(threads), "saw SIGTERM")
"""


def test_sigterm_reaches_every_thread_that_waits_for_it(tmp_path):
    """Threads wait on the signal wakeup fd at once (the watcher, and the main thread while it
    reports an error): the byte goes to one, and the others must not block in their read (a
    survivor of a killed peer once missed torchrun's SIGTERM so, and was SIGKILLed 30 s later)."""
    env = dict(job_env(), WORLD_SIZE="2", RANK="0")
    env.pop("TORCHELASTIC_RUN_ID", None)
    done = subprocess.run([PY, "-c", WAKEUP], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "4 of 4 saw SIGTERM", done.stdout + done.stderr[-3000:]


@pytest.mark.slow
def test_one_report_per_job(tmp_path):
    """One launch per case, all at once (each is mostly interpreters importing torch)."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    started = []
    for case, bad, tp, pp, *_ in PROTOCOL_CASES:
        logs = tmp_path / f"{case}_logs"
        argv = [str(script), case, str(bad), str(tp), str(pp), str(tmp_path / f"{case}_run")]
        started.append(start(torchrun_cmd(2, argv, logs)))
    for (case, bad, _, _, code, line), proc in zip(PROTOCOL_CASES, started, strict=True):
        job = finish(proc, tmp_path / f"{case}_logs", 2, timeout=300)
        kept = sorted((tmp_path / f"{case}_run").glob("failures/*"))
        if case == "bug":  # a bug: its traceback, from the failing rank only, exit 1 everywhere
            assert "KeyError: 'a bug on rank 1'" in job.err[bad], job.err
            assert job.err[1 - bad] == "" and job.codes == {0: 1, 1: 1}, (job.err, job.codes)
            assert kept == [], kept  # one rank failed: nothing to keep apart from its traceback
        elif case in ("kill", "stuck"):  # torchrun SIGTERMs the survivor: it says why, in one
            # line, exit 4 (stuck: the watcher, failures.BEFORE_SIGKILL_S after that SIGTERM)
            assert job.codes[bad] == -signal.SIGKILL, job.codes
            assert job.err[bad] == "", job.err
            said = job.lines()
            assert len(said) == 1 and said[0].startswith(line), (said, job.console[-3000:])
            assert job.codes[1 - bad] == errors.RUN_ERROR_EXIT, (job.codes, job.console[-3000:])
            assert "Traceback" not in job.err[1 - bad], job.err
        elif case == "two":  # the disk's line, and where both ranks' errors are kept
            said = job.assert_one_line(code, line)
            assert len(kept) == 1, kept
            assert f"(rank {bad} failed too; every failing rank's error is in {kept[0]}/)" in said
            ranks = failures.kept_errors(kept[0])
            assert sorted(ranks) == [0, 1], ranks
            assert "KeyError: 'a bug on rank 0'" in ranks[bad], ranks[bad]
            assert "no space left on device writing x (rank 1)" in ranks[1 - bad], ranks
            assert not list(kept[0].glob(".*.tmp")), list(kept[0].iterdir())
        else:
            job.assert_one_line(code, line)
            assert kept == [], kept  # the line is every error there was


# ---------------------------------------------------------------------------------------------
# A mistyped flag under torchrun: argparse's own errors through the job's one-line report

BAD_FLAGS = [
    (["--foo", "1"], "unrecognized arguments: --foo 1"),
    (["--train-iters", "abc"], "argument --train-iters: invalid int value: 'abc'"),
    (["--opd-reward", "vanilla"], "argument --opd-reward: invalid choice: 'vanilla'"),
]
BAD_FLAG_REPEATS = 2


@pytest.mark.slow
@pytest.mark.one_stack  # argparse and the job's store: the flags fail before Megatron is imported
@pytest.mark.parametrize("nproc", [2, 4])
def test_a_bad_flag_is_one_line_under_torchrun(tmp_path, nproc):
    """Each of argparse's three kinds of error, twice at ``nproc`` ranks: one line from the whole
    job every time, every rank exits 2, no traceback. Before the ranks settled argparse's errors
    through the job's store, rank 0 alone printed, and a rank that failed first had torchrun stop
    rank 0 before it printed (the line was missing in 2 to 4 runs of 6 at world size 2)."""
    script = str(ROOT / "scripts/pretrain_opd.py")
    runs = [(flags, line) for flags, line in BAD_FLAGS for _ in range(BAD_FLAG_REPEATS)]
    for pair_start in range(0, len(runs), 2):  # two launches at a time: each only parses flags
        started = []
        for i, (flags, _) in enumerate(runs[pair_start : pair_start + 2], start=pair_start):
            argv = [script, "--load", "x", "--opd-teacher-load", "y", *flags]
            started.append((start(torchrun_cmd(nproc, argv, tmp_path / f"logs{i}")), i))
        for proc, i in started:
            job = finish(proc, tmp_path / f"logs{i}", nproc, timeout=120)
            said = job.assert_one_line(errors.USER_ERROR_EXIT, runs[i][1])
            assert said.startswith("pretrain_opd.py: error: "), said


# ---------------------------------------------------------------------------------------------
# The real runs: scripts/pretrain_opd.py on the tiny pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("faults"))


def _flags(pair, *extra: str) -> list[str]:
    return [
        str(ROOT / "scripts/pretrain_opd.py"),
        "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
        "--opd-alpha", "0.5", "--global-batch-size", "2", "--micro-batch-size", "1",
        "--lr", "1e-3", "--lr-warmup-fraction", "0", "--rollout-max-new-tokens", "12",
        "--max-prompt-length", "160", "--prompt-data", "builtin:64", "--seed", "7", *extra,
    ]  # fmt: skip


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm (user namespaces)")
def test_full_disk_at_pp2(pair, tmp_path):
    """The second save of a PP2 run does not fit (a 2.5 MB tmpfs, 1.6 MB a checkpoint): one line
    from one rank, exit 4 on both, the first checkpoint stays latest, no temporary left; when both
    ranks' writes fail, the other rank's error is kept under failures/ and the line says so."""
    save, logs = tmp_path / "small", tmp_path / "logs"
    save.mkdir()
    flags = _flags(pair, "--pipeline-model-parallel-size", "2", "--train-iters", "2",
                   "--save", str(save), "--save-interval", "1")  # fmt: skip
    listing = tmp_path / "listing"
    # torchrun in a private mount namespace; what the tmpfs holds is listed before it goes
    script = (
        f"mount -t tmpfs -o size=2500k tmpfs {save} && "
        + " ".join(f"'{c}'" for c in torchrun_cmd(2, flags, logs))
        + f"; rc=$?; ls -A {save} > {listing}; "
        f"cat {save}/latest_checkpointed_iteration.txt >> {listing}; "
        f"cp -r {save}/failures {tmp_path}/kept 2>/dev/null; exit $rc"
    )
    ns = start(["unshare", "-rm", "sh", "-c", script])
    job = finish(ns, logs, 2)
    line = job.assert_one_line(
        errors.RUN_ERROR_EXIT, f"no space left on device writing {save}/iter_0000002"
    )
    listed = listing.read_text().split()
    assert [name for name in listed if name != "failures"] == [
        "iter_0000001", "latest_checkpointed_iteration.txt", "1",
    ]  # fmt: skip
    # both ranks' writes may fail: the second error is kept under failures/, and the line says so
    kept = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "kept").rglob("*"))
    named = f"every failing rank's error is in {save}/failures/" in line
    assert ("failures" in listed) == named, (kept, line, job.err)


@pytest.mark.slow
def test_damaged_teacher_at_pp2(pair, tmp_path):
    """A teacher checkpoint from before manifests with a truncated shard: the load fails after
    the process groups exist; one line, exit 2 on both ranks."""
    bad = tmp_path / "teacher"
    shutil.copytree(pair["teacher"], bad)
    (bad / "manifest.json").unlink()
    shard = sorted(bad.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    flags = _flags(pair, "--pipeline-model-parallel-size", "2", "--opd-teacher-load", str(bad),
                   "--train-iters", "1")  # fmt: skip
    job = finish(start(torchrun_cmd(2, flags, tmp_path / "logs")), tmp_path / "logs", 2)
    line = job.assert_one_line(errors.USER_ERROR_EXIT, f"{bad}: the checkpoint is damaged")
    assert f"{shard.name} is truncated" in line


@pytest.mark.slow
def test_non_finite_stop_at_dp2(pair, tmp_path):
    """A teacher with NaN weights at TP1 x DP2: every step is skipped, the run stops itself; one
    line, exit 3 on both ranks."""
    from opd_setup import make_nan_teacher

    make_nan_teacher(pair, tmp_path / "nan_teacher")
    flags = _flags(pair, "--opd-teacher-load", str(tmp_path / "nan_teacher"), "--train-iters",
                   "5", "--opd-max-consecutive-skips", "2")  # fmt: skip
    job = finish(start(torchrun_cmd(2, flags, tmp_path / "logs")), tmp_path / "logs", 2)
    job.assert_one_line(errors.NON_FINITE_EXIT, "2 steps in a row had non-finite")


# Megatron-Core 0.17+ writes a checkpoint from threads of the rank itself (no writer process): a
# signal ends a whole process, never one of its threads, so "kill -9 of the writer" is kill -9 of
# the rank mid-save there (the soak's "no writer process" fault; in tests/test_hardening.py
# test_kill9_during_a_save_leaves_nothing_behind), and a writer thread that fails raises in the
# rank's save, which test_full_disk_at_pp2 covers (ENOSPC from the writing thread).
WRITER_THREADS = (
    "this Megatron-Core writes checkpoints from threads of the rank: a writer cannot die alone "
    "(see WRITER_THREADS in this file for the tests that cover what a dead writer means there)"
)
WRITER_ATTEMPTS = 3


@pytest.mark.slow
@pytest.mark.skipif(not compat.writers.writers_are_processes(), reason=WRITER_THREADS)
def test_dead_writer_at_tp2(pair, tmp_path):
    """kill -9 of rank 1's checkpoint writer process during a TP2 save: one line, exit 4 on both
    ranks, the previous checkpoint stays latest, no temporary left. A launch whose 8 saves all
    ended before the writer was seen is run again, up to 3 times; a third miss fails."""
    for attempt in range(WRITER_ATTEMPTS):
        save, logs = tmp_path / f"run{attempt}", tmp_path / f"logs{attempt}"
        flags = _flags(pair, "--tensor-model-parallel-size", "2", "--train-iters", "8",
                       "--save", str(save), "--save-interval", "1")  # fmt: skip
        proc = start(torchrun_cmd(2, flags, logs))
        killed = None
        deadline = time.time() + 600
        while killed is None and proc.poll() is None and time.time() < deadline:
            ranks = rank_pids(proc.pid)
            writers = writer_pids(ranks[1]) if 1 in ranks else []
            if writers:
                os.kill(writers[0], signal.SIGKILL)
                killed = writers[0]
            time.sleep(0.002)
        job = finish(proc, logs, 2)
        if killed is not None:
            break
        assert job.returncode == 0, job.console[-3000:]  # missed: the run went on unharmed
    else:
        pytest.fail(f"no checkpoint writer process seen in {WRITER_ATTEMPTS} launches of 8 saves")
    line = job.assert_one_line(errors.RUN_ERROR_EXIT, "a checkpoint writer process")
    assert f"(pid {killed}) died" in line, line
    assert not list(save.glob("*.tmp")) and not list(save.glob("*.old"))
    latest = save / "latest_checkpointed_iteration.txt"
    if latest.exists():  # the first save may be the one that failed
        done = int(latest.read_text())
        assert sorted(p.name for p in save.glob("iter_*")) == [f"iter_{done:07d}"]


@pytest.mark.slow
def test_sigterm_at_tp2(pair, tmp_path):
    """SIGTERM to torchrun mid-run with --exit-signal-handler: both ranks save the same
    iteration and exit 0; one rank says so, in one line; nothing on stderr."""
    save, metrics, logs = tmp_path / "run", tmp_path / "m.jsonl", tmp_path / "logs"
    flags = _flags(pair, "--tensor-model-parallel-size", "2", "--train-iters", "1000", "--save",
                   str(save), "--metrics-file", str(metrics), "--exit-signal-handler")  # fmt: skip
    proc = start(torchrun_cmd(2, flags, logs))
    deadline = time.time() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    job = finish(proc, logs, 2, timeout=60)
    said = [line for r in job.out for line in job.out[r].splitlines() if "exit signal" in line]
    assert len(said) == 1, job.out
    last = read_metrics(metrics)[-1]["step"]
    assert f"exit signal: saved iteration {last}" in said[0], said
    assert all(text == "" for text in job.err.values()), job.err
    assert job.codes == {0: 0, 1: 0}, job.console[-3000:]
    assert int((save / "latest_checkpointed_iteration.txt").read_text()) == last


# ---------------------------------------------------------------------------------------------
# scripts/fault_soak.py at its CI size


def test_fault_soak_schedule_is_seeded():
    soak = load_script("fault_soak")
    plan = soak.schedule(6, 30, 2)
    assert plan == soak.schedule(6, 30, 2) != soak.schedule(7, 30, 2)
    assert {f.kind for f in plan} == set(soak.FAULT_KINDS) and {f.rank for f in plan} == {0, 1}
    assert {f.kind for f in soak.schedule(6, 3, 2)} == set(soak.FAULT_KINDS)  # the CI run's


@pytest.mark.slow
def test_fault_soak_small(pair, tmp_path):
    """3 faults (kill -9 of a rank, of a writer, SIGTERM) in a PP2 run of 8 steps: the weights,
    optimizer state and metrics equal a straight run's; no orphan, temporary or hang."""
    cmd = [PY, str(ROOT / "scripts/fault_soak.py"), "--faults", "3", "--steps", "8", "--seed",
           "6", "--work", str(tmp_path / "soak"), "--pair", str(pair["student"].parent),
           "--hang-after", "400"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=job_env(), timeout=2400)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert "faults fired 3/3" in proc.stdout and proc.stdout.rstrip().endswith("PASS")
