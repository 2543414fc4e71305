"""Tiny teacher/student checkpoints and a tiny real tokenizer for end-to-end OPD runs.

Everything is built here: a BPE tokenizer trained on the built-in prompt set (ChatML template),
random Qwen3 models made by ``transformers`` and converted with the project's own converter.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from megatron_opd.models.tiny import convert_hf_checkpoint, save_bpe_tokenizer, save_hf_qwen3
from megatron_opd.runtime.distributed import standalone_env

ROOT = Path(__file__).resolve().parents[1]


# a short OPD run on the tiny pair: 8 responses of <= 10 tokens a step
SHORT_RUN = [
    "--opd-alpha", "0.5",
    "--global-batch-size", "8",
    "--micro-batch-size", "1",
    "--lr", "1e-3",
    "--lr-warmup-fraction", "0",
    "--rollout-max-new-tokens", "10",
    "--max-prompt-length", "160",
    "--seed", "7",
]  # fmt: skip


def perturb_hf(src: Path, dst: Path, noise: float, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model.save_pretrained(str(dst))


def convert(hf_dir: Path, out: Path) -> None:
    """The project's converter in its own process (it initializes Megatron at TP1)."""
    convert_hf_checkpoint(hf_dir, out)


def make_nan_teacher(pair: dict, out: Path) -> Path:
    """``pair``'s teacher with its final norm's weights NaN, converted to ``out``: every logit
    it gives is NaN."""
    import shutil

    from transformers import AutoModelForCausalLM

    hf = pair["teacher"].parent / "hf_teacher"
    model = AutoModelForCausalLM.from_pretrained(str(hf))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    nan_hf = out.parent / f"hf_{out.name}"
    model.save_pretrained(str(nan_hf))
    for f in hf.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, nan_hf / f.name)
    convert(nan_hf, out)
    return out


_BUILT: dict[tuple, Path] = {}  # make_pair's arguments -> the pair built once in this process


def make_pair(
    root: Path,
    student_layers: int = 2,
    perturbed_copy: bool = False,
    scale: float = 0.25,
    noise: float = 0.25,
) -> dict:
    """``root/teacher`` and ``root/student`` Megatron checkpoints sharing ``root/tokenizer``.

    ``perturbed_copy``: the student is the teacher (same shape) plus Gaussian noise; otherwise a
    ``student_layers``-layer random model beside a 4-layer teacher. Built once per process and
    arguments (seeded, so every build is the same bytes) into a directory no test touches, and
    copied to ``root``: each module still gets a pair of its own.
    """
    key = (student_layers, perturbed_copy, scale, noise)
    if key not in _BUILT:
        built = Path(tempfile.mkdtemp(prefix="opd_pair_"))
        atexit.register(shutil.rmtree, built, ignore_errors=True)
        _build_pair(built, *key)
        _BUILT[key] = built
    shutil.copytree(_BUILT[key], root, dirs_exist_ok=True)
    return {"teacher": root / "teacher", "student": root / "student",
            "vocab_size": _vocab_size(root / "tokenizer")}  # fmt: skip


def _vocab_size(tok_dir: Path) -> int:
    return len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 3


def _build_pair(
    root: Path, student_layers: int, perturbed_copy: bool, scale: float, noise: float
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = root / "tokenizer"
    save_bpe_tokenizer(tok_dir)
    vocab_size = _vocab_size(tok_dir)
    hf_teacher, hf_student = root / "hf_teacher", root / "hf_student"
    t_layers = student_layers if perturbed_copy else 4
    save_hf_qwen3(hf_teacher, t_layers, seed=1, vocab=vocab_size, scale=scale)
    if perturbed_copy:
        perturb_hf(hf_teacher, hf_student, noise=noise, seed=2)
    else:
        save_hf_qwen3(hf_student, student_layers, seed=2, vocab=vocab_size, scale=scale)
    for hf in (hf_teacher, hf_student):
        for f in tok_dir.iterdir():
            (hf / f.name).write_bytes(f.read_bytes())
    convert(hf_teacher, root / "teacher")
    convert(hf_student, root / "student")


def torchrun(nproc: int, args: list[str], timeout: int = 420, check: bool = True):
    from megatron_opd.runtime.spawn import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        str(ROOT / "scripts" / "pretrain_opd.py"),
        *args,
    ]
    env = dict(standalone_env(), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def make_teacher(
    root: Path,
    tokenizer_dir: Path,
    vocab_size: int,
    seed: int,
    layers: int = 4,
    scale: float = 0.25,
) -> Path:
    """``root/teacher`` beside an existing tokenizer: a tiny Qwen3 whose 4 heads, 4 query groups
    and 128-wide ffn split over TP 4 (``make_pair``'s teacher has 2 query groups)."""
    root.mkdir(parents=True, exist_ok=True)
    hf = root / "hf_teacher"
    save_hf_qwen3(hf, layers, seed=seed, vocab=vocab_size, scale=scale, num_key_value_heads=4)
    for f in Path(tokenizer_dir).iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    convert(hf, root / "teacher")
    return root / "teacher"


def metadata_only_checkpoint(directory: Path, tokenizer_dir: Path, **arch) -> Path:
    """A checkpoint directory holding only ``megatron_opd.json`` and the tokenizer: enough for
    every check that runs before a model is built (no weights, no converter process)."""
    from megatron_opd.models.gpt import ArchConfig
    from megatron_opd.runtime.checkpointing import META_FILE

    fields = dict(
        model_type="qwen3", vocab_size=323, hidden_size=64, intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        max_position_embeddings=512,
    )  # fmt: skip
    fields.update(arch)
    directory.mkdir(parents=True)
    meta = {"arch": ArchConfig(**fields).to_dict(), "make_vocab_size_divisible_by": 128}
    (directory / META_FILE).write_text(json.dumps(meta))
    (directory / "tokenizer").mkdir()
    for f in Path(tokenizer_dir).iterdir():
        (directory / "tokenizer" / f.name).write_bytes(f.read_bytes())
    return directory


def load_script(name: str):
    """``scripts/<name>.py`` imported as the module ``<name>`` (its functions, not its main)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
