"""Exact statistics under verl's Ulysses sequence parallelism: 2 gloo ranks on CPU against the SP=1 run.

Each rank builds the same tiny random decoder with `flash_attention_2`, patched by verl's real
`apply_monkey_patch(model, ulysses_sp_size=2)`, sets verl's SP group (`set_ulysses_sequence_parallel_group`, the
"sp" dimension of a (dp, sp) CPU mesh, as verl's engine does), and slices one packed micro-batch (three sequences,
53 tokens: verl pads it to 54) with verl's `ulysses_pad_and_slice_inputs`. Verl's all-to-all is
`dist.all_to_all`, which gloo supports, so everything but flash attention's own kernel is verl's and transformers'
code. flash-attn is not installed on CPU: `_flash_stand_in` gives transformers' flash path an exact causal varlen
attention in torch (transformers' `lazy_import_flash_attention`, the one place that picks the kernel).
"""

import contextlib
import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_verl_worker import CFG, log_probs, micro_batch
from transformers import AutoModelForCausalLM
from transformers import modeling_flash_attention_utils as fa_utils
from transformers.integrations import flash_attention

from verl_anchor.capture.hooks import AttentionCapture, CaptureError
from verl_anchor.models.tiny import tiny_config

SP = 2
# (name, arch, query heads, key heads): 1 key head per rank; verl's KV repeat (1 key head, 2 ranks); 2 per rank.
MODELS = [("qwen3 4q/2kv", "qwen3", 4, 2), ("qwen3 4q/1kv (KV repeat)", "qwen3", 4, 1), ("llama 8q/4kv", "llama", 8, 4)]
OUTPUTS = ("anchor_waad", "anchor_fai", "anchor_seq")


def _varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None, causal=False
):
    """flash_attn_varlen_func's semantics in torch: `(T, H, D)` tokens, sequences at `cu_seqlens`, GQA."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[a:b] = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1),
            k[a:b].transpose(0, 1),
            v[a:b].transpose(0, 1),
            is_causal=causal,
            scale=softmax_scale,
            enable_gqa=True,
        ).transpose(0, 1)
    return out


def _flash(q, k, v, softmax_scale=None, causal=False):
    """flash_attn_func: `(B, L, H, D)`, each row one sequence."""
    rows = torch.arange(q.shape[0] + 1) * q.shape[1]
    flat = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    return _varlen(*flat, rows, rows, softmax_scale=softmax_scale, causal=causal).view_as(q)


@contextlib.contextmanager
def _flash_stand_in():
    saved = fa_utils.lazy_import_flash_attention
    functions = (
        (_flash, _varlen, None, fa_utils._pad_input, fa_utils._unpad_input),
        fa_utils._lazy_define_process_function(_varlen),
    )
    fa_utils.lazy_import_flash_attention = lambda *args, **kwargs: functions
    try:
        yield
    finally:
        fa_utils.lazy_import_flash_attention = saved


def _model(arch, heads, kv_heads):
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    torch.manual_seed(0)
    config = tiny_config(
        arch, num_hidden_layers=4, vocab_size=128, num_attention_heads=heads, num_key_value_heads=kv_heads
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.config._attn_implementation_internal = "flash_attention_2"  # flash-attn itself is not installed
    apply_monkey_patch(model, ulysses_sp_size=SP)  # verl's engine does this whenever use_remove_padding=True
    return model


def _run(model, seqs, data, group, pop=False):
    """One micro-batch as verl's engine feeds it (SP: padded and sliced per rank); gathered logits, outputs."""
    from verl.utils.ulysses import (
        gather_outputs_and_unpad,
        set_ulysses_sequence_parallel_group,
        ulysses_pad_and_slice_inputs,
    )

    from verl_anchor.integration.worker import anchor_outputs

    ids = torch.tensor([sum(seqs, [])])
    positions = torch.tensor([sum((list(range(len(s))) for s in seqs), [])])
    pad = 0
    set_ulysses_sequence_parallel_group(group)  # verl's slicing reads this rank from it
    if group is not None:
        ids, positions, pad = ulysses_pad_and_slice_inputs(ids, positions, sp_size=SP)
    capture = AttentionCapture(model, CFG)
    try:
        with torch.no_grad(), capture:
            logits = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False).logits[0]
            if pop:
                return capture.pop_packed()[0]
            model_output = log_probs(seqs)
            anchor_outputs(model_output, data, None, capture=capture, cfg=CFG)
    finally:
        set_ulysses_sequence_parallel_group(None)
    if group is not None:
        logits = gather_outputs_and_unpad(logits, gather_dim=0, unpad_dim=0, padding_size=pad, group=group)
    return {"logits": logits, "pad": pad, **{key: [t.clone() for t in model_output[key].unbind()] for key in OUTPUTS}}


def _error(run):
    try:
        run()
    except (CaptureError, RuntimeError) as err:
        return str(err)
    return None


