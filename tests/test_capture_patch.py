"""The attention-function patch is safe: nesting, re-entering, out-of-order exits and captures in two threads
work or are refused clearly, and the last exit leaves `ALL_ATTENTION_FUNCTIONS` exactly as it was found."""

import gc
import threading
import weakref

import pytest
import torch
from test_capture import CFG, SEQS
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture, CaptureError
from verl_anchor.models.tiny import tiny_arch_config


def build(arch="qwen3", impl="sdpa", seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_arch_config(arch), attn_implementation=impl).eval()


def registry():
    return dict(ALL_ATTENTION_FUNCTIONS._local_mapping), dict(AttentionInterface._global_mapping)


def captured(model, cfg=CFG, ids=SEQS[0]):
    """Statistics of one forward of `ids`, under a fresh capture (the reference)."""
    with torch.no_grad(), AttentionCapture(model, cfg) as capture:
        model(torch.tensor([ids]), use_cache=False)
    return capture.pop()


def assert_same(stats, expected):
    assert len(stats) == len(expected)
    for got, want in zip(stats, expected):
        torch.testing.assert_close(got.waad, want.waad, atol=0, rtol=0)
        torch.testing.assert_close(got.fai, want.fai, atol=0, rtol=0, equal_nan=True)


def test_entering_an_active_capture_is_refused_and_changes_nothing():
    model, before = build(), registry()
    ids = torch.tensor([SEQS[0]])
    with torch.no_grad():
        plain = model(ids).logits
        with AttentionCapture(model, CFG) as capture:
            with pytest.raises(CaptureError, match="already active"):
                capture.__enter__()
            model(ids)
        assert len(capture.pop()) == 1
        assert registry() == before
        assert torch.equal(model(ids).logits, plain)  # later forwards unaffected (no RecursionError)


def test_nested_captures_exit_in_any_order_restore_the_registry_and_free_the_model():
    model, other, before = build(), build("llama", "eager", seed=1), registry()
    expected = {"a": captured(model), "b": captured(model, AnchorConfig(layers=[0], window=4)), "c": captured(other)}
    ids, other_ids = torch.tensor([SEQS[0]]), torch.tensor([SEQS[0]])
    a = AttentionCapture(model, CFG)
    b = AttentionCapture(model, AnchorConfig(layers=[0], window=4))  # a second capture of the same model
    c = AttentionCapture(other, CFG)  # another model, another implementation name
    with torch.no_grad():
        a.__enter__(), b.__enter__(), c.__enter__()
        model(ids, use_cache=False)
        other(other_ids, use_cache=False)
        a.__exit__(None, None, None)  # out of order: a first, then c, then b
        model(ids, use_cache=False)
        c.__exit__(None, None, None)
        b.__exit__(None, None, None)
        a.__exit__(None, None, None)  # exiting twice is harmless
    assert registry() == before
    assert_same(a.pop(), expected["a"])
    assert_same(b.pop(), expected["b"] * 2)
    assert_same(c.pop(), expected["c"])
    alive = weakref.ref(model), weakref.ref(other)
    del model, other, a, b, c
    gc.collect()
    assert alive[0]() is None and alive[1]() is None, "the patch kept a model alive"


def test_captures_of_two_models_in_two_threads():
    models = [build("qwen3", "sdpa"), build("llama", "sdpa", seed=1)]  # one implementation name, shared
    expected = [captured(model, ids=SEQS[i]) for i, model in enumerate(models)]
    before, errors, start = registry(), [], threading.Barrier(2)

    def work(i):
        try:
            start.wait()
            for _ in range(15):
                with torch.no_grad(), AttentionCapture(models[i], CFG) as capture:
                    models[i](torch.tensor([SEQS[i]]), use_cache=False)
                assert_same(capture.pop(), expected[i])
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert registry() == before


def test_capturing_one_model_in_two_threads_at_once_is_refused():
    """The forward state is per capture: a second thread's capture of the same model is refused when entered
    (it used to fail with an obscure cu_seqlens error, or silently mix the two threads' forwards)."""
    model, before = build(), registry()
    expected = captured(model, ids=SEQS[1])
    entered, done, errors = threading.Event(), threading.Event(), []

    def hold():  # thread 1 keeps a capture of `model` active
        try:
            with torch.no_grad(), AttentionCapture(model, CFG) as capture:
                entered.set()
                done.wait(30)
                model(torch.tensor([SEQS[1]]), use_cache=False)
            assert_same(capture.pop(), expected)
        except Exception as err:  # noqa: BLE001 - reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert entered.wait(30)
        second = AttentionCapture(model, CFG)
        with pytest.raises(
            CaptureError, match="already being captured by an AttentionCapture entered in another thread"
        ):
            second.__enter__()
        with torch.no_grad(), AttentionCapture(build(seed=1), CFG):  # another model in this thread: fine
            pass
    finally:
        done.set()
        thread.join()
    assert errors == []
    with torch.no_grad(), second:  # once the other thread is done, the same capture can be entered here
        model(torch.tensor([SEQS[1]]), use_cache=False)
    assert_same(second.pop(), expected)
    assert registry() == before


def test_exit_after_a_failed_forward_restores_the_registry():
    model, before = build(), registry()
    with pytest.raises(CaptureError, match="without a KV cache"):
        with torch.no_grad(), AttentionCapture(model, CFG):
            model.generate(torch.tensor([SEQS[2]]), max_new_tokens=2, do_sample=False)
    assert registry() == before


def test_attention_implementation_changed_after_building_is_followed_or_refused():
    """set_attn_implementation between building and entering is followed; while active, refused by name (it used
    to say the model "does not use transformers' attention functions")."""
    model, before = build(), registry()
    expected = captured(model)
    capture = AttentionCapture(model, CFG)  # built under sdpa
    model.set_attn_implementation("eager")
    with torch.no_grad(), capture:
        model(torch.tensor([SEQS[0]]), use_cache=False)
        assert capture.implementation == "eager"
        model.set_attn_implementation("sdpa")
        with pytest.raises(
            CaptureError, match="implementation changed from 'eager' to 'sdpa' while the capture was active"
        ):
            model(torch.tensor([SEQS[0]]), use_cache=False)
    stats = capture.pop()
    assert len(stats) == 1
    torch.testing.assert_close(stats[0].waad, expected[0].waad, atol=1e-5, rtol=0)
    assert registry() == before
    with torch.no_grad(), capture:  # entered again: follows sdpa
        model(torch.tensor([SEQS[0]]), use_cache=False)
    assert capture.implementation == "sdpa"
    assert_same(capture.pop(), expected)
    assert registry() == before
