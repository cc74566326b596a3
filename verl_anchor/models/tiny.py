"""Tiny offline assets: a byte-level BPE tokenizer and random Qwen3/Qwen2/Llama decoders.

`tiny_arch_config` makes a tiny config of most other transformers decoder families too (the
architecture tests of the capture, `docs/models.md`).

Nothing here downloads anything. The tokenizer is trained with the `tokenizers` library on a
small embedded corpus (arithmetic, GSM8K/MATH instructions, answer tags) and carries a
Qwen-style (ChatML) chat template, so verl's `RLHFDataset` and agent loop treat it like a
Qwen tokenizer. The models are random and tiny (~140k parameters) so a whole verl GRPO run
fits on a 2-core CPU; they are for tests and smoke runs, not for learning anything.

`build_once` builds a cached asset (these, and the trained policies of `verl_anchor.models.policy`) once,
atomically, with a `SHA256SUMS` that later uses check, so a cut-short or unfinished asset is rebuilt.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from verl_anchor.usage import UsageError

__all__ = [
    "EOS_ID",
    "EOS_TOKEN",
    "IM_START_ID",
    "PAD_ID",
    "PAD_TOKEN",
    "VOCAB_SIZE",
    "CHECKSUMS",
    "CacheError",
    "asset_problem",
    "build_model",
    "build_once",
    "build_tokenizer",
    "ensure_tiny_model",
    "sha256_file",
    "tiny_arch_config",
    "tiny_config",
    "write_checksums",
]

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# BpeTrainer assigns special tokens the first ids, in this order; tiny_config relies on it.
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)
PAD_ID, IM_START_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 1024

# Bump when the corpus, tokenizer or model recipe changes, so ensure_tiny_model rebuilds.
_ASSET_VERSION = 1

# ChatML as Qwen2/Qwen3 render it, without Qwen's tool and thinking branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TEXT = """\
Let's think step by step and output the final answer after "####".
Let's think step by step and output the final answer within \\boxed{}.
Using the numbers, create an equation that equals the target. Show your work in <think> </think> tags.
And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.
The answer is \\boxed{42}. So the final answer is #### 42
system user assistant You are a helpful assistant.
system
user
assistant
What is the answer? How many are left?
Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?
Betty is saving money for a new wallet which costs $100. She has only half of the money she needs.
James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?
A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?
the a an and or of to in is are was were be it that this with for on as at by from he she they we you
number numbers total each per more less than half twice three four five six seven eight nine ten
first second then next finally so therefore because if what how many much does did do has have had
add subtract multiply divide sum difference product quotient equals equal target answer step
apples oranges books pages dollars cents hours minutes days weeks years students friends cookies
"""


def _corpus() -> list[str]:
    """The training corpus: fixed text plus deterministic arithmetic drills."""
    rng = random.Random(0)
    # Repeat the prose so BPE merges whole words and tags, not only digit runs.
    lines = _TEXT.splitlines() * 40
    for _ in range(1000):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        op = rng.choice("+-*/")
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        lines.append(f"{a} {op} {b} = {value}")
        lines.append(f"<answer> ({a} {op} {b}) </answer> #### {value} \\boxed{{{value}}}")
    lines += [" ".join(str(d) for d in range(i, i + 10)) for i in range(0, 1000, 10)]
    return lines


def build_tokenizer(out_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer; save it to `out_dir` when given.

    Any byte string can be encoded (byte-level alphabet), "\\n" is one token (verl's Qwen
    continuous-token builder requires that), pad is `<|endoftext|>` and eos is `<|im_end|>`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, IM_START_ID, EOS_ID), strict=True):
        assert backend.token_to_id(token) == expected, f"{token} got id {backend.token_to_id(token)}"

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


_ARCHS: dict[str, type[PretrainedConfig]] = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}


def tiny_config(arch: str = "qwen3", **overrides: Any) -> PretrainedConfig:
    """A fresh tiny decoder config (`arch` in qwen3, qwen2, llama); `overrides` win.

    A new object on every call: `_from_config` keeps and mutates the config it is given, so
    two models must never share one (e.g. an eager and an sdpa copy).
    """
    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCHS)}")
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="float32",
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=EOS_ID,
    )
    if arch != "qwen2":  # Qwen2Config derives head_dim = hidden_size // num_attention_heads
        kwargs["head_dim"] = 16
    kwargs.update(overrides)
    return copy.deepcopy(_ARCHS[arch](**kwargs))


# Fields that keep the other families tiny and valid: a few small experts (MoE), consistent MLA head sizes,
# a hybrid pattern with attention layers among the first four. Unknown fields are ignored by a config.
_TINY_MOE = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    intermediate_size_mlp=64,
)
_ARCH_EXTRAS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        head_dim=8,
    ),
    "jamba": dict(
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=4,
        mamba_expand=1,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "qwen3_next": dict(
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=2,
    ),
}


def tiny_arch_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A fresh tiny config of the transformers decoder family `model_type` (e.g. "gemma2", "jamba"): 4 layers,
    4 query / 2 key-value heads of 16 dims, vocabulary 128, float32; `overrides` win."""
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"unknown model_type {model_type!r}: not a transformers config")
    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        dtype="float32",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **_TINY_MOE,
    )
    kwargs.update(_ARCH_EXTRAS.get(model_type, {}))
    kwargs.update(overrides)
    return CONFIG_MAPPING[model_type](**kwargs)


