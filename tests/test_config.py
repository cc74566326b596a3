"""AnchorConfig defaults (spec §6), validation messages, and layer selection (spec §2)."""

import dataclasses

import pytest

from verl_anchor import AnchorConfig
from verl_anchor.core.metrics import select_layers


def test_defaults_are_the_spec_table():
    cfg = AnchorConfig()
    assert dataclasses.asdict(cfg) == {
        "strategy": "coupled",
        "window": 10,
        "fai_h_lo": 10,
        "fai_h_hi": 100,
        "ratio": 0.4,
        "gamma_amp": 1.5,
        "head_quantile": 0.3,
        "num_layers": 5,
        "layers": None,
        "k": 3,
        "alpha": 0.5,
        "sign": "both",
        "select": "top",
        "seed": 0,
    }
    assert cfg.band == 100
    assert AnchorConfig(fai_h_hi=None).band is None
    assert AnchorConfig(window=50, fai_h_hi=20).band == 49


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"strategy": "anchor"}, "strategy='anchor' is invalid: allowed values are none, local_chunk"),
        ({"ratio": 2.0}, "ratio=2.0 is invalid: use a finite number in (0, 1]"),
        ({"ratio": 0.0}, "ratio=0.0 is invalid"),
        ({"gamma_amp": 0}, "gamma_amp=0 is invalid"),
        ({"gamma_amp": float("nan")}, "gamma_amp=nan is invalid"),
        ({"window": 0}, "window=0 is invalid: use an integer in 1..16777216"),
        ({"window": 2.5}, "window=2.5 is invalid"),
        ({"fai_h_lo": 20, "fai_h_hi": 10}, "fai_h_hi=10 is invalid: use an integer in 20..16777216 or None"),
        # Offsets past 2^24 would overflow the kernels' int32 token indices (and are longer than any sequence).
        ({"window": 2**31 - 1}, "window=2147483647 is invalid: use an integer in 1..16777216"),
        ({"fai_h_hi": 2**31 - 1}, "fai_h_hi=2147483647 is invalid: use an integer in 10..16777216 or None"),
        ({"fai_h_lo": 2**24 + 1, "fai_h_hi": None}, "fai_h_lo=16777217 is invalid: use an integer in 0..16777216"),
        ({"k": 2**40}, "k=1099511627776 is invalid: use an integer in 1..16777216"),
        ({"head_quantile": 0.6}, "head_quantile=0.6 is invalid: use a finite number in (0, 0.5]"),
        ({"num_layers": 0}, "num_layers=0 is invalid"),
        ({"num_layers": 10**9}, "num_layers=1000000000 is invalid"),
        ({"layers": []}, "layers=() is invalid"),
        ({"layers": [3, 3]}, "layers=[3, 3] has duplicates"),
        ({"layers": [-1]}, "layers[...]=-1 is invalid"),
        ({"k": 0}, "k=0 is invalid"),
        ({"alpha": 1.5}, "alpha=1.5 is invalid: use a finite number in [0, 1]"),
        ({"sign": "pos"}, "sign='pos' is invalid: allowed values are both, positive, negative"),
        ({"select": "middle"}, "select='middle' is invalid: allowed values are top, bottom"),
        ({"seed": -1}, "seed=-1 is invalid"),
        ({"window": True}, "window=True is invalid"),
    ],
)
def test_invalid_values_name_option_value_and_allowed(options, fragment):
    with pytest.raises(ValueError) as err:
        AnchorConfig(**options)
    assert fragment in str(err.value)


def test_from_mapping_prefixes_and_rejects_unknown_keys():
    cfg = AnchorConfig.from_mapping({"ratio": 0.2, "layers": [1, 2]}, prefix="algorithm.anchor.")
    assert cfg.ratio == 0.2 and cfg.layers == (1, 2)
    with pytest.raises(
        ValueError, match=r"unknown option algorithm\.anchor\.gama_amp=2.*did you mean algorithm\.anchor\.gamma_amp"
    ):
        AnchorConfig.from_mapping({"gama_amp": 2}, prefix="algorithm.anchor.")
    with pytest.raises(ValueError, match=r"^algorithm\.anchor\.ratio=2\.0 is invalid"):
        AnchorConfig.from_mapping({"ratio": 2.0}, prefix="algorithm.anchor.")
    assert AnchorConfig.from_mapping({"layers": "null"}).layers is None
    assert AnchorConfig.from_mapping(AnchorConfig(layers=[4]).to_dict()) == AnchorConfig(layers=[4])


@pytest.mark.parametrize(
    "num_hidden_layers, num_layers, expected",
    [
        (36, 5, [12, 15, 18, 21, 24]),  # Qwen3-4B/8B, spec §2
        (28, 5, [9, 11, 14, 16, 18]),  # linspace(9, 18, 5) = 9, 11.25, 13.5, 15.75, 18; 13.5 rounds to even
        (10, 5, [3, 4, 5, 6]),  # 3, 3.75, 4.5 -> 4 (half to even), 5.25, 6
        (4, 5, [1, 2]),
        (2, 5, [0, 1]),
        (1, 5, [0]),
        (36, 1, [12]),
        (36, 2, [12, 24]),
    ],
)
def test_select_layers(num_hidden_layers, num_layers, expected):
    assert select_layers(num_hidden_layers, num_layers) == expected


def test_select_layers_rejects_empty_models():
    with pytest.raises(ValueError):
        select_layers(0)


def test_strategy_registry_says_what_each_strategy_reads():
    needs = {
        name: (cfg.needs_attention, cfg.needs_entropy, cfg.needs_seeds, cfg.needs_forward)
        for name in ("none", "local_chunk", "global_anchor", "coupled", "random", "entropy")
        for cfg in [AnchorConfig(strategy=name)]
    }
    assert needs == {
        "none": (False, False, False, False),
        "local_chunk": (True, False, False, True),
        "global_anchor": (True, False, False, True),
        "coupled": (True, False, False, True),
        "random": (False, False, True, False),
        "entropy": (False, True, False, True),
    }
