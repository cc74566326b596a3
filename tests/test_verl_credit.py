"""Estimator maths and advantage scaling of the verl integration, on hand-made batches (no Ray)."""

import math

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from verl_anchor import AnchorConfig
from verl_anchor.core.credit import response_seed, scale_advantages, shape_advantages, token_weights
from verl_anchor.integration.estimator import refuse_outside_anchor_trainer
from verl_anchor.integration.handoff import response_batch
from verl_anchor.integration.settings import AnchorSettings

LENGTHS = [12, 1, 7, 15]


def nested(rows):
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=torch.float32) for r in rows], layout=torch.jagged)


def make_batch(seed=0, broken=None, order=None):
    gen = torch.Generator().manual_seed(seed)
    advantages = [torch.full((n,), float(v)) for n, v in zip(LENGTHS, [1.0, -0.5, 0.0, -1.2])]
    waad = [torch.rand(n, generator=gen) * 10 for n in LENGTHS]
    fai = [torch.rand(n, generator=gen) for n in LENGTHS]
    for f in fai:
        f[-3:] = math.nan  # undefined tail
    if broken is not None:
        waad[broken][0] = math.nan
    entropy = [torch.rand(n, generator=gen) for n in LENGTHS]
    seq = [torch.tensor([2.0, 30.0, 0.01]) for _ in LENGTHS]
    if order is not None:  # the same responses in another row order
        advantages, waad, fai, entropy = ([rows[i] for i in order] for rows in (advantages, waad, fai, entropy))
    lengths = [LENGTHS[i] for i in (order or range(len(LENGTHS)))]
    data = TensorDict(
        {
            "advantages": nested(advantages),
            "response_mask": nested([torch.ones(n) for n in lengths]),
            "entropy": nested(entropy),
            "anchor_waad": nested(waad),
            "anchor_fai": nested(fai),
            "anchor_seq": nested(seq),
        },
        batch_size=[len(LENGTHS)],
    )
    return data, advantages, waad, fai, entropy


def scale(data, settings, seeds, real=None):
    """The shared advantage step on a TensorDict of nested per-response fields (as the v1 trainer reads them)."""
    return scale_advantages(response_batch(data, real), settings.cfg, seeds)


SEEDS = [response_seed(0, 3, 0, f"uid{i}_0_0") for i in range(len(LENGTHS))]


@pytest.mark.parametrize("strategy", ["local_chunk", "global_anchor", "coupled", "entropy"])
@pytest.mark.parametrize("sign", ["both", "positive", "negative"])
def test_scaled_advantages_equal_per_response_weights(strategy, sign):
    data, advantages, waad, fai, entropy = make_batch()
    cfg = AnchorConfig(strategy=strategy, sign=sign)
    shaped, _, metrics = scale(data, AnchorSettings(cfg, f"anchor_{strategy}", "grpo"), SEEDS)
    assert shaped.shape == (len(LENGTHS), max(LENGTHS))
    selected = 0
    for i, n in enumerate(LENGTHS):
        gamma = token_weights(waad[i], fai[i], cfg, entropy=entropy[i])
        selected += int((gamma != 1).sum())
        torch.testing.assert_close(shaped[i, :n], shape_advantages(advantages[i], gamma, sign))
        assert (shaped[i, n:] == 0).all()
    total = sum(LENGTHS)
    assert metrics["anchor/selected_frac"] == pytest.approx(selected / total)
    assert metrics["anchor/degenerate_frac"] == 0.0
    assert 0 < metrics["anchor/selected_frac"] < 1
    if sign == "both":
        # Response 2 has zero advantage: its gamma applies but changes nothing.
        assert metrics["anchor/amplified_frac"] == metrics["anchor/selected_frac"]
    else:
        assert metrics["anchor/amplified_frac"] < metrics["anchor/selected_frac"]
    if strategy != "entropy":
        assert metrics["anchor/span_local"] == 2.0 and metrics["anchor/span_global"] == 30.0
        assert metrics["timing_s/anchor_stats"] == pytest.approx(0.04)


