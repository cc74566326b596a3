"""Rewards: countdown parser and scores, boxed-answer math via math-verify, delegation to verl."""

from __future__ import annotations

import errno
import math
import multiprocessing
import sys
import threading
import time
from typing import Any

import numpy as np
import psutil
import pytest

from verl_anchor.rewards import compute_score, math_verify_pool
from verl_anchor.rewards.boxed_math import last_boxed
from verl_anchor.rewards.countdown import MAX_ANSWER_CHARS, last_answer, parse_equation, score_countdown
from verl_anchor.rewards.math_verify_pool import (
    ATTEMPTS,
    MAX_TIMEOUT_S,
    MathVerifier,
    MathVerifyUnavailable,
    check_timeout,
)

# (7 - 5) * 3 * 2 = 12, checked by hand.
GT = {"target": 12, "numbers": [3, 5, 7, 2]}


def cd(answer: str, gt: dict = GT) -> float:
    return compute_score("countdown", f"Let me think.\n<answer>{answer}</answer>", gt)


# ---------------------------------------------------------------------------------------------
# Countdown


@pytest.mark.parametrize(
    "answer",
    [
        "(7 - 5) * 3 * 2",
        " (7-5)*3*2 ",
        "2 * 3 * (7 - 5)",
        "(7 - 5)\n* 3 * 2",  # newlines inside the answer
        "((((7 - 5)))) * 3 * 2",
        "(7 - 5) * 3 * 2 = 12",  # "= target" accepted
    ],
)
def test_countdown_correct(answer: str) -> None:
    assert cd(answer) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "(7 + 5) * 3 * 2",  # 72: wrong value
        "(7 - 5) * 3 * 2 = 13",  # right side is not the target
        "7 + 5 + 3 + 2 = 12",  # left side is 17
        "(7 - 5) * 3 * 3",  # 3 reused, 2 missing
        "(7 - 5) * 3",  # 2 missing
        "(7 - 5) * 3 * 2 * 1",  # extra number (value still 12)
        "(7 - 5) * 6",  # 6 is not a given number
        "3 / (7 - 5 - 2)",  # division by zero
    ],
)
def test_countdown_well_formed_but_wrong(answer: str) -> None:
    assert cd(answer) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "twelve",
        "12 = (7 - 5) * 3 * 2",  # right side must be a plain integer
        "(7 - 5) * 3 * 2 = 12 = 12",
        "(7 - 5) * 3 * 2.0",  # floats are not in the grammar
        "(7 - 05) * 3 * 2",  # leading zero: not a Python integer literal
        "(7 - 5) × 3 × 2",
        "(7 - 5 * 3 * 2",  # unbalanced
        "7 // 5 + 3 + 2",
        "+7 - 5 + 3 * 2",  # unary plus is not in the whitelist
        "7(5) + 3 + 2",  # a call on an int literal
        "()",
        "1_2",
        "\\frac{7-5}{1} * 3 * 2",
    ],
)
def test_countdown_malformed(answer: str) -> None:
    assert cd(answer) == 0.0


