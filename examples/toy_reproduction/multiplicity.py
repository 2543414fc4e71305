"""Holm-adjusted conclusions beside the raw ones, and the head-to-head differences among the bounded
rewards, from a comparison's ``results.json`` (issue 30).

    python examples/toy_reproduction/multiplicity.py docs/reproduction/compare18/results.json

writes ``multiplicity.json`` and ``multiplicity.md`` beside it. ``compare.py`` adds the same to
every new run's results.

Families, each adjusted on its own with Holm's step-down method (``stats.holm``; the chance of
any false call within a family stays at most 5%, whatever the dependence between its tests):

* accuracy against vanilla: every other method (7 in the 18-seed run);
* accuracy against full-vocab KL: every other method (7);
* each divergence yardstick against each baseline: every method x the 5 divergences (35 each);
* head to head among the bounded rewards (PowerOPD alpha 1, 5, 50, TROPD, sign, clip), accuracy:
  the 15 pairs.

A p-value is the one that belongs to the reported interval (``stats.p_value``: the same mean,
standard error and Satterthwaite degrees of freedom). The head-to-head differences use the runs'
per-problem data when the results hold it (``head_to_head`` in results.json, written by
``compare.py`` since issue 30: paired over seeds and problems, the same seed's runs on the same
problems). The 18-seed run of 2026-12-05 kept only each interval, not the per-run data, so for it
the differences are bounds (``stats.difference_bound``): the centre is exact (a difference of two
paired means over the same seeds and problems), the width is the widest the two intervals against
vanilla allow (correlation -1).
"""

from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import stats  # noqa: E402

BASELINES = ("vanilla", "full_vocab_kl")
BOUNDED = ("power_1", "power_5", "power_50", "tropd", "sign", "clip")
DIVERGENCES = ("kl", "tv", "power_div_1", "power_div_5", "power_div_50")
LEVEL = 0.95


def _call(iv: dict, higher_is_better: bool, p: float) -> str:
    if p >= 1 - LEVEL:
        return "not resolved"
    return "better" if (iv["mean"] > 0) == higher_is_better else "worse"


def adjust(family: dict[str, dict], higher_is_better: bool) -> dict[str, dict]:
    """Each interval of one family with its p-value, its Holm-adjusted p-value, and the raw and
    the adjusted verdict."""
    names = list(family)
    ps = [stats.p_value(family[n]["mean"], family[n]["half_width"], family[n]["df"]) for n in names]
    out = {}
    for name, p, p_holm in zip(names, ps, stats.holm(ps), strict=True):
        iv = family[name]
        out[name] = {
            **{k: iv[k] for k in ("mean", "half_width", "low", "high", "df")},
            "p": p,
            "p_holm": p_holm,
            "verdict": _call(iv, higher_is_better, p),
            "verdict_holm": _call(iv, higher_is_better, p_holm),
        }
        if "source" in iv:
            out[name]["source"] = iv["source"]
    return out


def bounded_pairs(methods: dict) -> list[tuple[str, str]]:
    present = [m for m in BOUNDED if "accuracy" in methods.get(m, {})]
    return list(combinations(present, 2))


def head_to_head_bounds(methods: dict) -> dict[str, dict]:
    """Accuracy, a - b for every pair of bounded rewards, from the intervals against vanilla only
    (``stats.difference_bound``)."""
    out = {}
    for a, b in bounded_pairs(methods):
        iv = stats.difference_bound(
            methods[a]["accuracy"]["vs_vanilla"], methods[b]["accuracy"]["vs_vanilla"], LEVEL
        )
        out[f"{a} - {b}"] = {**iv, "source": "bound from the two intervals against vanilla"}
    return out


def conclusions(results: dict) -> dict[str, dict]:
    """Every family of ``results`` (a comparison's results.json), adjusted."""
    methods = results["methods"]
    ok = {m: e for m, e in methods.items() if "accuracy" in e}
    families: dict[str, dict] = {}
    for b in BASELINES:
        acc = {m: e["accuracy"][f"vs_{b}"] for m, e in ok.items() if f"vs_{b}" in e["accuracy"]}
        families[f"accuracy vs {b}"] = adjust(acc, higher_is_better=True)
    for b in BASELINES:
        div = {
            f"{m} {key}": e[key][f"vs_{b}"]
            for m, e in ok.items()
            for key in DIVERGENCES
            if f"vs_{b}" in e.get(key, {})
        }
        families[f"divergences vs {b}"] = adjust(div, higher_is_better=False)
    paired = results.get("head_to_head", {}).get("accuracy")
    if paired:
        h2h = {
            name: dict(iv, source="paired over seeds and problems") for name, iv in paired.items()
        }
    else:
        h2h = head_to_head_bounds(ok)
    families["accuracy head to head (bounded rewards)"] = adjust(h2h, higher_is_better=True)
    return families


def _p(p: float) -> str:
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def markdown(families: dict[str, dict]) -> str:
    lines = [
        "## Holm-adjusted conclusions (issue 30)",
        "",
        "Each family is adjusted on its own (Holm's step-down method); p is the two-sided p-value "
        "of the reported 95% interval (same mean, standard error and degrees of freedom); a "
        "verdict needs p < 0.05, the adjusted one p_Holm < 0.05.",
    ]
    for name, family in families.items():
        if not family:
            continue
        sources = sorted({e.get("source", "") for e in family.values()} - {""})
        lines += ["", f"### {name} ({len(family)} tests)", ""]
        if sources:
            lines += [f"Intervals: {'; '.join(sources)}.", ""]
        lines += [
            "| comparison | mean ± 95% half-width | p | p (Holm) | verdict | verdict (Holm) |"
        ]
        lines += ["|---|---:|---:|---:|---|---|"]
        digits = 1 if name.startswith("accuracy") else 4
        for comp, e in family.items():
            lines.append(
                f"| {comp} | {e['mean']:+.{digits}f} ± {e['half_width']:.{digits}f} | {_p(e['p'])} "
                f"| {_p(e['p_holm'])} | {e['verdict']} | {e['verdict_holm']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: multiplicity.py RESULTS_JSON")
    path = Path(argv[0])
    families = conclusions(json.loads(path.read_text()))
    (path.parent / "multiplicity.json").write_text(json.dumps(families, indent=1) + "\n")
    (path.parent / "multiplicity.md").write_text(markdown(families))
    print(markdown(families))
    return families


if __name__ == "__main__":
    main()