def test_amplification_is_real_and_bounded():
    data, advantages, *_ = make_batch()
    cfg = AnchorConfig(strategy="coupled")
    shaped, _, metrics = scale(data, AnchorSettings(cfg, "anchor_coupled", "grpo"), SEEDS)
    ratio = shaped[0, : LENGTHS[0]] / advantages[0]
    assert set(ratio.tolist()) <= {1.0, 1.25, 1.5} and ratio.max() == 1.5
    assert 1.0 < metrics["anchor/gamma_mean"] <= 1.5


def test_degenerate_response_keeps_unit_weights_and_is_counted():
    data, advantages, *_ = make_batch(broken=0)
    shaped, _, metrics = scale(data, AnchorSettings(AnchorConfig(), "anchor_coupled", "grpo"), SEEDS)
    torch.testing.assert_close(shaped[0, : LENGTHS[0]], advantages[0])
    assert metrics["anchor/degenerate_frac"] == pytest.approx(1 / len(LENGTHS))


def test_padding_rows_keep_unit_weights_and_stay_out_of_the_metrics():
    data, advantages, *_ = make_batch()
    settings = AnchorSettings(AnchorConfig(), "anchor_coupled", "grpo")
    _, _, full = scale(data, settings, SEEDS)
    real = [True, True, True, False]  # verl's _balance_batch appended the last row
    shaped, gamma, metrics = scale(data, settings, SEEDS, real=real)
    torch.testing.assert_close(shaped[3, : LENGTHS[3]], advantages[3])
    assert (gamma[3] == 1).all()
    kept = sum(LENGTHS[:3])
    selected = int((gamma[:3] != 1).sum())
    assert metrics["anchor/selected_frac"] == pytest.approx(selected / kept)
    assert metrics["anchor/selected_frac"] != full["anchor/selected_frac"]


def test_random_baseline_differs_from_coupled_and_is_reproducible_per_response():
    data, *_ = make_batch()
    coupled, *_ = scale(data, AnchorSettings(AnchorConfig(), "anchor_coupled", "grpo"), SEEDS)
    random_cfg = AnchorSettings(AnchorConfig(strategy="random"), "anchor_random", "grpo")
    first, _, metrics = scale(data, random_cfg, SEEDS)
    again, *_ = scale(data, random_cfg, SEEDS)
    other_step, *_ = scale(data, random_cfg, [response_seed(0, 4, 0, f"uid{i}_0_0") for i in range(4)])
    assert not torch.equal(first, coupled)
    assert torch.equal(first, again) and not torch.equal(first, other_step)
    assert "anchor/fai_mean" not in metrics  # random needs no attention statistics


def test_random_draw_follows_the_response_not_its_row():
    data, *_ = make_batch()
    random_cfg = AnchorSettings(AnchorConfig(strategy="random"), "anchor_random", "grpo")
    _, gamma, _ = scale(data, random_cfg, SEEDS)
    order = [2, 0, 3, 1]  # the same responses, reordered (another rank layout, dynamic batching)
    reordered, *_ = make_batch(order=order)
    _, gamma_reordered, _ = scale(reordered, random_cfg, [SEEDS[i] for i in order])
    for row, i in enumerate(order):
        assert torch.equal(gamma_reordered[row, : LENGTHS[i]], gamma[i, : LENGTHS[i]])


def test_huge_seeds_do_not_overflow_the_generator():
    data, *_ = make_batch()
    cfg = AnchorConfig(strategy="random", seed=2**64 - 1)
    seeds = [response_seed(cfg.seed, 10**9, 7, f"k{i}") for i in range(len(LENGTHS))]
    assert all(0 <= s < 2**63 for s in seeds)
    _, gamma, _ = scale(data, AnchorSettings(cfg, "anchor_random", "grpo"), seeds)
    assert (gamma > 1).any()


def test_anchor_estimators_refuse_to_run_outside_the_anchor_trainer():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    from verl_anchor.integration.estimator import register_estimators

    register_estimators()
    assert get_adv_estimator_fn("anchor_coupled") is refuse_outside_anchor_trainer
    with pytest.raises(RuntimeError, match="bypassed it"):
        get_adv_estimator_fn("anchor_coupled")(
            token_level_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3), index=np.array(["a", "a"]), config={}
        )
