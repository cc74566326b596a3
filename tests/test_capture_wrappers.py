"""The capture reads the call its decoder sees, under every wrapper verl puts around the actor.

FSDP1 (verl's default `actor.strategy=fsdp`; its forward is `(*args, **kwargs)`), FSDP2, PEFT/LoRA, verl's
`use_fused_kernels` (the model class's `forward` replaced) and a model that takes `use_cache` through
`**kwargs` (GraniteMoE), each in verl's two input layouts, against the same sequences captured one by one
on the bare model (itself checked against eager attention in test_capture.py). Real wrappers, on CPU.
"""

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from test_capture import SEQS
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import AutoModelForCausalLM
from verl.models.transformers.monkey_patch import patch_forward_with_backends

from verl_anchor import AnchorConfig
from verl_anchor.capture.hooks import AttentionCapture
from verl_anchor.models.tiny import tiny_arch_config

CFG = AnchorConfig(layers=[1, 3], fai_h_lo=2, fai_h_hi=6, window=4)


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-process gloo group, as FSDP needs (FSDP1 with device_id=cpu, FSDP2 on a CPU mesh)."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("dist") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def bare(arch="qwen3"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_arch_config(arch), attn_implementation="sdpa").eval()


def fsdp1(model):
    layer_class = type(model.model.layers[0])
    return FullyShardedDataParallel(
        model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({layer_class})
    )


def fsdp2(model):
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def lora(model):
    config = LoraConfig(
        r=4, target_modules=["q_proj", "k_proj"], lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False
    )  # non-zero adapters: the captured q/k must include them
    return get_peft_model(model, config)


def fused_kernels(model):
    """verl's `use_fused_kernels=True`: replaces the CLASS's forward (on a private subclass, to keep it local)."""
    model.__class__ = type(f"Fused{type(model).__name__}", (type(model),), {})
    patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
    return model


WRAPPERS = {"fsdp1": fsdp1, "fsdp2": fsdp2, "peft_lora": lora, "fused_kernels": fused_kernels}


def call(model, layout):
    """One forward the way verl's engine makes it (use_remove_padding=True: packed; False: right-padded).
    `return_dict=True`: verl's fused-kernel forward takes nothing else."""
    if layout == "packed":
        ids = torch.tensor([sum(SEQS, [])])
        positions = torch.tensor([sum((list(range(len(s))) for s in SEQS), [])])
        return model(input_ids=ids, attention_mask=None, position_ids=positions, use_cache=False, return_dict=True)
    width = max(map(len, SEQS))
    ids = torch.zeros(len(SEQS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(SEQS):
        ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0),
        use_cache=False,
        return_dict=True,
    )


def one_by_one(model):
    capture = AttentionCapture(model, CFG)
    with torch.no_grad(), capture:
        for seq in SEQS:
            model(torch.tensor([seq]), use_cache=False, return_dict=True)
    return capture.pop()


def assert_same(stats, expected):
    assert [s.waad.shape for s in stats] == [e.waad.shape for e in expected]
    for got, want in zip(stats, expected):
        for field in ("row_span", "waad", "fai"):
            torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_capture_under_verl_wrappers(process_group, wrapper, layout):
    model = WRAPPERS[wrapper](bare())
    # The reference runs the very same modules (LoRA adapters included), captured one sequence at a time.
    expected = one_by_one(model)
    capture = AttentionCapture(model, CFG, max_length=64)
    assert capture.layers == [1, 3]
    with torch.no_grad(), capture:
        call(model, layout)
    assert_same(capture.pop(), expected)


def test_use_cache_passed_through_kwargs_still_splits_packed_sequences():
    """GraniteMoeForCausalLM.forward has no `use_cache` parameter: it reaches the decoder through **kwargs."""
    model = bare("granitemoe")
    expected = one_by_one(model)
    capture = AttentionCapture(model, CFG)
    with torch.no_grad(), capture:
        call(model, "packed")
    assert_same(capture.pop(), expected)


def test_capture_built_before_a_class_forward_patch_still_reads_the_decoder():
    """verl may patch the class after the capture exists (or the capture outlive a re-patch)."""
    model = bare()
    expected = one_by_one(model)
    capture = AttentionCapture(model, CFG)
    fused_kernels(model)
    with torch.no_grad(), capture:
        call(model, "packed")
    assert_same(capture.pop(), expected)