@pytest.mark.parametrize(
    "hostile",
    [
        "__import__('os').system('echo hi')",
        "(1).__class__.__bases__[0].__subclasses__()",
        "open('/etc/passwd').read()",
        "x + y",
        "9**9**9**9",
        "10**100000",
        "2 ** 3 ** 4 * 5",
        "(" * 100_000 + "7" + ")" * 100_000,
        "-" * 100_000 + "7",
        "9" * 10_000,
    ],
)
def test_countdown_hostile_answers_score_zero_fast(hostile: str, capfd: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    assert cd(hostile) == 0.0
    assert time.perf_counter() - start < 0.5
    assert "hi" not in capfd.readouterr().out  # nothing was executed


def test_countdown_parser_whitelist_rejects_power_and_calls() -> None:
    for text in ["2**3", "7(5)", "7 // 2", "7 % 2", "+7"]:
        with pytest.raises(ValueError):
            parse_equation(text)
    tree, literals, rhs = parse_equation("-(3 + 5) * 2 = 16")
    assert sorted(literals) == [2, 3, 5] and rhs == 16


def test_countdown_answer_length_cap() -> None:
    inside_cap = "(" * 60 + "7 - 5" + ")" * 60 + " * 3 * 2"
    assert len(inside_cap) <= MAX_ANSWER_CHARS and cd(inside_cap) == 1.0
    padded = "(7 - 5) * 3 * 2" + " " * MAX_ANSWER_CHARS
    assert cd(padded) == 1.0  # surrounding whitespace is stripped before the cap applies
    assert cd("(7 - 5) * 3 *" + " " * MAX_ANSWER_CHARS + "2") == 0.0


def test_countdown_exact_rational_arithmetic() -> None:
    assert cd("2 / 3 * 3", {"target": 2, "numbers": [2, 3, 3]}) == 1.0
    assert cd("6 / (1 - 3 / 4)", {"target": 24, "numbers": [1, 3, 4, 6]}) == 1.0  # 6 / (1/4)
    assert cd("1 / 3 + 1 / 3 + 1 / 3", {"target": 1, "numbers": [1, 1, 1, 3, 3, 3]}) == 1.0
    assert cd("7 / 2", {"target": 3, "numbers": [7, 2]}) == pytest.approx(0.1)  # 3.5, no rounding
    assert cd("-3 + 5", {"target": 2, "numbers": [3, 5]}) == 1.0  # unary minus allowed


def test_countdown_last_answer_tag_wins() -> None:
    right, wrong = "<answer>(7 - 5) * 3 * 2</answer>", "<answer>7 + 5 + 3 + 2</answer>"
    assert compute_score("countdown", f"{wrong} no wait {right}", GT) == 1.0
    assert compute_score("countdown", f"{right} hmm {wrong}", GT) == pytest.approx(0.1)
    # an unterminated tag after a complete one: the last complete pair counts
    assert compute_score("countdown", f"{right} <answer>7 + 5", GT) == 1.0
    assert last_answer("<answer>a<answer>b</answer>") == "b"
    for no_answer in ["(7 - 5) * 3 * 2", "<answer>(7 - 5) * 3 * 2", "(7 - 5) * 3 * 2</answer>", "</answer><answer>"]:
        assert compute_score("countdown", no_answer, GT) == 0.0


def test_countdown_huge_response() -> None:
    filler = "I will try another combination. " * 32_000  # ~1 MB
    assert len(filler) > 1_000_000
    start = time.perf_counter()
    assert compute_score("countdown", filler + "<answer>(7 - 5) * 3 * 2</answer>", GT) == 1.0
    assert compute_score("countdown", "<answer>" + filler + "</answer>", GT) == 0.0
    assert compute_score("countdown", filler, GT) == 0.0
    assert time.perf_counter() - start < 1.0


def test_countdown_ground_truth_forms() -> None:
    answer = "<answer>(7 - 5) * 3 * 2</answer>"
    # as read back from parquet: numpy integers and arrays
    assert score_countdown(answer, {"target": np.int64(12), "numbers": np.array([3, 5, 7, 2])}) == 1.0
    assert score_countdown(answer, '{"target": 12, "numbers": [3, 5, 7, 2]}') == 1.0
    assert score_countdown("<answer>(7 - 5) * 3</answer>", GT, format_score=0.0) == 0.0
    with pytest.raises(TypeError):
        score_countdown(answer, 12)


# ---------------------------------------------------------------------------------------------
# Math (math-verify)


def test_last_boxed_extraction() -> None:
    assert last_boxed("so \\boxed{72}.") == "72"
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, \\{2\\}\\}}") == "\\{1, \\{2\\}\\}"
    assert last_boxed("\\boxed{{a}^{2}+\\sqrt{b_{1}}}") == "{a}^{2}+\\sqrt{b_{1}}"
    assert last_boxed("first \\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("$\\boxed 5$.") == "5"
    assert last_boxed("\\boxed{unclosed {x}") is None
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{" + "1" * 5000 + "}") is None  # longer than MAX_BOXED_CHARS


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        ("The answer is \\boxed{72}.", "72"),
        ("\\boxed{ 72 }", "72"),
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\dfrac{3}{6}}", "\\frac12"),
        ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}"),
        ("first guess \\boxed{70}, corrected: \\boxed{72}", "72"),
        ("\\boxed{72}", 72),  # a numeric ground truth
    ],
)
def test_math_equivalent(response: str, truth: object) -> None:
    assert compute_score("verl_anchor/math500", response, truth) == 1.0


