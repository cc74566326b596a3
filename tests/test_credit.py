"""Token selection and credit weights against a loop-by-loop transcription of spec §4-5."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_anchor import AnchorConfig
from verl_anchor.core.credit import (
    batch_weights,
    dominated_anchors,
    is_degenerate,
    select_tokens,
    shape_advantages,
    token_weights,
    waad_jumps,
)
from verl_anchor.core.metrics import TokenStats


# ---- the spec, written as plain loops (the oracle) --------------------------------------------
def spec_select(values, ratio, select="top"):
    defined = [i for i, v in enumerate(values) if not math.isnan(v)]
    count = math.ceil(round(ratio * len(defined), 9))
    sign = -1 if select == "top" else 1
    ranked = sorted(defined, key=lambda i: (sign * values[i], i))  # ties: earlier position first
    return set(ranked[:count])


def lower_median(values):
    return sorted(values)[(len(values) - 1) // 2]


def spec_gamma(waad, fai, cfg):
    n = len(waad)
    g = cfg.gamma_amp - 1
    if n == 0 or any(not math.isfinite(w) for w in waad) or any(math.isinf(f) for f in fai):
        return [1.0] * n
    delta = [abs(waad[t] - waad[t + 1]) for t in range(n - 1)] + [0.0]
    if cfg.strategy == "local_chunk":
        chosen = spec_select(delta, cfg.ratio, cfg.select)
        return [1 + g * (t in chosen) for t in range(n)]
    anchors = spec_select(fai, cfg.ratio, cfg.select)
    if cfg.strategy == "global_anchor":
        return [1 + g * (t in anchors) for t in range(n)]
    tau_waad, tau_delta = lower_median(waad), lower_median(delta)
    dominated, intro = set(), set()
    for t in anchors:
        window = list(range(max(0, t - cfg.k), t))
        if window and waad[t] <= tau_waad and max(delta[u] for u in window) >= tau_delta:
            dominated.add(t)
            best = max(delta[u] for u in window)
            intro.add(max(u for u in window if delta[u] == best))  # ties to the later position
    return [
        1
        + g
        * min(
            1.0, (t in anchors and t not in dominated) + (1 - cfg.alpha) * (t in dominated) + cfg.alpha * (t in intro)
        )
        for t in range(n)
    ]


# ---- selection ---------------------------------------------------------------------------------
def test_select_ties_go_to_the_earlier_position_both_ways():
    values = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert select_tokens(values, 0.4).nonzero().flatten().tolist() == [1, 2]
    assert select_tokens(values, 0.4, "bottom").nonzero().flatten().tolist() == [0, 3]
    assert select_tokens(torch.zeros(4), 0.5).nonzero().flatten().tolist() == [0, 1]


def test_select_skips_nan_and_counts_only_defined():
    values = torch.tensor([0.5, math.nan, 0.9, 0.1, math.nan])
    # n_def = 3, ceil(0.4 * 3) = 2
    assert select_tokens(values, 0.4).nonzero().flatten().tolist() == [0, 2]
    assert not select_tokens(torch.full((3,), math.nan), 0.4).any()
    assert not select_tokens(torch.zeros(0), 0.4).any()


@pytest.mark.parametrize("n, ratio, count", [(1, 0.4, 1), (2, 0.4, 1), (3, 0.4, 2), (10, 0.7, 7), (5, 1.0, 5)])
def test_select_count_is_ceil_of_ratio_times_n(n, ratio, count):
    assert int(select_tokens(torch.randn(n), ratio).sum()) == count


def test_waad_jumps_last_is_zero():
    assert waad_jumps(torch.tensor([1.0, 4.0, 2.0])).tolist() == [3.0, 2.0, 0.0]
    assert waad_jumps(torch.tensor([5.0])).tolist() == [0.0]


def test_dominated_anchor_and_its_introduction_by_hand():
    # WAAD dips at t = 4 after a jump between 1 and 2; median(WAAD) = 3, median(delta) = 1.
    waad = torch.tensor([3.0, 3.0, 6.0, 5.0, 1.0, 3.0, 4.0])
    delta = waad_jumps(waad)  # [0, 3, 1, 4, 2, 1, 0]
    anchors = torch.tensor([False, False, False, False, True, False, True])
    dominated, intro = dominated_anchors(waad, delta, anchors, k=3)
    # t = 4: WAAD 1 <= 3, max(delta[1..3]) = 4 >= 1 -> dominated, introduced by argmax = 3.
    # t = 6: WAAD 4 > 3 -> not dominated.
    assert dominated.nonzero().flatten().tolist() == [4]
    assert intro.nonzero().flatten().tolist() == [3]


def test_intro_ties_go_to_the_later_position():
    waad = torch.tensor([0.0, 2.0, 0.0, 2.0, 0.0])  # delta = [2, 2, 2, 2, 0]
    dominated, intro = dominated_anchors(waad, waad_jumps(waad), torch.tensor([False] * 4 + [True]), k=3)
    assert dominated.tolist() == [False] * 4 + [True] and intro.nonzero().flatten().tolist() == [3]


def test_first_response_token_is_never_dominated():
    waad = torch.tensor([0.0, 5.0, 5.0])
    dominated, intro = dominated_anchors(waad, waad_jumps(waad), torch.tensor([True, False, False]), k=3)
    assert not dominated.any() and not intro.any()


# ---- gamma -------------------------------------------------------------------------------------
finite = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 6), st.one_of(st.integers(0, 6), st.just(-1))), min_size=0, max_size=30),
    strategy=st.sampled_from(["local_chunk", "global_anchor", "coupled"]),
    ratio=st.sampled_from([0.1, 0.4, 0.5, 1.0]),
    select=st.sampled_from(["top", "bottom"]),
    k=st.integers(1, 4),
    alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
    nan_tail=st.integers(0, 5),
)
def test_gamma_matches_the_spec_transcription(data, strategy, ratio, select, k, alpha, nan_tail):
    # Small integer values make ties frequent; -1 marks an undefined FAI.
    waad = [float(w) for w, _ in data]
    fai = [math.nan if f < 0 else f / 6 for _, f in data]
    fai = fai[: max(0, len(fai) - nan_tail)] + [math.nan] * min(nan_tail, len(fai))
    cfg = AnchorConfig(strategy=strategy, ratio=ratio, select=select, k=k, alpha=alpha)
    gamma = token_weights(torch.tensor(waad), torch.tensor(fai), cfg)
    assert gamma.tolist() == pytest.approx(spec_gamma(waad, fai, cfg))
    assert bool(((gamma >= 1.0) & (gamma <= cfg.gamma_amp)).all())


def test_none_random_and_entropy_strategies():
    waad, fai = torch.rand(10), torch.rand(10)
    assert token_weights(waad, fai, AnchorConfig(strategy="none")).tolist() == [1.0] * 10
    cfg = AnchorConfig(strategy="random", ratio=0.4, gamma_amp=2.0)
    first = token_weights(waad, fai, cfg, generator=torch.Generator().manual_seed(1))
    again = token_weights(waad, fai, cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and int((first == 2.0).sum()) == 4 and int((first == 1.0).sum()) == 6
    shared = torch.Generator().manual_seed(1)
    draws = [token_weights(waad, fai, cfg, generator=shared) for _ in range(5)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # a shared generator advances
    entropy = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.2, 0.3, 0.4, 0.6, 0.7])
    gamma = token_weights(waad, fai, AnchorConfig(strategy="entropy"), entropy=entropy)
    assert (gamma > 1).nonzero().flatten().tolist() == [1, 3, 8, 9]
    with pytest.raises(ValueError, match="needs the policy's token entropy"):
        token_weights(waad, fai, AnchorConfig(strategy="entropy"))


@pytest.mark.parametrize(
    "waad, fai",
    [
        ([1.0, math.nan, 2.0], [0.1, 0.2, 0.3]),
        ([1.0, math.inf, 2.0], [0.1, 0.2, 0.3]),
        ([1.0, 2.0, 3.0], [0.1, math.inf, math.nan]),
    ],
)
def test_degenerate_responses_get_unit_weights(waad, fai):
    waad, fai = torch.tensor(waad), torch.tensor(fai)
    assert is_degenerate(waad, fai)
    for strategy in ("local_chunk", "global_anchor", "coupled"):
        assert token_weights(waad, fai, AnchorConfig(strategy=strategy)).tolist() == [1.0, 1.0, 1.0]
    assert is_degenerate(torch.zeros(0), torch.zeros(0))
    assert not is_degenerate(torch.tensor([1.0]), torch.tensor([math.nan]))


def test_one_and_two_token_responses():
    for strategy in ("local_chunk", "global_anchor", "coupled"):
        cfg = AnchorConfig(strategy=strategy)
        one = token_weights(torch.tensor([2.0]), torch.tensor([math.nan]), cfg)
        assert one.tolist() == ([1.5] if strategy == "local_chunk" else [1.0])
        two = token_weights(torch.tensor([2.0, 1.0]), torch.tensor([0.3, math.nan]), cfg)
        assert two.shape == (2,) and two.max().item() <= 1.5


@pytest.mark.parametrize(
    "sign, expected",
    [
        ("both", [-3.0, 0.0, 3.0, 1.0]),
        ("positive", [-2.0, 0.0, 3.0, 1.0]),
        ("negative", [-3.0, 0.0, 2.0, 1.0]),
    ],
)
def test_sign_rule(sign, expected):
    advantages = torch.tensor([-2.0, 0.0, 2.0, 1.0])
    gamma = torch.tensor([1.5, 1.5, 1.5, 1.0], requires_grad=True)
    shaped = shape_advantages(advantages, gamma, sign)
    assert shaped.tolist() == expected and not shaped.requires_grad


def test_batch_weights_slices_each_response():
    torch.manual_seed(0)
    stats = [
        TokenStats(row_span=torch.rand(4, n), waad=torch.rand(4, n) * 10, fai=torch.rand(4, n), first=0)
        for n in (12, 7)
    ]
    cfg = AnchorConfig()
    weights = batch_weights(stats, [5, 0], cfg)
    assert [w.shape[0] for w in weights] == [5, 0]
    with pytest.raises(ValueError, match="2 sequences but 1 response"):
        batch_weights(stats, [5], cfg)


def test_look_back_window_memory_does_not_depend_on_k():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    gen = torch.Generator().manual_seed(3)
    waad, fai = torch.rand(300, generator=gen) * 10, torch.rand(300, generator=gen)
    with Largest():  # was an (n, k) unfold: ~30 s and 3e9 elements per 300-token response at k = 1e7
        huge = token_weights(waad, fai, AnchorConfig(k=10_000_000))
    assert Largest.largest <= 3 * 300
    assert torch.equal(huge, token_weights(waad, fai, AnchorConfig(k=300)))  # k >= n: the whole prefix
    assert torch.equal(huge, torch.tensor(spec_gamma(waad.tolist(), fai.tolist(), AnchorConfig(k=300))))


@pytest.mark.parametrize("k", [1, 2, 3, 7, 64])
def test_look_back_argmax_matches_a_loop_with_many_ties(k):
    gen = torch.Generator().manual_seed(k)
    delta = torch.randint(0, 4, (200,), generator=gen).float() / 2  # few distinct values: ties everywhere
    waad = torch.zeros(200)  # every anchor at or below the median WAAD
    anchors = torch.ones(200, dtype=torch.bool)
    dominated, intro = dominated_anchors(waad, delta, anchors, k)
    median = sorted(delta.tolist())[(200 - 1) // 2]
    expected_dominated, expected_intro = set(), set()
    for t in range(200):
        window = list(range(max(0, t - k), t))
        if window and max(delta[u] for u in window) >= median:
            expected_dominated.add(t)
            best = max(delta[u] for u in window)
            expected_intro.add(max(u for u in window if delta[u] == best))
    assert set(dominated.nonzero().flatten().tolist()) == expected_dominated
    assert set(intro.nonzero().flatten().tolist()) == expected_intro


def test_introductory_token_ties_go_to_the_later_position():
    waad = torch.tensor([5.0, 5.0, 5.0, 0.0, 5.0, 5.0])
    delta = torch.tensor([0.0, 2.0, 2.0, 1.0, 0.0, 0.0])  # delta[1] == delta[2]: the max of t=3's window
    anchors = torch.tensor([False, False, False, True, False, False])
    dominated, intro = dominated_anchors(waad, delta, anchors, k=3)
    assert dominated.tolist() == [False, False, False, True, False, False]
    assert intro.nonzero().flatten().tolist() == [2]


def test_batch_weights_random_draws_differ_between_equal_length_responses():
    stats = [TokenStats(row_span=torch.rand(4, 30), waad=torch.rand(4, 30), fai=torch.rand(4, 30)) for _ in range(4)]
    weights = batch_weights(stats, [30] * 4, AnchorConfig(strategy="random"))
    assert len({tuple(w.tolist()) for w in weights}) == 4  # each response its own draw
    assert all(int((w > 1).sum()) == 12 for w in weights)
    assert all(
        torch.equal(a, b) for a, b in zip(weights, batch_weights(stats, [30] * 4, AnchorConfig(strategy="random")))
    )


@pytest.mark.parametrize("strategy", ["local_chunk", "global_anchor", "coupled", "random", "entropy"])
def test_tokens_the_loss_does_not_train_are_never_selected_nor_counted(strategy):
    gen = torch.Generator().manual_seed(4)
    n = 20
    waad, fai, entropy = torch.rand(n, generator=gen) * 10, torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    trainable = torch.ones(n, dtype=torch.bool)
    trainable[5:12] = False  # e.g. tool output inside a multi-turn response (response_mask 0)
    fai[5:12] += 10  # the most attended-to tokens: they would take the whole budget
    entropy[5:12] += 10
    cfg = AnchorConfig(strategy=strategy)
    gamma = token_weights(
        waad, fai, cfg, entropy=entropy, generator=torch.Generator().manual_seed(0), trainable=trainable
    )
    assert (gamma[~trainable] == 1).all()
    if strategy in ("random", "entropy", "global_anchor"):
        defined = int((trainable & ~torch.isnan(fai)).sum()) if strategy == "global_anchor" else int(trainable.sum())
        assert int((gamma > 1).sum()) == math.ceil(0.4 * defined - 1e-9)
    assert (gamma[trainable] > 1).any()
