"""Faults on a rollout rank (``--rollout-ranks``: the last ranks only sample), at lag 0 and 1: one
line from the whole job, every rank's exit code pinned, no traceback, no hang.

- kill -9 of a rollout rank mid-run, under torchrun with its store not shared with the ranks
  (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, as under srun): the surviving ranks of both pools
  settle the report in the job's store that ``pools.split`` hands to
  ``failures.use_job_store``.
- a bad input that only the rollout rank sees: two torchruns as two nodes, each started in its
  own directory, and ``--prompt-data prompts.jsonl`` damaged on the rollout rank's node only.

Helpers (per-rank logs, torchrun's exit-code summary) are tests/test_faults.py's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from opd_setup import make_pair
from test_faults import _FAILURE, _flags, finish, job_env, torchrun_cmd

from megatron_opd.runtime import errors
from megatron_opd.runtime.procs import rank_pids
from megatron_opd.runtime.spawn import free_port

pytestmark = pytest.mark.slow

LAG = pytest.mark.parametrize("lag", [0, 1])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("rollout_faults"))


def _rollout_flags(pair, lag: int, *extra: str) -> list[str]:
    return _flags(pair, "--rollout-lag", str(lag), *extra)


@LAG
def test_kill9_of_a_rollout_rank(pair, tmp_path, lag):
    """1 training rank and 2 rollout ranks; once a step is logged, kill -9 of rollout rank 2.
    torchrun SIGTERMs ranks 0 and 1, one in each pool: they settle the job's one line in the
    job's store (the only store both pools share here), it says another rank failed or was
    killed, and both exit 4. Were the pools' own stores used, each would print its own line."""
    logs, metrics = tmp_path / "logs", tmp_path / "m.jsonl"
    flags = _rollout_flags(pair, lag, "--rollout-ranks", "2", "--train-iters", "200",
                           "--metrics-file", str(metrics))  # fmt: skip
    cmd = torchrun_cmd(3, flags, logs)
    at = cmd.index(next(c for c in cmd if c.startswith("--master-port=")))
    cmd[at : at + 1] = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}"]
    env = dict(job_env(), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(rank_pids(proc.pid)[2], signal.SIGKILL)
    job = finish(proc, logs, 3, timeout=120)
    want = {0: errors.RUN_ERROR_EXIT, 1: errors.RUN_ERROR_EXIT, 2: -signal.SIGKILL}
    assert job.codes == want, job.console[-3000:]
    said = job.lines()
    assert len(said) == 1, (said, job.console[-3000:])
    assert said[0].startswith("pretrain_opd.py: error: another rank of the job failed or was")
    assert "Traceback" not in "".join(job.err.values()), job.err


DAMAGED = '{"problem": "What is 2 + 2?", "answer": "4"}\n{"problem": "What is 3 + 3?", "answ\n'


@LAG
def test_bad_input_on_the_rollout_rank(pair, tmp_path, lag):
    """Two nodes of one rank each (torchrun --nnodes 2); node 1 (the rollout rank) has a damaged
    copy of the prompt file. Its rank prints the one line naming the file; both exit 2."""
    good = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(64)]
    port, procs = free_port(), []
    for node in (0, 1):
        where = tmp_path / f"node{node}"
        where.mkdir()
        text = "".join(json.dumps(g) + "\n" for g in good)
        (where / "prompts.jsonl").write_text(DAMAGED if node == 1 else text)
        flags = _rollout_flags(pair, lag, "--rollout-ranks", "1", "--prompt-data",
                               "prompts.jsonl", "--train-iters", "2")  # fmt: skip
        cmd = torchrun_cmd(1, flags, where / "logs")
        at = cmd.index(next(c for c in cmd if c.startswith("--master-port=")))
        cmd[at : at + 1] = ["--nnodes", "2", f"--node-rank={node}", "--master-addr", "localhost",
                            f"--master-port={port}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=job_env(), cwd=where))  # fmt: skip
    jobs = [finish(p, tmp_path / f"node{n}" / "logs", 1, timeout=180) for n, p in enumerate(procs)]
    lines = [line for job in jobs for line in job.lines()]
    assert len(lines) == 1 and lines[0] in jobs[1].lines(), (lines, jobs[0].console[-2000:])
    assert lines[0].startswith("pretrain_opd.py: error: ") and "prompts.jsonl" in lines[0], lines
    for job in jobs:
        assert "Traceback" not in "".join(job.err.values()), job.err
    codes = {int(r): int(c) for job in jobs for r, c in _FAILURE.findall(job.console)}
    assert codes == {0: errors.USER_ERROR_EXIT, 1: errors.USER_ERROR_EXIT}, jobs[0].console[-3000:]
