"""Capture inside tiny random Qwen3 / Qwen2 / Llama forwards vs the eager model's `output_attentions`."""

import copy

import pytest
import torch
from helpers import pooled_reference  # the dense pooling oracle
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture, CaptureError, sequence_segments
from verl_anchor.core.credit import batch_weights
from verl_anchor.core.metrics import reference_stats
from verl_anchor.models.tiny import tiny_config

ARCHS = ["qwen3", "qwen2", "llama"]
CFG = AnchorConfig(fai_h_lo=2, fai_h_hi=6, window=4)  # short horizons so short sequences exercise them


def build(arch, impl, seed=0):
    torch.manual_seed(seed)
    config = tiny_config(arch, num_hidden_layers=4, vocab_size=128)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl).eval()
    return model


def eager_twin(model):
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="eager").eval()
    twin.load_state_dict(model.state_dict())
    return twin


def reference(eager, ids, layers, start):
    """Dense statistics of one unpadded sequence from the eager model's attention probabilities."""
    with torch.no_grad():
        attentions = eager(torch.tensor([ids]), output_attentions=True).attentions
    attn = torch.cat([attentions[layer][0].double() for layer in layers])  # heads in (layer, head) order
    return reference_stats(attn, start, CFG)


def assert_matches(captured, ref, atol=2e-5):
    torch.testing.assert_close(captured.waad.double(), ref.waad, atol=atol, rtol=0)
    torch.testing.assert_close(captured.fai.double(), ref.fai, atol=atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(captured.span.double(), ref.span, atol=atol, rtol=1e-6)


SEQS = [[5, 9, 2, 7, 7, 1, 3, 8, 4, 6, 2, 9, 11, 12, 3, 3], [4, 4, 8, 1, 2, 6, 10, 5, 7], [3, 1, 2]]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_matches_eager_attentions(arch, impl, padding_side):
    model = build(arch, impl)
    width = max(map(len, SEQS))
    ids = torch.zeros(len(SEQS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(SEQS):
        cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
    with torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with AttentionCapture(model, CFG) as capture:
            logits = model(ids, attention_mask=mask).logits
        stats = capture.pop()
    assert torch.equal(plain, logits), "the capture changed the model's outputs"
    assert capture.layers == [1, 2]
    eager = eager_twin(model)
    assert len(stats) == len(SEQS)
    for seq, seq_stats in zip(SEQS, stats):
        assert seq_stats.waad.shape == (2 * model.config.num_attention_heads, len(seq))
        for start in (0, len(seq) // 2, len(seq) - 1):
            assert_matches(seq_stats.response(start), reference(eager, seq, capture.layers, start))


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_maps_match_eager_attentions(arch):
    model = build(arch, "sdpa")
    seq = SEQS[0]
    capture = AttentionCapture(model, CFG, map_bins=5)
    capture.map_from = 4
    with torch.no_grad(), capture:
        model(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long))
    (stats,) = capture.pop()
    with torch.no_grad():
        attentions = eager_twin(model)(torch.tensor([seq]), output_attentions=True).attentions
    attn = torch.cat([attentions[layer][0].double() for layer in capture.layers])
    assert stats.attention_map.shape == (attn.shape[0], 5, 5)
    torch.testing.assert_close(stats.attention_map.double(), pooled_reference(attn, 4, 5), atol=2e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_sequences_match_per_sequence_reference(arch, impl):
    """verl's remove-padding layout: one row, position_ids restarting at 0, no attention mask."""
    model = build(arch, impl, seed=1)
    ids = torch.tensor([sum(SEQS, [])])
    positions = torch.tensor([sum((list(range(len(s))) for s in SEQS), [])])
    cfg = AnchorConfig(layers=[0, 3], fai_h_lo=2, fai_h_hi=6, window=4)
    with torch.no_grad():
        plain = model(ids, position_ids=positions, use_cache=False).logits
        with AttentionCapture(model, cfg) as capture:
            logits = model(ids, position_ids=positions, use_cache=False).logits
            model(ids, position_ids=positions)  # with a KV cache transformers does not split: neither do we
    assert torch.equal(plain, logits)
    everything = capture.pop()
    stats, unsplit = everything[: len(SEQS)], everything[len(SEQS) :]
    assert len(unsplit) == 1 and unsplit[0].waad.shape[1] == ids.shape[1]
    assert [s.waad.shape[1] for s in stats] == [len(s) for s in SEQS]
    eager = eager_twin(model)
    for seq, seq_stats in zip(SEQS, stats):
        assert_matches(seq_stats.response(2), reference(eager, seq, [0, 3], 2))


def test_registered_attention_function_is_wrapped_and_restored():
    """A non-eager implementation taken from the registry (the path flash_attention_2 takes on GPU)."""
    name = "anchor_test_sdpa"
    AttentionInterface.register(name, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        model = build("qwen3", name, seed=2)
        assert model.config._attn_implementation == name
        ids = torch.tensor([SEQS[0]])
        before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
        with torch.no_grad(), AttentionCapture(model, CFG) as capture:
            model(ids)
        assert dict(ALL_ATTENTION_FUNCTIONS._local_mapping) == before
        (stats,) = capture.pop()
        assert_matches(stats.response(4), reference(eager_twin(model), SEQS[0], capture.layers, 4))
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


def test_capture_is_inert_outside_the_context_and_pops_once():
    model = build("qwen3", "sdpa")
    ids = torch.tensor([SEQS[1]])
    capture = AttentionCapture(model, CFG)
    with torch.no_grad():
        model(ids)
        with capture:
            model(ids)
            model(ids)
        model(ids)
    assert len(capture.pop()) == 2 and capture.pop() == []


def test_batch_weights_from_a_capture():
    model = build("qwen3", "sdpa")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), AttentionCapture(model, AnchorConfig()) as capture:
        model(ids)
    (gamma,) = batch_weights(capture.pop(), [40], AnchorConfig())
    # 40 response tokens, FAI defined for the first 30 (the horizon starts 10 tokens later): 12 anchors,
    # plus at most one introductory token each, all before position 30.
    assert gamma.shape == (40,) and set(gamma.tolist()) <= {1.0, 1.25, 1.5}
    assert 12 <= int((gamma > 1).sum()) <= 24 and bool((gamma[30:] == 1).all())


def test_models_without_attention_modules_and_bad_layers_are_refused():
    with pytest.raises(CaptureError, match="no Hugging Face attention modules"):
        AttentionCapture(torch.nn.Sequential(torch.nn.Linear(2, 2)), CFG)
    with pytest.raises(CaptureError, match=r"layer 7: out of range, the model has layers 0\.\.3"):
        AttentionCapture(build("llama", "sdpa"), AnchorConfig(layers=[1, 7]))


def test_kv_cache_generation_is_refused():
    model = build("qwen3", "sdpa")
    with torch.no_grad(), AttentionCapture(model, CFG):
        with pytest.raises(CaptureError, match="without a KV cache"):
            model.generate(torch.tensor([SEQS[2]]), max_new_tokens=2, do_sample=False)


def test_sequence_segments_rules():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    segments = sequence_segments(1, 9, None, positions, torch.device("cpu"))
    assert [idx.tolist() for _, idx in segments] == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    segments = sequence_segments(2, 4, mask, positions[:, :4].expand(2, 4), torch.device("cpu"))
    assert [(row, idx.tolist()) for row, idx in segments] == [(0, [1, 2]), (1, [0, 1, 2, 3])]
    assert [idx.tolist() for _, idx in sequence_segments(1, 3, None, None, torch.device("cpu"))] == [[0, 1, 2]]


def test_flash_packing_rules():
    """Under flash attention, position_ids mark packed sequences only in a batch of one row, split where they are 0
    (transformers' _is_packed_sequence / prepare_fa_kwargs_from_position_ids): other packings are refused."""
    from verl_anchor.capture.layout import find_sequences

    cpu = torch.device("cpu")

    def lengths(*args, flash=True):
        return list(find_sequences(*args, cpu, flash).lengths)

    restart = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])
    assert lengths(2, 4, None, restart, flash=False) == [2, 2, 4]  # sdpa/eager split every row
    with pytest.raises(CaptureError, match="batch of 2 rows: flash attention treats each row"):
        lengths(2, 4, None, restart)
    assert lengths(2, 4, None, torch.arange(4)[None].expand(2, 4)) == [4, 4]  # no restart: accepted
    late = torch.tensor([[0, 1, 2, 5, 6, 7]])
    assert lengths(1, 6, None, late, flash=False) == [3, 3]
    with pytest.raises(CaptureError, match="do not all start at position 0.*use_remove_padding=True"):
        lengths(1, 6, None, late)
    with pytest.raises(CaptureError, match="do not all start at position 0"):
        lengths(1, 4, None, torch.tensor([[3, 4, 0, 1]]))
    assert lengths(1, 5, None, torch.tensor([[0, 1, 2, 0, 1]])) == [3, 2]  # verl's packed row
    assert lengths(1, 3, None, torch.tensor([[4, 5, 6]])) == [3]  # one offset sequence: not packed
    # A mask without padding is dropped by flash attention, which then reads a single row's position_ids.
    full = torch.ones(1, 5, dtype=torch.long)
    assert lengths(1, 5, full, torch.tensor([[0, 1, 2, 0, 1]]), flash=False) == [5]
    assert lengths(1, 5, full, torch.tensor([[0, 1, 2, 0, 1]])) == [3, 2]
    padded = torch.tensor([[0, 1, 1, 1, 1]])  # padding: the mask decides, as in flash's unpadding path
    assert lengths(1, 5, padded, torch.tensor([[0, 0, 1, 2, 3]])) == [4]


def test_flash_packing_is_refused_at_the_forward():
    """The pre-hook applies the flash rules under any implementation whose name contains "flash"."""
    model = build("qwen3", "sdpa")
    AttentionInterface.register("flash_stand_in", ALL_ATTENTION_FUNCTIONS["sdpa"])  # no flash-attn on CPU
    model.config._attn_implementation_internal = "flash_stand_in"
    ids = torch.tensor([SEQS[0][:4], SEQS[1][:4]])
    positions = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]])
    try:
        with torch.no_grad(), AttentionCapture(model, CFG) as capture:
            with pytest.raises(CaptureError, match="batch of 2 rows: flash attention treats each row"):
                model(ids, position_ids=positions, use_cache=False)
            model(torch.tensor([SEQS[0][:5]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]), use_cache=False)
        assert [s.waad.shape[1] for s in capture.pop()] == [3, 2]
    finally:
        del AttentionInterface._global_mapping["flash_stand_in"]
