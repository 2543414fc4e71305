"""Readers for the shared math sets, the built-in prompt set, grading and Avg@k / Pass@k."""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path

import pytest

from megatron_opd.evaluation import grading
from megatron_opd.training import data

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EVAL_FILES = sorted((DATA / "eval").glob("*.jsonl"))
EXPECTED_SIZES = {
    "aime24": 30,
    "aime25": 30,
    "amc2023": 40,
    "gsm8k": 1319,
    "math500": 500,
    "minervamath": 272,
    "olympiadbench": 674,
}
# Gold answers that are themselves malformed LaTeX, so no parser can read them back.
KNOWN_UNPARSEABLE = {
    ("minervamath", 72),  # 'x_{0} \cos (\omega t)+$ $\dot{x}_{0} ...': a stray "$ $" in the gold
    ("olympiadbench", 193),  # '$221,$8$': unbalanced dollars
}

needs_data = pytest.mark.skipif(not EVAL_FILES, reason="../shared/data is not beside the checkout")


@needs_data
def test_readers_on_every_file():
    for path in EVAL_FILES:
        problems = data.load_problems(path)
        assert len(problems) == EXPECTED_SIZES[path.stem], path
        assert all(p.problem.endswith(data.BOXED_INSTRUCTION) for p in problems)
        assert all(p.answer and "\\boxed" not in p.answer for p in problems)
    gsm = data.load_problems(DATA / "eval" / "gsm8k.jsonl")
    assert gsm[0].answer == "18" and gsm[0].problem.startswith("Janet")
    train = data.load_problems(DATA / "train" / "gsm8k_train.jsonl")
    assert len(train) == 7473 and all(re.fullmatch(r"-?[\d.]+", p.answer) for p in train)
    deepscaler = data.load_problems(DATA / "train" / "deepscaler_math.json")
    assert len(deepscaler) == 7474 and deepscaler[0].answer == "0"


@needs_data
def test_gold_answers_grade_themselves():
    for path in EVAL_FILES:
        problems = data.load_problems(path)
        wrong = [
            i
            for i, p in enumerate(problems)
            if not grading.grade(f"So the answer is \\boxed{{{p.answer}}}.", p.answer)
        ]
        assert {(path.stem, i) for i in wrong} <= KNOWN_UNPARSEABLE, (path.stem, wrong)
        assert len(wrong) <= 0.01 * len(problems)


@needs_data
def test_changed_answer_is_wrong():
    for path in EVAL_FILES:
        problems = data.load_problems(path)[:60]
        for p, other in zip(problems, problems[1:] + problems[:1], strict=True):
            if re.fullmatch(r"-?\d+", p.answer.strip()):
                changed = str(int(p.answer) + 1)
            elif other.answer.strip() != p.answer.strip():
                changed = other.answer  # another problem's (different) non-integer answer
            else:
                continue
            assert not grading.grade(f"\\boxed{{{changed}}}", p.answer), (path.stem, p.answer)


def test_grading_reads_the_final_boxed_answer():
    assert grading.grade("First 3+4=7, then 7*2=14. \\boxed{14}", "14")
    assert grading.grade("\\boxed{\\frac{1}{2}}", "0.5")
    assert grading.grade("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}")
    assert not grading.grade("\\boxed{3}", "3\\sqrt{13}")  # the reason gold is wrapped in $…$
    assert not grading.grade("no answer here", "14")


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k():
    assert grading.pass_at_k(8, 0, 8) == 0.0
    assert grading.pass_at_k(8, 1, 8) == 1.0
    assert grading.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    for n, c, k in [(10, 3, 4), (16, 5, 8), (9, 1, 2), (12, 11, 6)]:
        assert grading.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))
    assert grading.pass_at_k(16, 4, 8) == pytest.approx(1 - math.comb(12, 8) / math.comb(16, 8))
    with pytest.raises(ValueError, match="Pass@8 needs at least 8 samples"):
        grading.pass_at_k(4, 1, 8)


def test_score_benchmark():
    correct = [[True, False, False, False], [False] * 4, [True] * 4]
    lengths = [[10, 20, 30, 40]] * 3
    truncated = [[False, False, False, True]] * 3
    s = grading.score_benchmark("x", correct, lengths, truncated, k=2)
    assert s.avg_at_k == pytest.approx(100 * 5 / 12)
    assert s.pass_at_k == pytest.approx(100 * (0.5 + 0 + 1) / 3)
    assert s.mean_response_tokens == 25 and s.truncation_rate == 25


def test_malformed_line_and_missing_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        data.load_problems(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2"}\n')
    with pytest.raises(ValueError, match=r"missing.jsonl:3: missing key 'answer'"):
        data.load_problems(missing)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm.jsonl:1: GSM8K answer has no '#### '"):
        data.load_problems(gsm)
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"problem": "p", "answer": "1"}, {"answer": "2"}]))
    with pytest.raises(ValueError, match=r"list.json item 1: missing key 'problem'"):
        data.load_problems(lst)
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        data.load_problems(tmp_path / "nope.jsonl")


def test_builtin_problems_are_seeded_and_correct():
    a, b = data.builtin_problems(200, seed=3), data.builtin_problems(200, seed=3)
    assert a == b and a != data.builtin_problems(200, seed=4)
    for p in a:
        nums = [int(x) for x in re.findall(r"\d+", p.problem.split("\n")[0])]
        ans = int(p.answer)
        text = p.problem
        if "buys" in text and "more" in text:
            assert ans == nums[0] + nums[1]
        elif "gives" in text:
            assert ans == nums[0] - nums[1]
        elif "boxes" in text:
            assert ans == nums[0] * nums[1]
        elif "shares" in text:
            assert ans * nums[1] == nums[0]
        else:
            assert ans == nums[0] * nums[1] - nums[2]
        assert grading.grade(f"\\boxed{{{p.answer}}}", p.answer)


def test_prompt_stream_resumes_exactly():
    straight = data.PromptStream(size=7, seed=5)
    expected = straight.take(20)
    first = data.PromptStream(size=7, seed=5)
    got = first.take(9)
    resumed = data.PromptStream(size=7, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert got + resumed.take(11) == expected
    assert sorted(expected[:7]) == list(range(7))  # each epoch is a permutation
    with pytest.raises(ValueError, match="use the same --prompt-data and --seed"):
        data.PromptStream(size=8, seed=5).load_state_dict(first.state_dict())