@pytest.mark.parametrize(
    ("response", "truth"),
    [
        ("\\boxed{73}", "72"),
        ("The answer is 72.", "72"),  # no \boxed{}
        ("\\boxed{}", "72"),
        ("\\boxed{72} no wait \\boxed{71}", "72"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
    ],
)
def test_math_wrong(response: str, truth: str) -> None:
    assert compute_score("verl_anchor/gsm8k", response, truth) == 0.0


def test_math_timeout_kills_worker_and_recovers() -> None:
    start = time.perf_counter()
    assert compute_score("verl_anchor/aime24", "\\boxed{9^{9^{9}}}", "72", timeout_s=1.0) == 0.0
    assert time.perf_counter() - start < 10
    assert compute_score("verl_anchor/aime24", "\\boxed{\\frac{144}{2}}", "72") == 1.0


def test_math_from_threads() -> None:
    # verl calls the reward from a thread pool, where signal-based timeouts cannot work
    cases = [("\\boxed{\\frac{2}{4}}", "0.5", 1.0), ("\\boxed{3}", "4", 0.0)] * 4
    scores: dict[int, float] = {}

    def score(i: int) -> None:
        response, truth, _ = cases[i]
        scores[i] = compute_score("verl_anchor/math500", response, truth)

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [scores.get(i) for i in range(len(cases))] == [expected for _, _, expected in cases]


class FlakyStart:
    """A spawn context whose first ``failures`` process starts fail as a fork hitting EAGAIN does."""

    def __init__(self, failures: float) -> None:
        self._spawn = multiprocessing.get_context("spawn")
        self.failures = failures
        self.failed = 0

    def Process(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802  (multiprocessing's name)
        if self.failed < self.failures:
            self.failed += 1
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return self._spawn.Process(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spawn, name)


@pytest.fixture
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(math_verify_pool, "RETRY_DELAYS_S", (0.0,) * (ATTEMPTS - 1))


def test_math_pool_recovers_when_first_start_fails(no_retry_delay: None) -> None:
    # Today's main switched to in-process verification for good after one failed start.
    verifier = MathVerifier(1, context=FlakyStart(failures=1))
    try:
        assert verifier.verify("\\frac{1}{2}", "0.5", timeout_s=5.0) is True
        assert verifier.verify("72", "73", timeout_s=5.0) is False
        # still bounded after the recovery: a hostile answer off the main thread is killed
        result: dict[str, Any] = {}

        def hostile() -> None:
            start = time.perf_counter()
            result["match"] = verifier.verify("72", "9^{9^{9}}", timeout_s=1.0)
            result["seconds"] = time.perf_counter() - start

        thread = threading.Thread(target=hostile)
        thread.start()
        thread.join(timeout=20)
        assert result["match"] is False and result["seconds"] < 1.0 + 1.5
        assert verifier.verify("72", "\\frac{144}{2}", timeout_s=5.0) is True  # a fresh worker took over
    finally:
        verifier.close()


def test_math_pool_gives_up_loudly_after_bounded_attempts(no_retry_delay: None) -> None:
    context = FlakyStart(failures=math.inf)
    verifier = MathVerifier(1, context=context)
    start = time.perf_counter()
    with pytest.raises(MathVerifyUnavailable, match=f"failed {ATTEMPTS} times"):
        verifier.verify("1", "2", timeout_s=1.0)
    assert context.failed == ATTEMPTS and time.perf_counter() - start < 5
    verifier.close()


def test_math_hostile_answer_off_main_thread_scores_zero_within_timeout() -> None:
    assert compute_score("verl_anchor/math500", "\\boxed{\\frac{2}{4}}", "0.5") == 1.0  # workers started
    result: dict[str, Any] = {}

    def hostile() -> None:
        start = time.perf_counter()
        result["score"] = compute_score("verl_anchor/math500", "\\boxed{9^{9^{9}}}", "72", timeout_s=1.0)
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=hostile)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert result["score"] == 0.0 and result["seconds"] < 1.0 + 1.5


@pytest.mark.parametrize("timeout_s", [-1.0, 0.0, math.nan, math.inf, "10", 1e10, MAX_TIMEOUT_S + 1])
def test_math_bad_timeout_rejected_without_starting_a_worker(timeout_s: Any) -> None:
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="timeout_s"):
        compute_score("verl_anchor/math500", "\\boxed{3}", "4", timeout_s=timeout_s)
    with pytest.raises(ValueError, match="timeout_s"):
        compute_score("verl_anchor/math500", "no box", "4", timeout_s=timeout_s)
    time.sleep(0.2)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children


def test_math_timeout_cap() -> None:
    # Today's main let 1e10 through and raised OverflowError at the pool's first comparison.
    assert check_timeout(MAX_TIMEOUT_S) == MAX_TIMEOUT_S == 86_400
    with pytest.raises(ValueError, match="timeout_s must be at most 86400 seconds"):
        check_timeout(1e10)


def test_math_pool_replaced_by_another_thread_wakes_its_waiters(
    no_retry_delay: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Thread A's task waits in the first pool; thread B's comparison finds that pool broken and
    # replaces it. Today's main left A waiting timeout_s + 60 s for a pool that no longer ran,
    # then logged "no worker took the task" and used up one of A's attempts.
    scheduled = threading.Event()

    class FirstPoolBreaksOnItsSecondTask(math_verify_pool.ProcessPool):
        pools = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            type(self).pools += 1
            self.first, self.tasks = type(self).pools == 1, 0

        def schedule(self, *args: Any, **kwargs: Any) -> Any:
            self.tasks += 1
            if self.first and self.tasks == 2:
                raise RuntimeError("the pool broke")
            future = super().schedule(*args, **kwargs)
            scheduled.set()
            return future

    monkeypatch.setattr(math_verify_pool, "ProcessPool", FirstPoolBreaksOnItsSecondTask)
    verifier = MathVerifier(2)
    results: dict[str, Any] = {}

    def compare(name: str, gold: str, pred: str) -> None:
        start = time.perf_counter()
        results[name] = verifier.verify(gold, pred, timeout_s=3.0)
        results[name + " s"] = time.perf_counter() - start

    a = threading.Thread(target=compare, args=("a", "\\frac{1}{2}", "0.5"), daemon=True)
    b = threading.Thread(target=compare, args=("b", "72", "\\frac{144}{2}"), daemon=True)
    try:
        with caplog.at_level("WARNING", logger=math_verify_pool.__name__):
            a.start()
            assert scheduled.wait(20)
            b.start()
            a.join(timeout=30)
            b.join(timeout=30)
        assert not a.is_alive() and not b.is_alive(), "a waiter was left on the discarded pool"
        assert results["a"] is True and results["b"] is True
        assert results["a s"] < 30 and results["b s"] < 30
        warnings = [r.getMessage() for r in caplog.records]
        assert not any("no worker took the task" in w for w in warnings), warnings
        assert sum("pool failed" in w for w in warnings) == 1, warnings  # B's, and only B's
        assert FirstPoolBreaksOnItsSecondTask.pools == 2  # A and B both went on with the one fresh pool
    finally:
        verifier.close()


def test_math_verify_import_failure_is_loud(monkeypatch: pytest.MonkeyPatch) -> None:
    # Today's main scored every non-identical answer 0 when math-verify could not be imported.
    monkeypatch.setattr(math_verify_pool, "_verifier", None)
    monkeypatch.setitem(sys.modules, "math_verify", None)  # makes `import math_verify` raise ImportError
    with pytest.raises(ImportError, match="needs math-verify"):
        compute_score("verl_anchor/math500", "\\boxed{3}", "4")
    assert compute_score("verl_anchor/math500", "\\boxed{4}", "4") == 1.0  # identical: no math-verify needed


# ---------------------------------------------------------------------------------------------
# Delegation to verl


def test_delegates_to_verl_default_compute_score() -> None:
    # openai/gsm8k: verl's strict "#### <number>" extractor
    assert compute_score("openai/gsm8k", "3 * 24 = 72\n#### 72", "72") == 1.0
    assert compute_score("openai/gsm8k", "#### 71", "72") == 0.0
    assert compute_score("openai/gsm8k", "\\boxed{72}", "72") == 0.0  # the reason our gsm8k uses its own name
    # math_dapo returns verl's dict (score -1/1)
    assert compute_score("math_dapo", "Answer: 72", "72")["score"] == 1.0
    with pytest.raises(NotImplementedError):
        compute_score("no_such_source", "x", "y")