def build_model(
    out_dir: str | os.PathLike | None = None, arch: str = "qwen3", seed: int = 0, **config_overrides: Any
) -> PreTrainedModel:
    """Build a tiny random decoder, deterministic in `seed`.

    With `out_dir`, save the model (safetensors), the tokenizer and a generation config
    (eos/pad ids) there, so the directory works as `actor_rollout_ref.model.path`. The
    vocabulary is the tokenizer's, rounded up to a multiple of 64.
    """
    tokenizer = build_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64
    config = tiny_config(arch, **{"vocab_size": vocab, **config_overrides})
    # Seed a forked RNG: deterministic weights without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    model.eval()
    if out_dir is not None:
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    return model


def ensure_tiny_model(cache_dir: str | os.PathLike, arch: str = "qwen3", seed: int = 0) -> Path:
    """Return the directory of the tiny model in `cache_dir`, building it on first use (see `build_once`)."""
    final = Path(cache_dir) / f"tiny-{arch}-s{seed}-v{_ASSET_VERSION}"
    return build_once(final, lambda tmp: build_model(tmp, arch=arch, seed=seed))


class CacheError(UsageError):
    """The asset cache cannot be used (a file in the way, no permission, a full disk): one `error:` line."""


CHECKSUMS = "SHA256SUMS"  # in every built asset, the format of `sha256sum`, so `sha256sum -c SHA256SUMS` checks it


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """Record the sha256 of every file under `directory` in `directory / CHECKSUMS` (written last)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    (directory / CHECKSUMS).write_text("".join(lines))


def asset_problem(directory: Path) -> str | None:
    """What is wrong with the built asset `directory` (missing, unfinished, a file changed or cut short);
    None when every file its `CHECKSUMS` lists is there with the recorded sha256."""
    try:
        lines = (directory / CHECKSUMS).read_text().splitlines()
    except OSError:
        return (
            f"it has no {CHECKSUMS} (not built, or its build did not finish)"
            if directory.exists()
            else "it does not exist"
        )
    for line in lines:
        recorded, _, name = line.partition("  ")
        try:
            actual = sha256_file(directory / name)
        except OSError:
            return f"{name} is missing"
        if actual != recorded:
            return f"{name} does not match its sha256 in {CHECKSUMS} (changed or cut short)"
    return None if lines else f"its {CHECKSUMS} is empty"


def build_once(final: Path, build: Callable[[Path], Any]) -> Path:
    """`final`, built by `build(directory)` unless it is there and complete (`asset_problem`).

    The asset is built in a temporary sibling `.<name>-*` and renamed into place with its `CHECKSUMS`, so a
    reader never sees a half-written one. Builders of one asset take turns on a lock file (`.<name>.lock`,
    released by the OS when a builder dies): a second one waits and then uses the first one's result, and
    the builder holding the lock removes the temporary directories of killed builds and an incomplete
    `final` before building anew. `CacheError` when the cache directory cannot be used.
    """
    if asset_problem(final) is None:
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(final.parent / f".{final.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            problem = asset_problem(final)
            if problem is None:  # built by the builder we waited for
                return final
            for stale in final.parent.glob(f".{final.name}-*"):  # no live builder: we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            if final.is_dir() and not final.is_symlink():
                logger.warning("rebuilding %s: %s", final, problem)
                shutil.rmtree(final)
            elif final.exists() or final.is_symlink():
                final.unlink()
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
            try:
                build(tmp)
                write_checksums(tmp)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:
        raise CacheError(
            f"cannot build {final.name} in the cache {final.parent}: {err.strerror or err}"
            f"{f' ({err.filename})' if err.filename else ''}; use a writable directory "
            "(VERL_ANCHOR_CACHE sets the default cache)"
        ) from err
    return final
