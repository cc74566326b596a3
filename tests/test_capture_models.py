"""The architecture table of docs/models.md: each family is exact (capture == its own eager attention) or refused
when the capture is built, with a message that names the reason and the layers that can be captured."""

import os

import pytest
import torch
from test_capture import CFG, SEQS, assert_matches
from transformers import AutoModelForCausalLM

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture, CaptureError, capturable_layers
from verl_anchor.core.metrics import reference_stats
from verl_anchor.models.tiny import tiny_arch_config

LONGEST = max(map(len, SEQS))  # 16: the max_length every exact model is built for
# Families whose capture must equal their eager attention; windows and chunks are set to LONGEST (allowed).
# CI runs these (about 1 s each); VERL_ANCHOR_ALL_ARCHS=1 adds the rest of docs/models.md's table.
EXACT = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": {},
    "mistral": {"sliding_window": LONGEST},
    "gemma3_text": {"sliding_window": LONGEST},
    "cohere2": {"sliding_window": LONGEST},
    "olmo2": {},
    "phi3": {},
    "granitemoe": {},
    "gpt2": {},
    "opt": {},
    "deepseek_v3": {},
    "llama4_text": {"attention_chunk_size": LONGEST},
    # hybrids: only their softmax-attention layers are captured
    "jamba": {},
    "lfm2": {},
    "minimax": {},
}
MORE_EXACT = {
    "mixtral": {},
    "gemma": {},
    "qwen2_moe": {},
    "cohere": {},
    "olmo3": {"sliding_window": LONGEST},
    "olmoe": {},
    "phi": {},
    "phimoe": {},
    "granite": {},
    "gpt_neox": {},
    "gpt_bigcode": {},
    "stablelm": {},
    "starcoder2": {},
    "glm4": {},
    "ernie4_5": {},
    "exaone4": {"sliding_window": LONGEST},
    "smollm3": {},
    "seed_oss": {},
    "helium": {},
    "hunyuan_v1_dense": {},
    "qwen3_next": {},
}
if os.environ.get("VERL_ANCHOR_ALL_ARCHS"):
    EXACT |= MORE_EXACT
# Packed rows these families do not attend to as separate sequences: refused at the forward, never misread.
PACKED_REFUSED = {
    "llama4_text": "chunked attention over 16 tokens, shorter than a packed",  # chunks are cut by row position
    "opt": "mask does not separate the sequences",  # OPT builds its mask without position_ids
}
EXACT_LAYERS = {"qwen3_next": [3], "jamba": [1, 3], "lfm2": [1, 3], "minimax": [0, 2]}


def build(arch, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_arch_config(arch, **overrides)).eval()


