"""The worker-side statistics pass: `anchor_outputs` on a real micro-batch forward (no Ray)."""

import copy
import math

import pytest
import torch
from tensordict import TensorDict
from test_capture_engine import HostReads
from transformers import AutoModelForCausalLM

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture
from verl_anchor.core.metrics import group_signals
from verl_anchor.integration.worker import anchor_outputs
from verl_anchor.models.tiny import tiny_config

PROMPTS = [[3, 4, 5, 6], [7, 8], [9, 10, 11]]
RESPONSES = [list(range(20, 45)), [50], list(range(60, 78))]
CFG = AnchorConfig(layers=[1, 2], fai_h_lo=2, fai_h_hi=8, window=4)


def micro_batch(prompts=PROMPTS, responses=RESPONSES):
    seqs = [p + r for p, r in zip(prompts, responses)]
    data = TensorDict(
        {
            "input_ids": torch.nested.as_nested_tensor([torch.tensor(s) for s in seqs], layout=torch.jagged),
            "response_mask": torch.nested.as_nested_tensor(
                [torch.ones(len(r)) for r in responses], layout=torch.jagged
            ),
        },
        batch_size=[len(seqs)],
    )
    return seqs, data


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        copy.deepcopy(tiny_config("qwen3", num_hidden_layers=4, vocab_size=128)), attn_implementation="sdpa"
    ).eval()


def captured_forward(model, seqs, layout):
    """One forward of the micro-batch under a capture, the way verl's engine feeds it."""
    capture = AttentionCapture(model, CFG)
    with torch.no_grad(), capture:
        if layout.startswith("packed"):  # use_remove_padding=True
            ids = sum(seqs, [])
            positions = sum((list(range(len(s))) for s in seqs), [])
            if layout == "packed, padded tail":  # padding after the last sequence forms trailing segments
                ids, positions = ids + [0] * 5, positions + list(range(5))
            model(
                input_ids=torch.tensor([ids]),
                position_ids=torch.tensor([positions]),
                attention_mask=None,
                use_cache=False,
            )
        else:  # use_remove_padding=False: right padding with a 2-D mask
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(seqs):
                ids[row, : len(s)], mask[row, : len(s)] = torch.tensor(s), 1
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return capture


def log_probs(seqs):
    return {"log_probs": torch.nested.as_nested_tensor([torch.zeros(len(s)) for s in seqs], layout=torch.jagged)}


@pytest.mark.parametrize("layout", ["packed", "packed, padded tail", "padded"])
def test_anchor_outputs_match_per_sequence_statistics(model, layout):
    seqs, data = micro_batch()
    capture = captured_forward(model, seqs, layout)
    model_output = log_probs(seqs)
    loss, metrics = anchor_outputs(model_output, data, None, capture=capture, cfg=CFG)
    assert float(loss) == 0.0 and metrics == {}
    waad = model_output["anchor_waad"].unbind()
    fai = model_output["anchor_fai"].unbind()
    per_seq = model_output["anchor_seq"].unbind()
    assert len(waad) == len(fai) == len(per_seq) == len(seqs)
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
        assert per_seq[i].shape == (3,)
        assert per_seq[i][:2].tolist() == pytest.approx([expected.span_loc, expected.span_glob], rel=1e-5)
        assert per_seq[i][2] >= 0
    assert math.isnan(fai[1][0])  # a 1-token response has no FAI horizon


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_anchor_outputs_host_reads_do_not_grow_with_the_sequences(model, layout):
    """One read per micro-batch checks the sequences; on CPU tensors only, the engine also validates the response
    lengths (two reads)."""
    reads = []
    for copies in (1, 4):
        seqs, data = micro_batch(PROMPTS * copies, RESPONSES * copies)
        capture = captured_forward(model, seqs, layout)
        with HostReads() as counter:
            anchor_outputs(log_probs(seqs), data, None, capture=capture, cfg=CFG)
        reads.append(counter.count)
    assert reads[0] == reads[1] <= 3


def test_mismatched_segments_are_an_error_not_a_silent_misalignment(model):
    seqs, data = micro_batch()
    capture = AttentionCapture(model, CFG)
    with torch.no_grad(), capture:  # one unsplit row instead of three sequences
        model(torch.tensor([sum(seqs, [])]), use_cache=False)
    with pytest.raises(RuntimeError, match="do not match the micro-batch"):
        anchor_outputs({}, data, None, capture=capture, cfg=CFG)
