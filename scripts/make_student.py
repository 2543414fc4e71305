"""Make a smaller student from a Megatron checkpoint by keeping a subset of its layers.

    python scripts/make_student.py --load ckpt/teacher --save ckpt/student --num-layers 8

The student keeps the teacher's embedding, final norm and output layer and the chosen transformer
layers (the first ``--num-layers`` by default, or ``--layers 0,2,4,...``), so it starts out
speaking the teacher's vocabulary and only has to relearn what the dropped layers did. One
process, TP1; the result loads at any TP/PP layout and carries the tokenizer and metadata.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_opd.runtime import cli  # noqa: E402

cli.quiet()

import torch  # noqa: E402

from megatron_opd.models import convert, gpt  # noqa: E402
from megatron_opd.models.tokenizer import CHECKPOINT_TOKENIZER_DIR  # noqa: E402
from megatron_opd.runtime import checkpointing, distributed, integrity  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="make_student.py", description=__doc__)
    p.add_argument("--load", required=True, help="source (teacher) Megatron checkpoint")
    p.add_argument("--save", required=True)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--num-layers", type=int, help="keep the first N layers")
    group.add_argument("--layers", type=str, help="comma-separated layer indices to keep")
    return p.parse_args(argv)


def chosen_layers(args, total: int) -> list[int]:
    if args.num_layers is not None:
        if not 1 <= args.num_layers <= total:
            raise ValueError(f"--num-layers must be in [1, {total}], got {args.num_layers}")
        return list(range(args.num_layers))
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    if not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"--layers must be distinct indices in [0, {total}), got {args.layers}")
    return layers


def _copy_layers(student: torch.nn.Module, teacher_params: dict, keep: list[int]) -> None:
    """Student layer i takes teacher layer keep[i]; everything else is copied by name."""
    for name, param in student.named_parameters():
        src = name
        if name.startswith("decoder.layers."):
            index, rest = name[len("decoder.layers.") :].split(".", 1)
            src = f"decoder.layers.{keep[int(index)]}.{rest}"
        param.copy_(teacher_params[src])


def main(argv=None) -> None:
    args = parse_args(argv)
    source = checkpointing.resolve_checkpoint(args.load)
    integrity.verify(source, "--load")
    arch, meta = convert.read_checkpoint(source)
    keep = chosen_layers(args, arch.num_hidden_layers)

    grid = distributed.initialize(distributed.ParallelConfig()).grid
    try:
        teacher, _ = convert.load_checkpoint_model(source, grid)
        teacher_params = dict(teacher[0].named_parameters())
        student_arch = copy.deepcopy(arch)
        student_arch.num_hidden_layers = len(keep)
        config = gpt.transformer_config(
            student_arch, dtype=teacher[0].config.params_dtype, perform_initialization=False
        )
        divisor = meta.get("make_vocab_size_divisible_by", 128)
        student = gpt.build_model(student_arch, config, grid, divisor)
        with torch.no_grad():
            _copy_layers(student[0], teacher_params, keep)
        del teacher, teacher_params

        new_meta = copy.deepcopy(meta)
        new_meta["arch"] = student_arch.to_dict()
        hf = new_meta.get("hf_config") or {}
        hf["num_hidden_layers"] = len(keep)
        if "layer_types" in hf:
            hf["layer_types"] = [hf["layer_types"][i] for i in keep]
        new_meta["source"] = f"layers {keep} of {source}"

        def add_tokenizer(tmp: Path) -> None:
            shutil.copytree(source / CHECKPOINT_TOKENIZER_DIR, tmp / CHECKPOINT_TOKENIZER_DIR)

        checkpointing.atomic_save(
            checkpointing.model_sharded_state_dict(student), args.save, new_meta, add_tokenizer
        )
        print(f"wrote {args.save}: layers {keep} of {arch.num_hidden_layers}", flush=True)
    finally:
        distributed.teardown()


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes that re-import __main__
    cli.run(main, "make_student.py")
