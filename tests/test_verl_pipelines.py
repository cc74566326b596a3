"""anchor_coupled through verl's real main_ppo on CPU, in the pipelines users run (slow: ~1.5-3 min each).

- colocate_async, verl's partial-rollout trainer mode (sync is in test_verl_e2e.py);
- PPO with a critic: `algorithm.anchor.base_estimator=gae`, which turns verl's critic on;
- 2 actor ranks (gloo), packed sequences and dynamic batch sizes, with verl's padding samples:
  each response's statistics and gamma equal those of a single-rank, single-sequence forward.
"""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture
from verl_anchor.commands.demo import demo_overrides
from verl_anchor.core.credit import token_weights
from verl_anchor.core.metrics import response_signals
from verl_anchor.integration.cpu.launch import parse_step_metrics, run_main_ppo
from verl_anchor.models.tiny import ensure_tiny_model

_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return sum(c.isdigit() for c in solution_str) / max(len(solution_str), 1)
"""


def run_demo(tmp_path, extra, steps=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "reward.py").write_text(_REWARD)
    overrides = demo_overrides(
        tmp_path,
        steps=steps,
        estimator="anchor_coupled",
        model=ensure_tiny_model(tmp_path / "cache"),
        user_overrides=[f"reward.custom_reward_function.path={tmp_path / 'reward.py'}", *extra],
    )
    log_path = tmp_path / "main_ppo.log"
    rc = run_main_ppo(overrides, tmp_path, log_path, timeout=1200)
    log = log_path.read_text(errors="replace")
    assert rc == 0, log[-6000:]
    metrics = parse_step_metrics(log)
    assert sorted(metrics) == list(range(1, steps + 1)), log[-6000:]
    return metrics


def assert_amplified(metrics):
    assert 0.2 < metrics["anchor/selected_frac"] < 0.8
    assert metrics["anchor/amplified_frac"] == metrics["anchor/selected_frac"]
    assert metrics["anchor/degenerate_frac"] == 0.0 and metrics["timing_s/anchor_stats"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_colocate_async_mode_applies_anchor_credit(tmp_path):
    steps = run_demo(tmp_path, ["trainer.v1.trainer_mode=colocate_async"])
    for metrics in steps.values():
        assert_amplified(metrics)
        # GRPO's +-1/sqrt(2) (rollout.n = 2) times gamma_amp on the selected tokens.
        assert metrics["critic/advantages/max"] == pytest.approx(1.5 / math.sqrt(2), rel=1e-3)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_gae_base_runs_ppo_with_a_critic(tmp_path):
    steps = run_demo(tmp_path, ["+algorithm.anchor.base_estimator=gae"])
    for metrics in steps.values():
        assert_amplified(metrics)
        assert "critic/vf_loss" in metrics and "critic/values/mean" in metrics  # the critic trained


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_ranks_dynamic_batches_give_each_response_its_single_rank_gamma(tmp_path):
    dump = tmp_path / "dump"
    # 3 prompts x 2 responses = 6 sequences; mini-batches of 2 prompts = 4 sequences (2 per rank):
    # verl pads the batch to 8 with padding samples.
    run_demo(
        tmp_path,
        [
            "trainer.n_gpus_per_node=2",
            "actor_rollout_ref.actor.use_dynamic_bsz=true",
            "data.train_batch_size=3",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            f"+algorithm.anchor.dump_dir={dump}",
        ],
        steps=1,
    )
    record = torch.load(dump / "step000001_000.pt")
    assert not all(record["real"])  # padding samples were added, and kept out of the weights
    assert_single_sequence_statistics(record, tmp_path / "cache", expected_responses=6)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_legacy_trainer_applies_anchor_credit(tmp_path):
    """trainer.use_v1=false: verl's RayPPOTrainer (what verl-recipe's recipes subclass), packed inputs."""
    dump = tmp_path / "dump"
    steps = run_demo(tmp_path, ["trainer.use_v1=false", f"+algorithm.anchor.dump_dir={dump}"])
    for metrics in steps.values():
        assert_amplified(metrics)
        assert metrics["critic/advantages/max"] == pytest.approx(1.5 / math.sqrt(2), rel=1e-3)
    record = torch.load(dump / "step000001_000.pt")  # step 1: the statistics of the weights the test loads
    assert all(record["real"]) and sorted(p.name for p in dump.iterdir()) == ["step000001_000.pt", "step000002_000.pt"]
    assert_single_sequence_statistics(record, tmp_path / "cache", expected_responses=len(record["real"]))


def assert_single_sequence_statistics(record, cache, expected_responses):
    """Each dumped response's statistics are those of a forward of that sequence alone, and so is its gamma
    (up to a near-tie in the top-q selection flipping under 1e-6 differences: at most one response)."""
    cfg = AnchorConfig()
    (model_dir,) = cache.glob("tiny-qwen3-*")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    checked, tie_flips = 0, 0
    for i, real in enumerate(record["real"]):
        gamma = record["gamma"][i]
        if not real:
            assert (gamma == 1).all()
            continue
        ids = record["input_ids"][i].long()
        with torch.no_grad(), AttentionCapture(model, cfg) as capture:
            model(ids[None], use_cache=False)
        (stats,) = capture.pop()
        expected = response_signals(stats, len(gamma), cfg)
        torch.testing.assert_close(record["anchor_waad"][i], expected.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(record["anchor_fai"][i], expected.fai, atol=1e-5, rtol=0, equal_nan=True)
        single = token_weights(expected.waad, expected.fai, copy.copy(cfg))
        if not torch.equal(gamma, single):
            tie_flips += 1
        checked += 1
    assert checked == expected_responses and tie_flips <= 1, f"{tie_flips} of {checked} responses changed gamma"
