"""Real verl end to end on CPU: anchor estimators inside main_ppo, and bad configs refused before rollout."""

import math
import os
import subprocess
import sys

import pytest

from verl_anchor.commands.demo import demo_overrides
from verl_anchor.integration.cpu import cpu_env
from verl_anchor.integration.cpu.launch import parse_step_metrics, run_main_ppo
from verl_anchor.models.tiny import ensure_tiny_model

# A reward with variance (the fraction of digits in the response): a random model never solves
# Countdown, and with equal rewards GRPO's advantages are all zero, so nothing could be amplified.
_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return sum(c.isdigit() for c in solution_str) / max(len(solution_str), 1)
"""
# rollout.n = 2: GRPO's unbiased-std normalisation makes every non-zero advantage +-1/sqrt(2).
GRPO_ABS = 1 / math.sqrt(2)


def run_anchor(tmp_path, estimator):
    tmp_path.mkdir(parents=True)
    (tmp_path / "reward.py").write_text(_REWARD)
    overrides = demo_overrides(tmp_path, steps=2, estimator=estimator, model=ensure_tiny_model(tmp_path / "cache")) + [
        f"reward.custom_reward_function.path={tmp_path / 'reward.py'}"
    ]
    log_path = tmp_path / "main_ppo.log"
    rc = run_main_ppo(overrides, tmp_path, log_path, timeout=840)
    log = log_path.read_text(errors="replace")
    assert rc == 0, log[-5000:]
    steps = parse_step_metrics(log)
    assert sorted(steps) == [1, 2], log[-5000:]
    return steps


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_coupled_amplifies_tokens_inside_verl_and_random_differs(tmp_path):
    coupled = run_anchor(tmp_path / "coupled", "anchor_coupled")
    for metrics in coupled.values():
        assert 0.2 < metrics["anchor/selected_frac"] < 0.8
        assert metrics["anchor/amplified_frac"] == metrics["anchor/selected_frac"]  # sign = both
        assert 1.0 < metrics["anchor/gamma_mean"] <= 1.5
        assert metrics["anchor/degenerate_frac"] == 0.0
        assert metrics["anchor/span_global"] >= metrics["anchor/span_local"] > 0
        assert metrics["timing_s/anchor_stats"] > 0
        # The advantages verl trained on were scaled: base GRPO gives exactly +-1/sqrt(2),
        # gamma_amp = 1.5 on a selected token lifts its magnitude to 1.5/sqrt(2).
        assert metrics["critic/advantages/max"] == pytest.approx(1.5 * GRPO_ABS, rel=1e-3)
        assert metrics["critic/advantages/min"] == pytest.approx(-1.5 * GRPO_ABS, rel=1e-3)
    random = run_anchor(tmp_path / "random", "anchor_random")
    for step, metrics in random.items():
        assert "anchor/fai_mean" not in metrics and "timing_s/anchor_stats" not in metrics  # no capture
        assert metrics["anchor/selected_frac"] != coupled[step]["anchor/selected_frac"]
        assert metrics["critic/advantages/max"] == pytest.approx(1.5 * GRPO_ABS, rel=1e-3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["+algorithm.anchor.strategy=unknown"], "algorithm.anchor.strategy='unknown' is not an option"),
        (["+algorithm.anchor.ratio=2.0"], "algorithm.anchor.ratio=2.0 is invalid: use a finite number in (0, 1]"),
        (["algorithm.adv_estimator=anchor_copuled"], "did you mean algorithm.adv_estimator=anchor_coupled?"),
        (["+algorithm.anchor.base_estimator=gae", "critic.enable=false"], "set critic.enable=true"),
    ],
)
def test_bad_configs_fail_in_the_driver_before_any_rollout(tmp_path, extra, message):
    overrides = (
        demo_overrides(tmp_path, steps=1, estimator="anchor_coupled", model=ensure_tiny_model(tmp_path / "cache"))
        + extra
    )
    proc = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", *overrides],
        cwd=tmp_path,
        env={**os.environ, **cpu_env()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in output, output[-3000:]
    assert "ray.init" not in output and "Started a local Ray instance" not in output  # refused before Ray
