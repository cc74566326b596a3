"""gamma acts where it should: one update through verl's own policy loss moves amplified tokens ~gamma_amp x as far.

The policy is tabular (each response position has its own logits), so one token's update does not
leak into another's and the first-order effect is exact: with the same advantage, a token whose
advantage gamma scaled by 1.5 has its log-probability moved 1.5 times as far as the others. Plain
GRPO (gamma = 1) moves them all alike.
"""

import pytest
import torch
from omegaconf import OmegaConf

from verl_anchor import AnchorConfig
from verl_anchor.core.credit import batch_gamma, shape_advantages

VOCAB, LENGTH = 16, 40
LR = 1e-4  # small: the ratio stays inside PPO's clip range and the first-order picture holds


def policy_loss_fn():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    return get_policy_loss_fn("vanilla")


def actor_config():
    # What verl's actor passes: clip settings and the global batch info agg_loss normalises by.
    return OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.2,
            "clip_ratio_c": 3.0,
            "global_batch_info": {"dp_size": 1, "batch_num_tokens": LENGTH, "global_batch_size": 1},
        }
    )


def one_update(advantages: torch.Tensor) -> torch.Tensor:
    """Change of each response token's log-probability after one SGD step on verl's vanilla PPO loss."""
    torch.manual_seed(0)
    # Identical start at every position; float64 so the tiny log-prob changes are measured exactly.
    logits = torch.zeros(LENGTH, VOCAB, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, VOCAB, (LENGTH,), generator=torch.Generator().manual_seed(1))

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0][None]

    old = log_probs().detach()
    mask = torch.ones(1, LENGTH, dtype=torch.float64)
    loss, _ = policy_loss_fn()(
        old_log_prob=old,
        log_prob=log_probs(),
        advantages=advantages[None].double(),
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=actor_config(),
    )
    loss.backward()
    with torch.no_grad():
        logits -= LR * logits.grad
    return (log_probs().detach() - old)[0]


@pytest.mark.parametrize("strategy", ["coupled", "local_chunk", "global_anchor", "random"])
def test_amplified_tokens_move_gamma_amp_times_as_far(strategy):
    gen = torch.Generator().manual_seed(2)
    waad, fai = torch.rand(1, LENGTH, generator=gen) * 10, torch.rand(1, LENGTH, generator=gen)
    fai[0, -10:] = float("nan")  # the FAI horizon's undefined tail
    cfg = AnchorConfig(strategy=strategy)
    gamma, _ = batch_gamma([LENGTH], cfg, waad=waad, fai=fai, seeds=[7])
    advantage = torch.ones(LENGTH)  # one response, one outcome: the same advantage on every token
    shaped = shape_advantages(advantage, gamma[0], cfg.sign)
    anchored, plain = one_update(shaped), one_update(advantage)
    assert (plain > 0).all() and torch.allclose(plain, plain[0].expand_as(plain), rtol=1e-3)  # GRPO: all alike
    assert 0 < int((gamma[0] == cfg.gamma_amp).sum()) < LENGTH
    # Each token moves gamma times as far as under plain GRPO: 1.5 on selected tokens, 1 elsewhere
    # (and 1.25 on coupled's dominated anchors and their introductory tokens).
    torch.testing.assert_close(anchored / plain, gamma[0].double(), rtol=1e-3, atol=0)


def test_negative_advantages_are_pushed_down_harder_on_amplified_tokens():
    gen = torch.Generator().manual_seed(3)
    waad, fai = torch.rand(1, LENGTH, generator=gen) * 10, torch.rand(1, LENGTH, generator=gen)
    cfg = AnchorConfig(strategy="global_anchor", sign="negative")
    gamma, _ = batch_gamma([LENGTH], cfg, waad=waad, fai=fai)
    advantage = -torch.ones(LENGTH)
    anchored = one_update(shape_advantages(advantage, gamma[0], cfg.sign))
    plain = one_update(advantage)
    assert (anchored < 0).all() and (gamma[0] > 1).any()
    torch.testing.assert_close(anchored / plain, gamma[0].double(), rtol=1e-3, atol=0)
