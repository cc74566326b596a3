"""Estimator maths and advantage scaling of the verl integration, on hand-made batches (no Ray)."""

import math

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from verl_anchor import AnchorConfig
from verl_anchor.credit import shape_advantages, token_weights
from verl_anchor.integration.estimator import anchor_trainer_active, compute_anchor_base_advantage
from verl_anchor.integration.settings import AnchorSettings
from verl_anchor.integration.trainer import scale_advantages

LENGTHS = [12, 1, 7, 15]


def nested(rows):
    return torch.nested.as_nested_tensor([torch.as_tensor(r, dtype=torch.float32) for r in rows], layout=torch.jagged)


def make_batch(seed=0, broken=None):
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
    data = TensorDict({
        "advantages": nested(advantages), "response_mask": nested([torch.ones(n) for n in LENGTHS]),
        "entropy": nested(entropy), "anchor_waad": nested(waad), "anchor_fai": nested(fai), "anchor_seq": nested(seq),
    }, batch_size=[len(LENGTHS)])
    return data, advantages, waad, fai, entropy


@pytest.mark.parametrize("strategy", ["local_chunk", "global_anchor", "coupled", "entropy"])
@pytest.mark.parametrize("sign", ["both", "positive", "negative"])
def test_scaled_advantages_equal_per_response_weights(strategy, sign):
    data, advantages, waad, fai, entropy = make_batch()
    cfg = AnchorConfig(strategy=strategy, sign=sign)
    shaped, metrics = scale_advantages(data, AnchorSettings(cfg, f"anchor_{strategy}", "grpo"), step=3)
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
    shaped, metrics = scale_advantages(data, AnchorSettings(cfg, "anchor_coupled", "grpo"), step=0)
    ratio = shaped[0, : LENGTHS[0]] / advantages[0]
    assert set(ratio.tolist()) <= {1.0, 1.25, 1.5} and ratio.max() == 1.5
    assert 1.0 < metrics["anchor/gamma_mean"] <= 1.5


def test_degenerate_response_keeps_unit_weights_and_is_counted():
    data, advantages, *_ = make_batch(broken=0)
    shaped, metrics = scale_advantages(data, AnchorSettings(AnchorConfig(), "anchor_coupled", "grpo"), step=0)
    torch.testing.assert_close(shaped[0, : LENGTHS[0]], advantages[0])
    assert metrics["anchor/degenerate_frac"] == pytest.approx(1 / len(LENGTHS))


def test_random_baseline_differs_from_coupled_and_is_reproducible_per_step():
    data, *_ = make_batch()
    coupled, _ = scale_advantages(data, AnchorSettings(AnchorConfig(), "anchor_coupled", "grpo"), step=1)
    random_cfg = AnchorSettings(AnchorConfig(strategy="random"), "anchor_random", "grpo")
    first, metrics = scale_advantages(data, random_cfg, step=1)
    again, _ = scale_advantages(data, random_cfg, step=1)
    other_step, _ = scale_advantages(data, random_cfg, step=2)
    assert not torch.equal(first, coupled)
    assert torch.equal(first, again) and not torch.equal(first, other_step)
    assert "anchor/fai_mean" not in metrics  # random needs no attention statistics


GRPO_REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_estimator_refuses_to_run_outside_the_anchor_trainer():
    with pytest.raises(RuntimeError, match="set trainer.v1.trainer_mode=anchor_sync"):
        compute_anchor_base_advantage(GRPO_REWARDS, torch.ones(4, 3), index=np.array(["a", "a", "b", "b"]),
                                      config={"anchor": {}})


@pytest.mark.parametrize("norm", [True, False])
def test_base_advantage_is_verls_grpo_through_compute_advantage(norm):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from verl_anchor.integration.estimator import register_estimators

    register_estimators()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    index = np.array(["a", "a", "b", "b"], dtype=object)
    data = DataProto.from_dict(tensors={"token_level_rewards": GRPO_REWARDS, "response_mask": mask},
                               non_tensors={"uid": index})
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": norm, "anchor": {"base_estimator": "grpo"}})
    with anchor_trainer_active():
        out = compute_advantage(data, adv_estimator="anchor_coupled", config=config)
    expected, _ = compute_grpo_outcome_advantage(GRPO_REWARDS, mask, index, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(out.batch["advantages"], expected)


def test_other_base_estimators_come_from_verls_registry():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    mask = torch.ones(4, 3)
    index = np.array(["a", "a", "b", "b"], dtype=object)
    config = OmegaConf.create({"anchor": {"base_estimator": "rloo"}})
    with anchor_trainer_active():
        advantages, _ = compute_anchor_base_advantage(GRPO_REWARDS, mask, index=index, config=config)
    expected, _ = get_adv_estimator_fn("rloo")(token_level_rewards=GRPO_REWARDS, response_mask=mask, index=index,
                                               config=config)
    torch.testing.assert_close(advantages, expected)
