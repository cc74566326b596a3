"""The worker-side statistics pass: `anchor_outputs` on a real micro-batch forward (no Ray)."""

import copy
import math

import pytest
import torch
from tensordict import TensorDict
from transformers import AutoModelForCausalLM

from verl_anchor import AnchorConfig
from verl_anchor.capture import AttentionCapture
from verl_anchor.integration.worker import anchor_outputs
from verl_anchor.metrics import attention_stats, group_signals, token_stats
from verl_anchor.tiny import tiny_config

PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
RESPONSES = [list(range(20, 45)), [50], list(range(60, 78))]
CFG = AnchorConfig(layers=[1, 2], fai_h_lo=2, fai_h_hi=8, window=4)


def micro_batch():
    seqs = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    data = TensorDict({
        "input_ids": torch.nested.as_nested_tensor([torch.tensor(s) for s in seqs], layout=torch.jagged),
        "response_mask": torch.nested.as_nested_tensor([torch.ones(len(r)) for r in RESPONSES], layout=torch.jagged),
    }, batch_size=[len(seqs)])
    return seqs, data


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_anchor_outputs_match_per_sequence_statistics(layout):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_config("qwen3", num_hidden_layers=4, vocab_size=128)),
                                             attn_implementation="sdpa").eval()
    seqs, data = micro_batch()
    capture = AttentionCapture(model, CFG)
    with torch.no_grad(), capture:
        if layout == "packed":  # what verl's engine feeds with use_remove_padding=True
            ids = torch.tensor([sum(seqs, [])])
            positions = torch.tensor([sum((list(range(len(s))) for s in seqs), [])])
            model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
        else:  # use_remove_padding=False: right padding with a 2-D mask
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    model_output = {"log_probs": torch.nested.as_nested_tensor([torch.zeros(len(s)) for s in seqs],
                                                                layout=torch.jagged)}
    loss, metrics = anchor_outputs(model_output, data, None, capture=capture, cfg=CFG)
    assert float(loss) == 0.0 and metrics == {}
    waad = model_output["anchor_waad"].unbind()
    fai = model_output["anchor_fai"].unbind()
    per_seq = model_output["anchor_seq"].unbind()
    # Reference: each sequence alone, q/k taken from a capture of its own forward.
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        alone = AttentionCapture(model, CFG)
        with torch.no_grad(), alone:
            model(torch.tensor([prompt + response]), use_cache=False)
        (stats,) = alone.pop()
        expected = group_signals(stats.response(len(prompt)), CFG)
        assert waad[i].shape == (len(response),)  # one value per response token, at its own position
        torch.testing.assert_close(waad[i], expected.waad, atol=1e-5, rtol=0)
        torch.testing.assert_close(fai[i], expected.fai, atol=1e-5, rtol=0, equal_nan=True)
        assert per_seq[i][:2].tolist() == pytest.approx([expected.span_loc, expected.span_glob], rel=1e-5)
        assert per_seq[i][2] >= 0
    assert math.isnan(fai[1][0])  # a 1-token response has no FAI horizon


def test_mismatched_segments_are_an_error_not_a_silent_misalignment():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_config("qwen3", num_hidden_layers=4, vocab_size=128)),
                                             attn_implementation="sdpa").eval()
    seqs, data = micro_batch()
    capture = AttentionCapture(model, CFG)
    with torch.no_grad(), capture:  # one unsplit row instead of three sequences
        model(torch.tensor([sum(seqs, [])]), use_cache=False)
    with pytest.raises(RuntimeError, match="do not match the micro-batch"):
        anchor_outputs({}, data, None, capture=capture, cfg=CFG)
