"""The same run on every supported Megatron-Core: figures recorded once (``tests/golden``,
on 0.16.1) and checked on the stack under test, and checkpoints across versions.

* the tiny run's losses, grad norms and reward statistics within 1e-5 of the golden figures, and
  its sampled rollouts and the student's greedy tokens equal to them, token for token;
* a checkpoint written by each version is resumed into steps 2 and 3 of the same figures by every
  version that can read it, and refused in one line naming both versions, before any model is
  built, by one that cannot (0.16 reads no checkpoint of 0.17+).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from make_golden import KEYS, golden_run, greedy_tokens, run_flags  # noqa: E402
from opd_setup import make_pair, read_metrics, torchrun  # noqa: E402

from megatron_opd import compat  # noqa: E402

REL = 1e-5


@pytest.fixture(scope="module")
def golden():
    return json.loads((GOLDEN / "golden.json").read_text())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("golden"))


def _assert_steps(got: list[dict], want: list[dict], steps) -> None:
    by_step = {row["step"]: row for row in got}
    assert sorted(by_step) == list(steps)
    for s in steps:
        for key in KEYS:
            assert by_step[s][key] == pytest.approx(want[s - 1][key], rel=REL, abs=1e-7), (s, key)


@pytest.mark.slow
def test_the_golden_run(pair, golden, tmp_path):
    """Greedy tokens, sampled rollouts, losses, rewards and grad norms of the recorded run."""
    assert greedy_tokens(pair["student"]) == golden["greedy"]
    run = golden_run(pair, tmp_path)
    assert run["sampled"] == golden["sampled"]  # the project's own sampler on every version
    _assert_steps(run["steps"], golden["steps"], [1, 2, 3])
    meta = json.loads((run["save"] / "iter_0000001" / "megatron_opd.json").read_text())
    assert meta["megatron_core"] == compat.megatron_core_version()


def _checkpoints() -> list[Path]:
    return sorted(GOLDEN.glob("ckpt-*"))


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", _checkpoints(), ids=lambda p: p.name)
def test_checkpoints_across_versions(pair, golden, ckpt, tmp_path):
    written = ckpt.name.removeprefix("ckpt-")
    save = tmp_path / "save"
    shutil.copytree(ckpt, save)
    metrics = tmp_path / "metrics.jsonl"
    flags = run_flags(pair, "--save", str(save), "--metrics-file", str(metrics))
    readable = (save / "iter_0000001" / "common.pt").exists() or (
        compat.versions.reads_common_state_from_distcp()
    )
    if readable:
        torchrun(1, flags)
        _assert_steps(read_metrics(metrics), golden["steps"], [2, 3])
        return
    proc = torchrun(1, flags, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "megatron-core" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert written in errors[0] and compat.megatron_core_version() in errors[0]
    # torchrun adds its own ChildFailedError summary; no traceback comes from a rank of ours
    assert "--save" in errors[0] and "megatron_opd/" not in proc.stderr.replace(errors[0], "")
    assert not metrics.exists()  # refused before the run started