def _rank(rank, store, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from verl.models.transformers import monkey_patch

    from verl_anchor.capture.ulysses import gather_head_span
    from verl_anchor.core.stats_engine import packed_token_stats, response_head_span

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=SP, timeout=datetime.timedelta(seconds=120)
    )
    group = init_device_mesh("cpu", (1, SP), mesh_dim_names=("dp", "sp"))["sp"].get_group()
    seqs, data = micro_batch()
    lengths = data["response_mask"].offsets().diff()
    results = {"rank": rank}
    with _flash_stand_in():
        for name, arch, heads, kv_heads in MODELS:
            model = _model(arch, heads, kv_heads)
            alone, sliced = _run(model, seqs, data, None), _run(model, seqs, data, group)
            ref, stats = _run(model, seqs, data, None, pop=True), _run(model, seqs, data, group, pop=True)
            results[name] = {
                "sp1": alone,
                "sp": sliced,
                "heads": (stats.head_offset, stats.heads_per_layer, heads),
                "span": (
                    response_head_span(ref.first_sequences(3, 53), lengths),
                    gather_head_span(stats.first_sequences(3, 53), lengths, group),
                ),
            }
        assert monkey_patch._flash_attention_forward is fa_utils._flash_attention_forward  # the hook is gone

        model = _model("qwen3", 4, 2)
        model.config._attn_implementation_internal = "sdpa"
        results["sdpa"] = _error(lambda: _run(model, seqs, data, group))
        model.config._attn_implementation_internal = "flash_attention_2"
        verl_wrapper, flash_attention._flash_attention_forward = (
            flash_attention._flash_attention_forward,
            fa_utils._flash_attention_forward,
        )
        results["unpatched"] = _error(lambda: _run(model, seqs, data, group))
        flash_attention._flash_attention_forward = verl_wrapper

        # Ranks that captured different micro-batches, or different boundaries: every rank refuses.
        torch.manual_seed(1)
        q, k = torch.randn(2, 12, 16), torch.randn(1, 12, 16)
        cu = [0, 5, 12] if rank == 0 else [0, 6, 12], [0, 5, 12] if rank == 0 else [0, 5, 9, 12]
        for case, bounds in zip(("boundaries", "count"), cu):
            stats = packed_token_stats(q, k, torch.tensor(bounds), CFG, head_offset=2 * rank, num_heads_total=4)
            results[case] = _error(lambda: gather_head_span(stats, torch.ones(len(bounds) - 1), group))  # noqa: B023 - called at once
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ulysses")
    mp.spawn(_rank, args=(str(out / "store"), out), nprocs=SP, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(SP)]


def _max_diff(a, b):
    return max(float((x - y).abs().nan_to_num().max()) for x, y in zip(a, b))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", [name for name, *_ in MODELS])
def test_sequence_parallel_outputs_equal_the_single_rank_run(ranks, name):
    for rank, results in enumerate(ranks):
        run = results[name]
        alone, sliced = run["sp1"], run["sp"]
        assert sliced["pad"] == 1  # 53 tokens padded to 54: verl's SP padding, a trailing segment
        # The SP forward is real: verl's all-to-all gives the logits of the unsliced model.
        torch.testing.assert_close(sliced["logits"], alone["logits"], atol=1e-5, rtol=0)
        offset, held, heads = run["heads"]
        assert (offset, held) == (rank * heads // SP, heads // SP)  # query heads rank*H/sp .. of each layer
        expected, gathered = run["span"]
        torch.testing.assert_close(gathered, expected, atol=1e-5, rtol=0, equal_nan=True)
        diffs = {
            "logits": _max_diff([sliced["logits"]], [alone["logits"]]),
            "head spans": _max_diff(gathered, expected),
        }
        for key in OUTPUTS:
            assert [t.shape for t in sliced[key]] == [t.shape for t in alone[key]]
            got, want = sliced[key], alone[key]
            if key == "anchor_seq":  # the group spans; the seconds differ
                got, want = [t[:2] for t in got], [t[:2] for t in want]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0, equal_nan=True)
            diffs[key] = _max_diff(got, want)
        print(f"{name}, rank {rank}: max |SP - SP=1|", {key: f"{value:.1e}" for key, value in diffs.items()})
    for key in OUTPUTS:  # every SP rank writes the same outputs (verl keeps rank 0's)
        for got, want in zip(ranks[1][name]["sp"][key], ranks[0][name]["sp"][key]):
            assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())


@pytest.mark.timeout(900)
def test_what_sequence_parallelism_cannot_give_is_refused_on_every_rank(ranks):
    for results in ranks:
        assert "verl all-to-alls the sequences only inside flash attention" in results["sdpa"]
        assert "attn_implementation='sdpa'" in results["sdpa"]
        assert "never called verl.models.transformers.monkey_patch._flash_attention_forward" in results["unpatched"]
        assert "apply_monkey_patch" in results["unpatched"]
        assert "different sequence boundaries" in results["boundaries"]
        assert "captured different micro-batches" in results["count"]
