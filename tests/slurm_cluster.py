"""A real Slurm cluster of two fake nodes on this one machine, for tests.

Debian's ``slurmctld``/``slurmd``/``munge`` packages (installed with apt-get when missing), a
private ``munged`` on its own socket and key, one ``slurmctld`` and one ``slurmd -N <node>`` per
fake node, each on its own free port, all state under one scratch directory. Nothing here touches
the machine's own munge or Slurm configuration; the one shared file is ``/etc/hosts``, which gets a
line resolving the node names to 127.0.0.1 (tagged, and removed again by :meth:`stop`).

    with SlurmCluster() as cluster:  # start() ... stop(), also on errors
        proc = cluster.sbatch(["--nodes", "2", "job.sbatch"], env={...}, timeout=120)
        assert proc.returncode == 0, cluster.logs()

Measured on Debian 12 (Slurm 22.05, munge 0.5.15), as root: start ~2 s, a 2-node job of a trivial
script ~4 s. Pitfalls met: munged refuses a socket below a directory others cannot traverse;
``sbatch --wait`` polls slowly unless ``MinJobAge`` is small, and can return while a requeued job
waits for its next start (use :meth:`SlurmCluster.wait_gone` across requeues); a requeued job is
held back for the credential lifetime + 1 s (its begin time; ~2 minutes by default, so the cluster
sets ``cred_expire=5``). Releasing it early with ``scontrol update StartTime=now`` races the
revocation of its old credential: a start within the same second is killed ("Job credential
revoked").
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel", "slurmctld", "slurmd")
BINARIES += ("munged", "mungekey")
HOSTS = Path("/etc/hosts")
_apt_updated = False


class SlurmUnavailable(RuntimeError):
    """Slurm is missing and cannot be installed here (not root, or no apt-get)."""


def _which(name: str) -> Optional[str]:
    # root's daemons live in sbin, which a CI user's PATH may lack
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def ensure_apt_packages(
    packages: tuple[str, ...], binaries: tuple[str, ...], timeout: int = 300
) -> None:
    """apt-get install ``packages`` unless every one of ``binaries`` is already there.

    Raises :class:`SlurmUnavailable` when they are missing and cannot be installed (no apt-get,
    not root), RuntimeError when the installation itself fails."""
    if all(_which(b) for b in binaries):
        return
    what = ", ".join(packages)
    if _which("apt-get") is None:
        raise SlurmUnavailable(f"{what} not installed and apt-get is not available")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{what} not installed and apt-get needs root")
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    for cmd in ([] if _apt_updated else [["apt-get", "update", "-q"]]) + [install]:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr}")
        _apt_updated = True  # once per process: the second install skips the ~8 s update
    missing = [b for b in binaries if _which(b) is None]
    if missing:
        raise RuntimeError(f"installed {what} but {missing} are still missing")


def ensure_installed() -> None:
    """Debian's Slurm controller, node daemon, client commands and munge; and root, which the
    cluster needs whether or not they are installed (slurmd launches jobs, /etc/hosts)."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster needs root (slurmd, /etc/hosts)")
    ensure_apt_packages(PACKAGES, BINARIES)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """``nodes`` fake Slurm nodes on this host, controlled by one private slurmctld.

    State, logs and sockets live in ``root`` (default: a new directory in the system's temporary
    directory, removed by :meth:`stop`). munged refuses a socket below a directory that others
    cannot traverse, so every directory above ``root`` needs o+x: pytest's ``tmp_path`` does not
    qualify (``/tmp/pytest-of-root`` is 0700).
    """

    def __init__(
        self, root: Optional[Path] = None, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2
    ):
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="slurm-cluster-") if root is None else root)
        self.nodes = nodes
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.hosts_tag = f"# slurm test cluster {self.root}"
        self._daemons: list[tuple[str, subprocess.Popen]] = []
        self._hosts_added = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        for parent in self.root.parents:
            if not os.stat(parent).st_mode & 0o001:
                raise ValueError(f"munged needs o+x on every directory above its socket: {parent}")
        for sub in ("etc", "log", "run", "munge", "state/ctld"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / "state" / "d" / node).mkdir(parents=True, exist_ok=True)
        self._start_munged()
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        self.conf.write_text(self._slurm_conf(ctld_port, node_ports))
        self._add_hosts_line()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(
                f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)]
            )
        self._wait_idle(timeout)

    def stop(self) -> None:
        """Cancel every job, stop the daemons by their own PIDs, drop the hosts line.

        Safe to call after a partial :meth:`start` and more than once."""
        if any(name == "slurmctld" for name, _ in self._daemons):
            self._cancel_all_jobs()
        for _, proc in reversed(self._daemons):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self._daemons):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._daemons.clear()
        self._remove_hosts_line()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- using it ----------------------------------------------------------------------------

    def env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        """The environment for Slurm client commands (and, exported, for the jobs)."""
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        path = env.get("PATH", "")
        env["PATH"] = os.pathsep.join([path, "/usr/sbin", "/sbin"])
        env.update(extra or {})
        return env

    def run(self, *cmd: str, timeout: float = 30, check: bool = True, **kw):
        return subprocess.run(
            list(cmd),
            env=self.env(kw.pop("env", None)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            **kw,
        )

    def sbatch(
        self, args: list[str], env: Optional[dict[str, str]] = None, timeout: float = 300, **kw
    ) -> subprocess.CompletedProcess:
        """``sbatch --wait --parsable ARGS``: returns when the job ends, with its exit code.

        On a timeout the job is cancelled and the daemons' logs are appended to the error."""
        cmd = [_which("sbatch"), "--wait", "--parsable", *args]
        try:
            return self.run(*cmd, env=env, timeout=timeout, check=False, **kw)
        except subprocess.TimeoutExpired as e:
            self._cancel_all_jobs()
            raise AssertionError(f"sbatch did not return in {timeout} s\n{self.logs()}") from e

    def submit(self, args: list[str], env: Optional[dict[str, str]] = None, **kw) -> str:
        """``sbatch --parsable ARGS`` without waiting; returns the job id."""
        proc = self.run(_which("sbatch"), "--parsable", *args, env=env, **kw)
        return proc.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> Optional[tuple[str, str]]:
        """(state, reason) as squeue shows them, or None once the job is gone."""
        proc = self.run(
            _which("squeue"), "-h", "-j", job_id, "-o", "%T %r", check=False, timeout=10
        )
        fields = proc.stdout.split()
        return (fields[0], fields[1] if len(fields) > 1 else "") if fields else None

    def wait_gone(self, job_id: str, timeout: float, poll=None) -> None:
        """Until ``job_id`` leaves the queue; ``poll(state, reason)`` runs on every look.

        Unlike ``sbatch --wait``, which can return while a requeued job is between runs."""
        deadline = time.monotonic() + timeout
        while (state := self.job_state(job_id)) is not None:
            if time.monotonic() > deadline:
                self._cancel_all_jobs()
                raise AssertionError(f"job {job_id} still {state} after {timeout} s\n{self.logs()}")
            if poll is not None:
                poll(*state)
            time.sleep(0.5)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*.*")):
            out.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.out", "ab")  # the daemon writes to it
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        log.close()
        self._daemons.append((name, proc))
        return proc

    def _start_munged(self) -> None:
        # a private munged (own key, socket, pid and seed files) leaves the host's munge alone
        # and cannot be stopped under us by another test that started "the" munged
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run([_which("mungekey"), "--create", "--keyfile", str(key)], check=True)
        os.chmod(self.root / "munge", 0o755)
        proc = self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--log-file={self.log_dir / 'munged.log'}",
                f"--pid-file={self.root / 'run' / 'munged.pid'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
        )
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.05)

    def _slurm_conf(self, ctld_port: int, node_ports: list[int]) -> str:
        r = self.root
        lines = [
            f"ClusterName=opdtest{ctld_port}",
            # job ids (and the ports the job scripts derive from them) differ between clusters
            # that run at the same time on this host
            f"FirstJobId={random.randrange(1000, 1_000_000)}",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire: a job step credential's lifetime, and how long Slurm holds a requeued
            # job back (its begin time: cred_expire + 1 s; the default 120 s, the minimum 5 s). A
            # requeued job released earlier can start within the second its old credential was
            # revoked and is killed as "Job credential revoked" (seen in CI)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r}/state/ctld",
            f"SlurmdSpoolDir={r}/state/d/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/backfill",
            # no ~3 s delay before a batch job starts
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            # a fake node may advertise more CPUs than the machine has without being drained
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "Waittime=0",
            # sbatch --wait polls at 2, 8, 32 s unless finished jobs are forgotten this fast
            "MinJobAge=5",
        ]
        for node, port in zip(self.nodes, node_ports, strict=True):
            lines.append(
                f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN"
            )
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _add_hosts_line(self) -> None:
        # rewrite in place (open "w"), never replace the file: in containers /etc/hosts is often
        # a bind mount, which a rename (sed -i) cannot replace
        text = HOSTS.read_text()
        if not text.endswith("\n"):
            text += "\n"
        HOSTS.write_text(text + f"127.0.0.1 {' '.join(self.nodes)} {self.hosts_tag}\n")
        self._hosts_added = True

    def _remove_hosts_line(self) -> None:
        if not self._hosts_added:
            return
        lines = HOSTS.read_text().splitlines(keepends=True)
        HOSTS.write_text("".join(line for line in lines if self.hosts_tag not in line))
        self._hosts_added = False

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            dead = [name for name, p in self._daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited during start-up\n{self.logs()}")
            proc = self.run(_which("sinfo"), "-h", "-N", "-o", "%N %t", check=False)
            states = proc.stdout.strip()
            got = dict(line.split() for line in states.splitlines() if line.strip())
            if all(got.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout} s: {states!r}\n{self.logs()}")

    def _cancel_all_jobs(self, timeout: float = 30) -> None:
        squeue = _which("squeue")
        ids = self.run(squeue, "-h", "-o", "%i", check=False, timeout=10).stdout.split()
        if ids:
            self.run(_which("scancel"), *ids, check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.run(squeue, "-h", "-o", "%i", check=False, timeout=10).stdout.split()
            if not left:
                return
            time.sleep(0.5)
