"""scripts/slurm/*.sbatch under a real Slurm: two fake nodes (n1, n2) on this machine, each job
two processes, one per node, on the tiny teacher/student pair of tests/opd_setup.py.

Debian's Slurm runs several slurmd on one host (``slurmd -N n1``, ``slurmd -N n2``), so the jobs
really span two Slurm nodes: SLURM_NODEID 0 and 1, the rendezvous at the first node's name.

* torchrun variant: PP2 across the two nodes (pipeline stage 0 on n1, stage 1 on n2), flags from a
  CONFIG yaml, from the command line and from OPD_ARGS; 2 steps and a checkpoint.
* srun variant: DP2 across the two nodes, SIGUSR1 sent to the batch shell after the first
  checkpoint (what Slurm sends 120 s before the time limit): the job requeues itself, starts
  again under the same id and resumes from the checkpoint.

The cluster (tests/slurm_cluster.py) installs slurm and munge with apt-get when missing, which
needs root; without root or apt-get the tests skip.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from opd_setup import ROOT, make_pair
from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_apt_packages, ensure_installed

SLURM_DIR = ROOT / "scripts" / "slurm"
TINY = {
    "global-batch-size": 4,
    "micro-batch-size": 2,
    "lr": 1e-3,
    "lr-warmup-fraction": 0,
    "rollout-max-new-tokens": 12,
    "max-prompt-length": 160,
    "prompt-data": "builtin:64",
    "seed": 7,
}


@pytest.fixture(scope="module")
def cluster(request):
    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    c = SlurmCluster()
    request.addfinalizer(c.stop)  # also after a start that failed half-way
    c.start()
    return c


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("slurm_pair"))


def _job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "PYTHON": sys.executable,
        "NPROC_PER_NODE": "1",
        "LOG_ROOT": str(tmp_path / "logs"),
        "PYTHONWARNINGS": "ignore",
        **extra,
    }


def _report(cluster: SlurmCluster, tmp_path: Path) -> str:
    out = [cluster.logs()]
    for f in sorted(tmp_path.rglob("*")):
        if f.is_file() and f.suffix in (".out", ".log"):
            text = f.read_text(errors="replace")[-4000:]
            out.append(f"--- {f.relative_to(tmp_path)} ---\n{text}")
    return "\n".join(out)


def _iterations(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"^iter\s+(\d+) \|", log, flags=re.M)]


@pytest.mark.slow
@pytest.mark.one_stack  # the sbatch scripts; the PP2 run and the resume are tested on both stacks
def test_torchrun_sbatch_pp2_across_two_nodes(cluster, pair, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "opd-teacher-load": str(pair["teacher"])}))
    save = tmp_path / "ckpt"
    env = _job_env(
        tmp_path,
        CONFIG=str(config),
        OPD_ARGS=f"--train-iters 2 --save {save}",
        SRUN_ARGS="--mpi=none",  # passed through to srun (pyxis containers go this way)
    )
    start = time.monotonic()
    proc = cluster.sbatch(
        [
            "--nodes=2",
            f"--output={tmp_path}/slurm-%j.out",
            str(SLURM_DIR / "pretrain_opd.sbatch"),
            "--load", str(pair["student"]),
            "--pipeline-model-parallel-size", "2",
            "--opd-alpha", "0.5",
        ],
        env=env,
        cwd=ROOT,  # the submit directory is the checkout: OPD_ROOT's default
        timeout=240,
    )  # fmt: skip
    report = _report(cluster, tmp_path)
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}\n{proc.stderr}\n{report}"
    print(f"2-node torchrun job: {time.monotonic() - start:.1f} s")

    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (save / "iter_0000002" / "megatron_opd.json").is_file()
    assert not list(save.glob("*.tmp"))

    job_id = proc.stdout.strip()
    log_dir = tmp_path / "logs" / f"opd-{job_id}"
    job_log = (log_dir / "job.log").read_text()
    assert "2 nodes x 1 workers" in job_log and job_log.rstrip().endswith("srun exited with 0")
    node0, node1 = ((log_dir / f"node{i}.log").read_text() for i in (0, 1))
    assert "node 0 start 0" in node0 and "node 1 start 0" in node1
    # the last pipeline stage (global rank 1, torchrun's worker on node 1) logs the steps
    assert _iterations(node1) == [1, 2] and _iterations(node0) == []


@pytest.mark.slow
@pytest.mark.one_stack  # the sbatch scripts' requeue; resumes are tested on both stacks
def test_srun_sbatch_requeues_on_usr1_and_resumes(cluster, pair, tmp_path):
    save = tmp_path / "ckpt"
    train_iters = 6
    flags = [
        "--load", str(pair["student"]),
        "--opd-teacher-load", str(pair["teacher"]),
        *(f"--{k}={v}" for k, v in TINY.items()),
        "--train-iters", str(train_iters),
        "--save", str(save),
        "--save-interval", "1",
    ]  # fmt: skip
    start = time.monotonic()
    job_id = cluster.submit(
        [
            "--nodes=2",
            "--ntasks-per-node=1",  # the script's default is one task per GPU of an 8-GPU node
            f"--output={tmp_path}/slurm-%j.out",
            str(SLURM_DIR / "pretrain_opd_srun.sbatch"),
            *flags,
        ],
        env=_job_env(tmp_path),
        cwd=ROOT,
    )
    latest = save / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 180
    while not latest.exists():
        assert cluster.job_state(job_id) is not None, _report(cluster, tmp_path)
        assert time.monotonic() < deadline, _report(cluster, tmp_path)
        time.sleep(0.1)
    # what Slurm sends the batch shell 120 s before the time limit (--signal=B:USR1@120)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)

    # Slurm holds the requeued job back for cred_expire + 1 s (6 s here, see slurm_cluster.py);
    # releasing it sooner races the revocation of its first credential
    cluster.wait_gone(job_id, timeout=240)
    report = _report(cluster, tmp_path)
    print(f"2-node srun job with one requeue: {time.monotonic() - start:.1f} s")

    log_dir = tmp_path / "logs" / f"opd-srun-{job_id}"
    job_log = (log_dir / "job.log").read_text()
    assert "caught SIGUSR1 (JobState=RUNNING)" in job_log, report
    assert "2 tasks" in job_log and "start 1 on" in job_log, report
    assert job_log.rstrip().endswith("srun exited with 0"), report
    assert latest.read_text().strip() == str(train_iters), report

    # rank 1 (on node n2) logs the steps; after the restart it continues from a checkpoint
    rank1 = (log_dir / "rank1.log").read_text()
    first_run, _, second_run = rank1.partition("rank 1 local 0 start 1")
    assert "rank 1 local 0 start 0" in first_run, report
    before, after = _iterations(first_run), _iterations(second_run)
    assert before[:1] == [1] and after, report
    assert after == list(range(after[0], train_iters + 1)), report
    assert 2 <= after[0] <= before[-1] + 1, report  # resumed, not restarted from step 1
    assert "rank 0 local 0 start 1" in (log_dir / "rank0.log").read_text(), report


def test_shell_scripts_pass_shellcheck():
    try:
        ensure_apt_packages(("shellcheck",), ("shellcheck",))
    except SlurmUnavailable as e:
        pytest.skip(str(e))
    scripts = [*sorted(SLURM_DIR.glob("*.sbatch")), ROOT / "scripts" / "gpu_check.sh"]
    scripts += [ROOT / "scripts" / "fetch_gpu_wheels.sh", ROOT / "examples" / "launch.sh"]
    assert len(scripts) == 5
    proc = subprocess.run(
        ["shellcheck", "--shell=bash", "--severity=style", *map(str, scripts)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
