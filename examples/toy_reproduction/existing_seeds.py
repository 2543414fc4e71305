"""What the two earlier sweeps' four seeds say, with intervals over seeds (docs/reproduction.md).

    python examples/toy_reproduction/existing_seeds.py --plot docs/reproduction/existing_seeds.png

The per-seed Avg@8 of ``run.py``'s first sweep and its re-run on a new random stream (both on the
same 64 held-out problems), as docs/reproduction.md lists them. Each method has four runs: seeds 1
and 2 on each stream. The change is taken from each stream's own start; a paired difference uses
the same seed and stream. The interval is a t interval over the four (3 degrees of freedom): the
problems are held fixed, so their share of the uncertainty is not in it. The seed-to-seed standard
deviation pooled over the pairs is the input of the sample-size estimate.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import stats  # noqa: E402

STARTS = (33.0, 29.3)  # the student's Avg@8 on each stream
# method -> ((stream 1: seed 1, seed 2), (stream 2: seed 1, seed 2))
AVG_AT_8 = {
    "vanilla": ((21.9, 24.2), (25.6, 22.3)),
    "clip": ((33.4, 23.6), (29.7, 25.0)),
    "tanh": ((29.1, 34.6), (29.7, 23.4)),
    "zscore": ((32.6, 36.1), (21.1, 29.7)),
    "full_vocab_kl": ((38.5, 47.3), (42.4, 41.0)),
    "power_0.1": ((12.7, 14.6), (14.6, 15.6)),
    "power_0.5": ((0.0, 0.2), (0.0, 0.0)),
    "power_1": ((27.9, 28.7), (23.2, 28.5)),
    "power_5": ((38.1, 40.8), (28.7, 28.9)),
    "power_50": ((28.5, 40.0), (36.7, 27.9)),
}
REFERENCES = ("vanilla", "clip", "full_vocab_kl")


def differences(method: str, reference: str | None) -> list[float]:
    out = []
    for stream, seeds in enumerate(AVG_AT_8[method]):
        for seed, value in enumerate(seeds):
            base = STARTS[stream] if reference is None else AVG_AT_8[reference][stream][seed]
            out.append(value - base)
    return out


def t_interval(xs: list[float]) -> dict:
    mean = statistics.fmean(xs)
    half = stats.t_quantile(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


def pooled_seed_sd(exclude: tuple[str, ...] = ("power_0.5",)) -> tuple[float, int]:
    """sqrt(mean squared within-pair difference / 2) over every pair of seeds on one stream."""
    sq = [(a - b) ** 2 for m, v in AVG_AT_8.items() if m not in exclude for a, b in v]
    return math.sqrt(sum(sq) / len(sq) / 2), len(sq)


def table() -> dict[str, dict]:
    out = {}
    for m in AVG_AT_8:
        entry = {"change": t_interval(differences(m, None))}
        for ref in REFERENCES:
            if ref != m:
                entry[f"vs_{ref}"] = t_interval(differences(m, ref))
        out[m] = {"accuracy": entry}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    result = table()
    sd, pairs = pooled_seed_sd()
    print(f"seed-to-seed sd of Avg@8 (64 problems), pooled over {pairs} pairs: {sd:.2f}")
    print(f"seeds for a half-width <= 3: change {stats.seeds_needed(sd, 0.0, 64, 3.0)}, "
          f"paired difference {stats.seeds_needed(sd * math.sqrt(2), 0.0, 64, 3.0)}")  # fmt: skip
    print("| method | change from the start | " + " | ".join(f"vs {r}" for r in REFERENCES) + " |")
    for m, e in result.items():
        cells = []
        for key in ("change", *(f"vs_{r}" for r in REFERENCES)):
            iv = e["accuracy"].get(key)
            if iv is None:
                cells.append("—")
                continue
            mark = "" if iv["low"] <= 0 <= iv["high"] else (" ↑" if iv["mean"] > 0 else " ↓")
            cells.append(f"{iv['mean']:+.1f} ± {iv['half_width']:.1f}{mark}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.plot:
        import compare

        note = "95% t interval over 4 seeds, problems fixed"
        print(f"plot: {compare.plot(result, args.plot.parent, 8, note, args.plot.name)}")
    return result


if __name__ == "__main__":
    main()
