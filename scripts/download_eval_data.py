"""Fetch the paper's seven evaluation sets (and DeepScaleR) from the Hugging Face hub.

    pip install datasets && python scripts/download_eval_data.py --out data/

Writes ``{problem, answer}`` jsonl per benchmark (GSM8K keeps its ``{question, answer}`` form with
the gold after ``#### ``) and DeepScaleR as a JSON list: the formats ``megatron_opd.training.data``
reads. Each file is read back through those readers before it is kept. Needs network access to the
hub; this project's CI cannot run it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from megatron_opd.training.data import BOXED_INSTRUCTION, load_problems

# name: (dataset, config, split, problem field, answer field)
SOURCES = {
    "aime24": ("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "aime25": ("math-ai/aime25", None, "test", "problem", "answer"),
    "amc2023": ("math-ai/amc23", None, "test", "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "minervamath": ("math-ai/minervamath", None, "test", "question", "answer"),
    "olympiadbench": ("math-ai/olympiadbench", None, "test", "question", "final_answer"),
    "gsm8k": ("openai/gsm8k", "main", "test", "question", "answer"),
    "deepscaler_math": (
        "agentica-org/DeepScaleR-Preview-Dataset",
        None,
        "train",
        "problem",
        "answer",
    ),
}


def _answer(value) -> str:
    if isinstance(value, list):  # OlympiadBench stores a list of final answers
        value = value[0] if len(value) == 1 else ", ".join(map(str, value))
    return str(value).strip().strip("$")


def fetch(name: str, out: Path) -> Path:
    from datasets import load_dataset

    repo, config, split, pkey, akey = SOURCES[name]
    rows = load_dataset(repo, config, split=split)
    if name == "gsm8k":
        items = [{"question": r[pkey], "answer": r[akey]} for r in rows]
        text = "".join(json.dumps(i) + "\n" for i in items)
        path = out / f"{name}.jsonl"
    elif name == "deepscaler_math":
        items = [{"problem": r[pkey], "answer": _answer(r[akey])} for r in rows]
        text = json.dumps(items, indent=2)
        path = out / f"{name}.json"
    else:
        items = [
            {"problem": f"{r[pkey].rstrip()}\n{BOXED_INSTRUCTION}", "answer": _answer(r[akey])}
            for r in rows
        ]
        text = "".join(json.dumps(i) + "\n" for i in items)
        path = out / f"{name}.jsonl"
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    tmp.write_text(text)
    load_problems(tmp)  # the project's own readers must accept it
    os.replace(tmp, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="*", choices=sorted(SOURCES), default=None)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or SOURCES:
        path = fetch(name, args.out)
        print(f"{name}: {len(load_problems(path))} problems -> {path}")


if __name__ == "__main__":
    main()
