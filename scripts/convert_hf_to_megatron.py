"""Convert a Hugging Face Qwen3 / Qwen3-MoE / Llama checkpoint to a Megatron dist checkpoint.

One process, no torchrun; the checkpoint loads at any TP/PP layout afterwards (and a Qwen3-MoE's
at any TP x EP x PP):

    python scripts/convert_hf_to_megatron.py --hf-dir Qwen3-0.6B-Base --save ckpt/qwen3-0.6b
    python scripts/convert_hf_to_megatron.py --hf-dir DIR --gguf-file model.Q4_1.gguf --save OUT

The output directory also holds the tokenizer (tokenizer/) and megatron_opd.json (architecture,
vocabulary padding, original config), so training and export need nothing else.
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


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="convert_hf_to_megatron.py", description=__doc__)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--save", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--dtype", choices=sorted(convert.DTYPES), default="bf16")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --hf-dir to read")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer to store instead of the one in --hf-dir"
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by", type=int, default=convert.DEFAULT_VOCAB_DIVISOR
    )
    args = parser.parse_args(argv)
    cli.check_numbers(parser, args, {"--make-vocab-size-divisible-by": cli.at_least(1)})
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    with torch.no_grad():  # scoped: tests call main() in-process
        out = convert.import_hf(
            args.hf_dir,
            args.save,
            dtype=convert.DTYPES[args.dtype],
            gguf_file=args.gguf_file,
            tokenizer_path=args.tokenizer,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        )
    print(f"wrote {out} in {time.time() - start:.1f} s", flush=True)


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes that re-import __main__
    cli.run(main, "convert_hf_to_megatron.py")
