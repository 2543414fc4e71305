"""Fault soak: a PP2 (or TP2) run of N steps under torchrun on a tiny model pair, hit by K faults at
random moments and relaunched after each with the same command (as a requeued Slurm job is), must
end with the weights, optimizer state and metrics of a straight run of the same N steps.

    python scripts/fault_soak.py --faults 3 --steps 8 --layout PP2 --seed 0 --work runs/soak

Faults, drawn from ``--seed`` (the same seed gives the same schedule): kill -9 of a random rank;
kill -9 of a random rank's checkpoint writer process, during a save (where Megatron-Core writes
from threads there is no such process, and the rank itself is killed during its save; the table
says which); SIGTERM of the job (torchrun forwards it; ``--exit-signal-handler`` saves and exits).
Each fires once the launch has logged a drawn number of steps (0-2, and at least one: a fault
that lands while the ranks are still starting tests nothing of a run), after a drawn fraction of
a step (0-1; the step's seconds measured in the straight run, so a fast machine does not finish
the run before the fault). The drawn step count is cut where it would leave the later faults no
step to land in.

Checks, printed as a table; exit code 1 on any failure:

- the final checkpoint's every tensor (model and optimizer) and its iteration, data position and
  scheduler equal the straight run's, bit for bit (one layout throughout: no resharding);
- the metrics file holds each step 1..N exactly once, each row equal to the straight run's
  (timings and memory aside);
- no rank prints a traceback; no process of a launch outlives it (found by an environment
  marker 30 s after the launch, then killed, and again for every launch after the last one); no
  temporary (``*.tmp``, ``*.old``, ``.write_test.*``) is left at the end;
- every launch ends within ``--hang-after`` seconds (printed; a launch past it is a hang);
- every faulted launch ends as documented (:func:`expected_codes`): SIGTERM saves and every rank
  exits 0 with the exit-signal line; kill -9 of a rank leaves the other exiting 4 with one line;
  a killed writer process ends both ranks with 4; a fault counts only if it landed after the
  launch had logged a step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from megatron_opd.runtime.procs import marked, rank_pids, writer_pids  # noqa: E402

FAULT_KINDS = ("kill_rank", "kill_writer", "sigterm")
LAYOUT_FLAGS = {
    "PP2": ["--pipeline-model-parallel-size", "2"],
    "TP2": ["--tensor-model-parallel-size", "2"],
}
VOLATILE = ("time/", "tokens_per_sec", "memory/")  # metrics that differ between equal runs


@dataclass
class Fault:
    kind: str
    rank: int
    after_steps: int
    delay_steps: float  # a fraction of one step's seconds

    def __str__(self) -> str:
        where = "job" if self.kind == "sigterm" else f"rank {self.rank}"
        return f"{self.kind} ({where}) after {self.after_steps} steps + {self.delay_steps:.2f} step"


def schedule(seed: int, faults: int, world: int) -> list[Fault]:
    rng = random.Random(seed)
    return [
        Fault(rng.choice(FAULT_KINDS), rng.randrange(world), rng.randrange(3), rng.uniform(0, 1))
        for _ in range(faults)
    ]


@dataclass
class Launch:
    number: int
    fault: Fault | None
    outcome: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    start_iteration: int = 0
    end_iteration: int = 0
    orphans: int = 0
    tracebacks: int = 0
    rank_lines: list[str] = field(default_factory=list)
    hung: bool = False
    step_times: list[float] = field(default_factory=list)  # when each step was seen logged
    mark: str = ""  # the environment marker of the launch's processes
    steps_at_fault: int = -1  # steps the launch had logged when its fault fired
    codes: dict = field(default_factory=dict)  # rank -> exit code (torchrun's summary; 0 unlisted)
    rank_out: str = ""  # every rank's stdout
    lingered: str = ""  # the stacks of ranks still running LINGER_S after a kill (see stacks())

    def step_s(self) -> float:
        """The median seconds between logged steps (1.0 if fewer than two were seen)."""
        gaps = sorted(b - a for a, b in zip(self.step_times[:-1], self.step_times[1:], strict=True))
        return gaps[len(gaps) // 2] if gaps else 1.0


# --------------------------------------------------------------------------------------------
# The tiny pair and the command


def make_pair(root: Path) -> dict[str, Path]:
    """``root/student`` (2 layers) and ``root/teacher`` (4 layers): random tiny Qwen3s sharing a
    BPE tokenizer, converted by the project's converter (the test suite's pair)."""
    from megatron_opd.models.tiny import convert_hf_checkpoint, save_bpe_tokenizer, save_hf_qwen3

    out = {"student": root / "student", "teacher": root / "teacher"}
    if all((p / "metadata.json").exists() for p in out.values()):
        return out
    tok = root / "tokenizer"
    save_bpe_tokenizer(tok)
    vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"]) + 3
    for name, layers, seed in (("teacher", 4, 1), ("student", 2, 2)):
        hf = root / f"hf_{name}"
        save_hf_qwen3(hf, layers, seed=seed, vocab=vocab, scale=0.25)
        convert_hf_checkpoint(hf, out[name], tokenizer_dir=tok)
    return out


def run_flags(pair: dict[str, Path], steps: int, layout: str, save: Path, metrics: Path):
    return [
        str(ROOT / "scripts" / "pretrain_opd.py"),
        "--load", str(pair["student"]), "--opd-teacher-load", str(pair["teacher"]),
        *LAYOUT_FLAGS[layout],
        "--opd-alpha", "0.5", "--global-batch-size", "4", "--micro-batch-size", "1",
        "--lr", "1e-3", "--lr-warmup-fraction", "0", "--rollout-max-new-tokens", "12",
        "--max-prompt-length", "160", "--prompt-data", "builtin:64", "--seed", "7",
        "--train-iters", str(steps), "--save", str(save), "--save-interval", "1",
        "--metrics-file", str(metrics), "--exit-signal-handler",
    ]  # fmt: skip


def torchrun(flags: list[str], logs: Path) -> list[str]:
    from megatron_opd.runtime.spawn import free_port

    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={free_port()}", "--log-dir", str(logs), "--redirects", "3", *flags,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Processes


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@functools.cache
def writer_processes() -> bool:
    """Whether this Megatron-Core forks checkpoint writer processes (0.16) or writes from
    threads of the rank (0.19), where a writer fault is the rank killed mid-save."""
    from megatron_opd.compat.writers import writers_are_processes

    return writers_are_processes()


def latest(save: Path) -> int:
    text = _read(save / "latest_checkpointed_iteration.txt").decode().strip()
    return int(text) if text.isdigit() else 0


def logged_steps(logs: Path) -> int:
    """Steps the launch has logged so far (the last rank's console lines)."""
    return sum(_read(p).count(b"\niter ") + _read(p).startswith(b"iter ") for p in
               logs.glob("*/attempt_0/*/stdout.log"))  # fmt: skip


def temporaries(*dirs: Path) -> list[Path]:
    found = []
    for d in dirs:
        if d.exists():
            found += [p for p in d.iterdir() if p.suffix in (".tmp", ".old")]
            found += list(d.glob(".write_test.*"))
    return found


# --------------------------------------------------------------------------------------------
# One launch, with or without a fault


LINGER_S = 10.0  # a rank alive this long after its peer was killed waits where it should not


SIGNAL_FIELDS = ("SigQ", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")  # pending, blocked...


def stacks(ranks: dict[int, int]) -> str:
    """Where each of ``ranks`` (rank -> pid) waits: every thread's Python stack with py-spy where
    it is installed, else every thread's kernel wait channel."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    out = []
    for rank, pid in sorted(ranks.items()):
        out.append(f"--- rank {rank} (pid {pid})")
        status = _read(Path(f"/proc/{pid}/status")).decode(errors="replace").splitlines()
        out.append(" ".join(x for x in status if x.split(":")[0] in SIGNAL_FIELDS))
        if spy:
            done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True)
            out.append(done.stdout + done.stderr)
            continue
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            name = _read(task / "comm").decode(errors="replace").strip()
            wchan = _read(task / "wchan").decode(errors="replace").strip()
            out.append(f"thread {task.name} {name}: {wchan}")
    return "\n".join(out)


def launch(
    number: int,
    flags: list[str],
    work: Path,
    save: Path,
    fault: Fault | None,
    hang_after: float,
    after_steps: int = 0,
    delay_s: float = 0.0,
) -> Launch:
    logs = work / "logs" / f"launch{number:03d}"
    mark = f"MEGATRON_OPD_SOAK_{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{mark: "1"})
    result = Launch(number, fault, start_iteration=latest(save), mark=mark)
    console = (work / "logs" / f"launch{number:03d}.console").open("w")
    started = time.monotonic()
    proc = subprocess.Popen(
        torchrun(flags, logs), stdout=console, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    armed_at, fired, writer_misses, saving = None, fault is None, 0, False
    killed_at = None
    while proc.poll() is None:
        now = time.monotonic()
        if killed_at is not None and now - killed_at > LINGER_S and not result.lingered:
            # a survivor should have seen its peer go within a second: say where it waits
            result.lingered = stacks(rank_pids(proc.pid)) or "(no rank left)"
            (logs / "lingered.txt").write_text(result.lingered)
        steps = logged_steps(logs)
        result.step_times += [now] * (steps - len(result.step_times))
        if now - started > hang_after:
            result.hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if not fired:
            if armed_at is None and steps >= after_steps:
                armed_at = now
            if armed_at is not None and now - armed_at >= delay_s:
                fired, note = fire(fault, proc, save, writer_misses, saving)
                result.steps_at_fault = steps
                if note == "not yet":
                    fired = False
                    now_saving = bool(list(save.glob("iter_*.tmp")))
                    writer_misses += saving and not now_saving  # a save ended unseen
                    saving = now_saving
                else:
                    result.outcome = note
                    killed_at = now if fault.kind != "sigterm" else None
        time.sleep(0.002 if armed_at is not None and not fired else 0.05)
    proc.wait()
    console.close()
    result.returncode = proc.returncode
    result.seconds = time.monotonic() - started
    if not fired:
        result.outcome = "not fired: the run ended first"
    elif fault is None:
        result.outcome = "straight to the end"
    deadline = time.monotonic() + 30
    while marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = marked(mark)
    result.orphans = len(left)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for err in logs.glob("*/attempt_0/*/stderr.log"):
        text = _read(err).decode(errors="replace")
        result.tracebacks += text.count("Traceback") + text.count("Stack (most recent")
        result.rank_lines += [line for line in text.splitlines() if line.strip()]
    for out in logs.glob("*/attempt_0/*/stdout.log"):
        result.rank_out += _read(out).decode(errors="replace")
    console_text = _read(work / "logs" / f"launch{number:03d}.console").decode(errors="replace")
    result.codes = {r: 0 for r in range(2)}
    result.codes.update({int(r): int(c) for r, c in _FAILURE.findall(console_text)})
    result.end_iteration = latest(save)
    return result


_FAILURE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def expected_codes(r: Launch) -> dict[int, int] | None:
    """Every rank's exit code a faulted launch must end with (None: no fault fired)."""
    from megatron_opd.runtime import errors

    if r.fault is None or not r.outcome or r.outcome.startswith("not fired"):
        return None
    if r.fault.kind == "sigterm":  # --exit-signal-handler: saved, and a clean exit
        return {0: 0, 1: 0}
    if "kill -9 writer" in r.outcome:  # the dead writer's rank fails its save, the other echoes
        return {0: errors.RUN_ERROR_EXIT, 1: errors.RUN_ERROR_EXIT}
    # a rank killed: the survivor (torchrun's SIGTERM, or the lost peer) is one line and exit 4
    return {r.fault.rank: -signal.SIGKILL, 1 - r.fault.rank: errors.RUN_ERROR_EXIT}


def fire(fault: Fault, proc: subprocess.Popen, save: Path, writer_misses: int, saving: bool):
    """Inflict ``fault``; returns (True, what was done) or (False, "not yet")."""
    if fault.kind == "sigterm":
        proc.send_signal(signal.SIGTERM)
        return True, "SIGTERM to torchrun"
    ranks = rank_pids(proc.pid)
    if fault.rank not in ranks:
        return False, "not yet"  # the ranks have not started
    pid = ranks[fault.rank]
    if fault.kind == "kill_rank":
        os.kill(pid, signal.SIGKILL)
        return True, f"kill -9 rank {fault.rank} (pid {pid})"
    writers = writer_pids(pid) if writer_processes() else []
    if writers:
        os.kill(writers[0], signal.SIGKILL)
        return True, f"kill -9 writer {writers[0]} of rank {fault.rank}"
    if (not writer_processes() or writer_misses >= 2) and list(save.glob("iter_*.tmp")):
        # no writer process: Megatron-Core writes from threads of the rank
        os.kill(pid, signal.SIGKILL)
        return True, f"no writer process: kill -9 rank {fault.rank} (pid {pid}) mid-save"
    return False, "not yet"


# --------------------------------------------------------------------------------------------
# Comparing the two runs


def checkpoint_state(directory: Path) -> dict:
    """Every tensor of a dist checkpoint (read without a process group) and its common.pt
    (Megatron-Core 0.19 writes none: the common state is in the ``.distcp`` files, read above)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(directory), f"{tmp}/state.pt")
        state = torch.load(f"{tmp}/state.pt", weights_only=False)
    if (directory / "common.pt").exists():
        state["common.pt"] = torch.load(directory / "common.pt", weights_only=False)
    return state


def differences(a, b, path: str = "") -> list[str]:
    """Where two nested states differ (tensors bit for bit, NaN equal to NaN)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k} (only in one)" for k in set(a) ^ set(b)]
        for k in sorted(set(a) & set(b), key=str):
            out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def metric_rows(path: Path) -> list[dict]:
    rows = []
    for line in _read(path).decode().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_opd.runtime import cli, errors

    p = cli.ArgumentParser(prog="fault_soak.py", description=__doc__)
    p.add_argument("--faults", type=int, default=3, help="K faults")
    p.add_argument("--steps", type=int, default=8, help="N training steps")
    p.add_argument("--layout", choices=sorted(LAYOUT_FLAGS), default="PP2")
    p.add_argument("--seed", type=int, default=0, help="draws the fault schedule")
    p.add_argument("--work", type=str, required=True, help="directory for runs and logs")
    p.add_argument(
        "--pair", type=str, default=None, help="an existing tiny pair (student/, teacher/)"
    )
    p.add_argument("--hang-after", type=float, default=600.0, help="seconds a launch may take")
    args = p.parse_args(argv)
    cli.check_numbers(
        p,
        args,
        {"--faults": cli.at_least(0), "--steps": cli.at_least(1), "--hang-after": cli.above(0)},
    )
    if args.steps < 2 * args.faults + 2:  # see main(): each fault needs two steps
        raise errors.UserError(
            f"--steps {args.steps} is too few for --faults {args.faults}: a fault may fire up to "
            f"2 steps into a launch; give --steps >= {2 * args.faults + 2}"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_opd.runtime import outputs

    outputs.check_output_dir("--work", args.work)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    pair = make_pair(Path(args.pair) if args.pair else work / "pair")
    writer_processes()  # imports Megatron-Core (seconds): never inside a launch's fault loop
    plan = schedule(args.seed, args.faults, 2)
    print(f"fault soak: {args.layout}, {args.steps} steps, {args.faults} faults, seed {args.seed};"
          f" a launch longer than {args.hang_after:.0f} s is a hang", flush=True)  # fmt: skip
    for i, f in enumerate(plan):
        print(f"  fault {i + 1}: {f}", flush=True)

    straight_save, straight_metrics = work / "straight", work / "straight.jsonl"
    soak_save, soak_metrics = work / "soak", work / "soak.jsonl"
    for d in (straight_save, soak_save):
        if d.exists():
            raise SystemExit(f"fault_soak.py: error: --work {work} already holds {d.name}/")
    straight = launch(
        0, run_flags(pair, args.steps, args.layout, straight_save, straight_metrics), work,
        straight_save, None, args.hang_after,
    )  # fmt: skip
    launches = []
    flags = run_flags(pair, args.steps, args.layout, soak_save, soak_metrics)
    number, step_s = 1, straight.step_s()
    print(f"  a step takes {step_s:.2f} s (the straight run's median)", flush=True)
    while True:
        fault = plan[number - 1] if number <= len(plan) else None
        after, delay = 0, 0.0
        if fault is not None:  # two steps for this fault and each later one: one logged, one to
            # land in (a launch logs at least one step before its fault fires)
            room = args.steps - latest(soak_save) - 2 * (len(plan) - number + 1) + 1
            after, delay = max(1, min(fault.after_steps, room)), fault.delay_steps * step_s
        result = launch(number, flags, work, soak_save, fault, args.hang_after, after, delay)
        launches.append(result)
        print(row(result), flush=True)
        if result.hung or fault is None:
            break
        if fault is not None and result.outcome.startswith("not fired"):
            break
        number += 1
    return report(args, straight, launches, straight_save, soak_save, straight_metrics,
                  soak_metrics)  # fmt: skip


HEADER = (
    f"{'launch':>6}  {'fault':<44} {'what was done':<44} {'exit (ranks)':>12} {'iters':>9} "
    f"{'s':>6} {'orph':>4} {'tb':>3}"
)


def row(r: Launch) -> str:
    fault = str(r.fault) if r.fault else "-"
    iters = f"{r.start_iteration}->{r.end_iteration}"
    ranks = ",".join(str(r.codes.get(rank, "?")) for rank in range(2))
    code = "HANG" if r.hung else f"{r.returncode} ({ranks})"
    return (f"{r.number:>6}  {fault:<44.44} {r.outcome:<44.44} {code:>12} {iters:>9} "
            f"{r.seconds:>6.1f} {r.orphans:>4} {r.tracebacks:>3}")  # fmt: skip


def report(args, straight, launches, straight_save, soak_save, straight_metrics, soak_metrics):
    problems = []
    time.sleep(5)  # after the last launch: does anything of any launch still run?
    late = {r.number: marked(r.mark) for r in [straight, *launches]}
    for pids in late.values():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    print("\n" + HEADER)
    for r in [straight, *launches]:
        print(row(r))
        if r.hung:
            problems.append(f"launch {r.number} hung (> {args.hang_after:.0f} s)")
        if r.orphans:
            problems.append(f"launch {r.number} left {r.orphans} processes")
        if late[r.number]:
            problems.append(f"launch {r.number}: {len(late[r.number])} processes after the last")
        if r.fault is not None and 0 <= r.steps_at_fault < 1:
            problems.append(f"launch {r.number}: the fault landed before a step was logged")
        want = expected_codes(r)
        if want is not None and r.codes != want:
            problems.append(f"launch {r.number}: ranks exited {r.codes}, expected {want}")
            if r.lingered:
                problems.append(f"where the ranks waited {LINGER_S:g} s after it:\n{r.lingered}")
        if r.fault is not None and r.fault.kind == "sigterm" and want is not None:
            if "exit signal: saved iteration" not in r.rank_out:  # (torchrun itself exits 1)
                problems.append(f"launch {r.number}: SIGTERM did not save (exit {r.returncode})")
        if r.tracebacks:
            problems.append(f"launch {r.number}: a rank printed a traceback")
        if len(r.rank_lines) > 1:
            problems.append(f"launch {r.number}: {len(r.rank_lines)} lines on the ranks' stderr")
    if straight.returncode != 0:
        problems.append(f"the straight run exited {straight.returncode}")
    fired = sum(
        1
        for r in launches
        if r.fault is not None and not r.outcome.startswith("not") and r.steps_at_fault >= 1
    )
    if fired < args.faults:
        problems.append(f"{fired} of {args.faults} faults fired")
    last = launches[-1]
    if last.returncode != 0 or latest(soak_save) != args.steps:
        problems.append(f"the soak ended at iteration {latest(soak_save)}, exit {last.returncode}")
    tensors = 0
    if not problems or latest(soak_save) == args.steps == latest(straight_save):
        a = checkpoint_state(straight_save / f"iter_{args.steps:07d}")
        b = checkpoint_state(soak_save / f"iter_{args.steps:07d}")
        tensors = sum(1 for v in a.values() if hasattr(v, "shape"))
        diff = differences(a, b)
        if diff:
            problems.append(f"final checkpoints differ at {len(diff)} places: {diff[:3]}")
    rows_a, rows_b = metric_rows(straight_metrics), metric_rows(soak_metrics)
    steps = [r["step"] for r in rows_b]
    if steps != list(range(1, args.steps + 1)):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        miss = sorted(set(range(1, args.steps + 1)) - set(steps))
        problems.append(f"metrics steps: duplicates {dup}, missing {miss}")
    elif [stable(r) for r in rows_a] != [stable(r) for r in rows_b]:
        problems.append("metrics rows differ from the straight run's")
    left = temporaries(soak_save, straight_save, soak_metrics.parent)
    if left:
        problems.append(f"temporaries left: {[p.name for p in left]}")
    print(
        f"\nfaults fired {fired}/{args.faults}; launches {len(launches)}; final checkpoint: "
        f"{tensors} tensors and the common state compared bit for bit; metrics rows {len(rows_b)} "
        f"(steps 1..{args.steps} once each: {steps == list(range(1, args.steps + 1))}); "
        f"orphans {sum(r.orphans for r in launches)} (after the last launch "
        f"{sum(len(p) for p in late.values())}); temporaries {len(left)}; "
        f"hangs {sum(r.hung for r in launches)}"
    )
    for p in problems:
        print(f"FAIL: {p}")
    print("PASS" if not problems else "FAILED", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