def eager_attentions(model, layers, *args, **kwargs):
    """{layer: (B, H, L, L)} attention probabilities of one forward, from the model's own eager implementation."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(*args, output_attentions=True, use_cache=False, **kwargs).attentions
    finally:
        model.set_attn_implementation(impl)
    # Hybrid models return the attentions of their softmax-attention layers only, in layer order.
    if len(out) != model.config.num_hidden_layers:
        out = dict(zip(capturable_layers(model), out))
    return {layer: out[layer].double() for layer in layers}


def check_against_eager(stats, attentions, layers, segments):
    """Each captured sequence against its block of the eager attention of the same input."""
    assert len(stats) == len(segments)
    for seq_stats, (row, idx) in zip(stats, segments):
        attn = torch.cat([attentions[layer][row][:, idx][:, :, idx] for layer in layers])
        for start in (0, len(idx) // 2):
            assert_matches(seq_stats.response(start), reference_stats(attn, start, CFG), atol=1e-4)


@pytest.mark.parametrize("arch", sorted(EXACT))
def test_architecture_matches_its_own_eager_attention(arch):
    """Left-padded batch and packed rows (verl's two layouts), the model's default attention implementation."""
    model = build(arch, **EXACT[arch])
    layers = capturable_layers(model, max_length=LONGEST)
    assert layers == EXACT_LAYERS.get(arch, [0, 1, 2, 3])
    cfg = AnchorConfig(layers=layers, fai_h_lo=CFG.fai_h_lo, fai_h_hi=CFG.fai_h_hi, window=CFG.window)
    capture = AttentionCapture(model, cfg, max_length=LONGEST)
    ids = torch.zeros(len(SEQS), LONGEST, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(SEQS):
        ids[row, LONGEST - len(seq) :], mask[row, LONGEST - len(seq) :] = torch.tensor(seq), 1
    with torch.no_grad(), capture:
        model(ids, attention_mask=mask, use_cache=False)
    segments = [(row, torch.arange(LONGEST - len(seq), LONGEST)) for row, seq in enumerate(SEQS)]
    check_against_eager(capture.pop(), eager_attentions(model, layers, ids, attention_mask=mask), layers, segments)

    packed = torch.tensor([sum(SEQS, [])])
    positions = torch.tensor([sum((list(range(len(s))) for s in SEQS), [])])
    with torch.no_grad(), capture:
        if arch in PACKED_REFUSED:
            with pytest.raises(CaptureError, match=PACKED_REFUSED[arch]):
                model(packed, position_ids=positions, use_cache=False)
            return
        model(packed, position_ids=positions, use_cache=False)
    ends = torch.tensor([len(s) for s in SEQS]).cumsum(0).tolist()
    segments = [(0, torch.arange(end - len(seq), end)) for seq, end in zip(SEQS, ends)]
    attentions = eager_attentions(model, layers, packed, position_ids=positions)
    check_against_eager(capture.pop(), attentions, layers, segments)


@pytest.mark.parametrize(
    "arch, overrides, layers, reason",
    [
        ("gpt_oss", {"sliding_window": 64}, [1, 3], r"attention sinks \(GptOssAttention.sinks\)"),
        ("gemma2", {"sliding_window": 64}, [1], r"soft-caps attention logits \(attn_logit_softcapping=50.0\)"),
        ("vaultgemma", {"sliding_window": 64}, [1], "attn_logit_softcapping"),
        (
            "llama4_text",
            {"attention_chunk_size": 8},
            [0],
            r"layer 0: chunked attention over 8 tokens, shorter than "
            r"max_length=16.*can read are \[3\]",
        ),
        ("mistral", {"sliding_window": 8}, [1], "layer 1: sliding attention over 8 tokens, shorter than max_length=16"),
        # windows applied by the mask alone (the attention function never sees them)
        ("phimoe", {"sliding_window": 8}, [1], "layer 1: sliding attention over 8 tokens"),
        (
            "qwen2_moe",
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4},
            [0],
            r"layer 0: sliding attention over 8 tokens.*can read are \[1, 3\]",
        ),
        (
            "gemma3_text",
            {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"] * 2},
            None,
            r"sliding attention over 8 tokens.*can read are \[1, 3\]",
        ),
        (
            "minimax",
            {},
            [1],
            r"layer 1: MiniMaxLightningAttention does not go through transformers' attention functions"
            r".*can read are \[0, 2\]",
        ),
        ("qwen3_next", {}, None, r"layer 1: a linear_attention layer, not attention.*can read are \[3\]"),
        ("jamba", {}, None, r"layer 2: a mamba layer, not attention.*can read are \[1, 3\]"),
        ("lfm2", {}, [2], r"layer 2: a conv layer, not attention.*can read are \[1, 3\]"),
        ("diffllama", {}, [1], r"DiffLlama\w*Attention does not go through transformers' attention functions"),
        ("nemotron", {}, [1], r"Nemotron\w*Attention does not go through transformers' attention functions"),
    ],
)
def test_unmodelled_attention_is_refused_when_the_capture_is_built(arch, overrides, layers, reason):
    model = build(arch, **overrides)
    cfg = AnchorConfig(layers=layers) if layers else AnchorConfig(num_layers=2)
    with pytest.raises(CaptureError, match=reason):
        AttentionCapture(model, cfg, max_length=LONGEST)


def test_mrope_models_are_refused_when_the_capture_is_built():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=1),
    )
    with pytest.raises(CaptureError, match=r"multimodal 3-D RoPE \(mrope_section\)"):
        AttentionCapture(Qwen2VLForConditionalGeneration(config), AnchorConfig(layers=[0]))


@pytest.mark.parametrize("arch", ["mistral", "phimoe"])  # window passed to the attention function / mask only
def test_short_window_without_max_length_is_refused_at_the_forward(arch):
    """max_length unknown: the window is judged against each forward's sequences (the second line)."""
    model = build(arch, sliding_window=8)
    capture = AttentionCapture(model, AnchorConfig(layers=[1]))
    with torch.no_grad(), capture:
        model(torch.tensor([SEQS[1][:8]]), use_cache=False)  # 8 tokens fit in the window
        with pytest.raises(CaptureError, match="layer 1 uses sliding attention over 8 tokens, shorter than a sequence"):
            model(torch.tensor([SEQS[0]]), use_cache=False)
    assert len(capture.pop()) == 1
    with pytest.raises(CaptureError, match="max_length=0 is invalid"):
        AttentionCapture(model, AnchorConfig(layers=[1]), max_length=0)


def test_exaone4_full_attention_layers_are_read_with_a_short_window():
    """EXAONE 4 sets `sliding_window` on every attention module but uses it only on its sliding layers
    (layer_types): with a window shorter than max_length the full-attention layer is exact, sliding ones refused."""
    model = build("exaone4", sliding_window=8)
    assert model.config.layer_types[3] == "full_attention"
    assert capturable_layers(model, max_length=LONGEST) == [3]
    with pytest.raises(CaptureError, match=r"layer 1: sliding attention over 8 tokens.*can read are \[3\]"):
        AttentionCapture(model, AnchorConfig(layers=[1]), max_length=LONGEST)
    cfg = AnchorConfig(layers=[3], fai_h_lo=CFG.fai_h_lo, fai_h_hi=CFG.fai_h_hi, window=CFG.window)
    packed = torch.tensor([sum(SEQS, [])])
    positions = torch.tensor([sum((list(range(len(s))) for s in SEQS), [])])
    for max_length in (LONGEST, None):  # refused neither when built nor at the forward
        with torch.no_grad(), AttentionCapture(model, cfg, max_length=max_length) as capture:
            model(packed, position_ids=positions, use_cache=False)
        ends = torch.tensor([len(s) for s in SEQS]).cumsum(0).tolist()
        segments = [(0, torch.arange(end - len(seq), end)) for seq, end in zip(SEQS, ends)]
        attentions = eager_attentions(model, [3], packed, position_ids=positions)
        check_against_eager(capture.pop(), attentions, [3], segments)
