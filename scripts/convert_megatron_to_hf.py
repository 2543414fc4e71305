"""Export a Megatron checkpoint written by this project to a Hugging Face model directory.

One process, no torchrun, whatever TP/PP (EP) layout the checkpoint was saved at:

    python scripts/convert_megatron_to_hf.py --load ckpt/student --save hf/student

Writes config.json, generation_config.json, safetensors weights (sharded above --max-shard-size,
with model.safetensors.index.json) and the tokenizer files; transformers' from_pretrained reads
the directory as it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from megatron_opd.runtime import cli  # noqa: E402

cli.quiet()
import torch  # noqa: E402

from megatron_opd.models import convert  # noqa: E402
from megatron_opd.runtime import checkpointing, integrity  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="convert_megatron_to_hf.py", description=__doc__)
    parser.add_argument("--load", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--save", required=True, help="output Hugging Face directory")
    parser.add_argument(
        "--dtype", choices=sorted(convert.DTYPES), default=None, help="default: as saved"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer to write instead of the checkpoint's"
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    source = checkpointing.resolve_checkpoint(args.load)  # a run's root: its latest iteration
    integrity.verify(source, "--load")
    with torch.no_grad():  # scoped: tests call main() in-process
        out = convert.export_hf(
            source,
            args.save,
            dtype=convert.DTYPES[args.dtype] if args.dtype else None,
            max_shard_size=convert.parse_size(args.max_shard_size),
            tokenizer_path=args.tokenizer,
        )
    print(f"wrote {out} in {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":  # the dist-checkpoint reader may spawn processes that re-import __main__
    cli.run(main, "convert_megatron_to_hf.py")
