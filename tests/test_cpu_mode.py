"""CPU mode and tiny assets: the tiny tokenizer/model, the CPU platform, the hf rollout server,
and (slow) verl's whole `main_ppo` GRPO loop on CPU in both sequence layouts."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl_anchor.integration.cpu import cpu_env, cpu_overrides, register
from verl_anchor.integration.cpu.launch import parse_step_metrics, run_main_ppo
from verl_anchor.models import tiny

MESSAGES = [{"role": "user", "content": "What is 12 + 35? Let's think step by step."}]


# ---------------------------------------------------------------- tiny assets


def test_tokenizer_chat_template_and_special_tokens(tmp_path):
    tok = tiny.build_tokenizer(tmp_path)
    assert len(tok) == tiny.VOCAB_SIZE
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", tiny.PAD_ID)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", tiny.EOS_ID)
    assert tok.convert_tokens_to_ids("<|im_start|>") == tiny.IM_START_ID
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{MESSAGES[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    assert len(tok.encode("\n", add_special_tokens=False)) == 1  # verl's Qwen token builder needs it
    ids = tok(text)["input_ids"]
    assert ids[0] == tiny.IM_START_ID and tok.decode(ids) == text
    assert len(ids) < 40  # BPE merged the words: prompts stay short
    # Byte-level: arbitrary text round-trips.
    odd = "<answer> (7 - 2) * 3 </answer> \\boxed{15} #### 15 ünïcode"
    assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == text
    assert loaded.get_vocab() == tiny.build_tokenizer().get_vocab()  # training is deterministic


def test_model_round_trip_and_seed_determinism(tmp_path):
    model = tiny.build_model(tmp_path / "m", seed=3)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (1024, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (128, 2048, False)
    assert loaded.generation_config.eos_token_id == tiny.EOS_ID
    assert loaded.generation_config.pad_token_id == tiny.PAD_ID
    assert (tmp_path / "m" / "model.safetensors").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    rng_before = torch.get_rng_state()
    same, other = tiny.build_model(seed=3), tiny.build_model(seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True))
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


@pytest.mark.parametrize(
    "arch, cls", [("qwen3", "Qwen3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("llama", "LlamaForCausalLM")]
)
def test_tiny_config_archs_and_fresh_objects(arch, cls):
    a, b = tiny.tiny_config(arch, num_hidden_layers=4), tiny.tiny_config(arch, num_hidden_layers=4)
    assert a is not b and a.num_hidden_layers == 4
    assert getattr(a, "head_dim", a.hidden_size // a.num_attention_heads) == 16
    model = AutoModelForCausalLM.from_config(a, attn_implementation="eager")
    assert type(model).__name__ == cls
    assert a._attn_implementation == "eager" and b._attn_implementation != "eager"  # `b` untouched
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.tiny_config("gpt2")


def test_ensure_tiny_model_builds_once(tmp_path):
    path = tiny.ensure_tiny_model(tmp_path)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_model(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    # no temporary directory left behind (the builders' lock file stays: removing it would make the lock racy)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [path.name]
    AutoModelForCausalLM.from_pretrained(path)


# ---------------------------------------------------------------- registration and platform


def test_register_is_idempotent():
    from verl.plugin.platform import PlatformRegistry
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_anchor.integration.cpu.platform import PlatformCPU
    from verl_anchor.integration.cpu.rollout import HFReplica, HFServerAdapter

    for _ in range(3):
        register()
    assert PlatformRegistry.get("cpu") is PlatformCPU
    assert get_rollout_class("hf", "async") is HFServerAdapter
    assert RolloutReplicaRegistry.get("hf") is HFReplica
    assert _ROLLOUT_REGISTRY[("vllm", "async")].startswith("verl.")  # built-ins untouched
    wrapper = dist.init_process_group
    assert wrapper._verl_anchor_cpu and not getattr(wrapper.__wrapped__, "_verl_anchor_cpu", False)


def test_init_process_group_rewrites_only_on_the_cpu_platform(tmp_path, monkeypatch):
    register()
    backend = "cpu:gloo,cpu:gloo"  # what verl builds when the device is "cpu"
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    with pytest.raises(ValueError, match="Duplicate device type cpu"):
        dist.init_process_group(backend=backend, init_method=f"file://{tmp_path}/a", rank=0, world_size=1)
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    dist.init_process_group(backend=backend, init_method=f"file://{tmp_path}/b", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "gloo"
    finally:
        dist.destroy_process_group()


_PROBE = """
import json
{first_import}
from verl.plugin.platform import PlatformRegistry, get_platform
from verl.utils import device
p = get_platform()
got = {{"device": p.device_name, "registered": list(PlatformRegistry.registered_names())}}
if p.device_name == "cpu":
    mod = device.get_torch_device()
    got.update(backend=p.communication_backend_name(), device_id=str(device.get_device_id()),
               mem=list(mod.mem_get_info()), allocated=mod.memory_allocated(), gpu_name=mod.get_device_name())
print("PROBE" + json.dumps(got))
"""


def _probe(first_import: str, env: dict[str, str]) -> dict:
    run_env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(first_import=first_import)],
        env={**run_env, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Unknown platform" not in out.stderr and "failed to register" not in out.stderr, out.stderr[-3000:]
    return json.loads(out.stdout.split("PROBE", 1)[1])


@pytest.mark.parametrize("first_import", ["import verl", "import verl_anchor.integration.cpu.rollout"])
def test_cpu_platform_resolves_under_cpu_env(first_import):
    # "import verl_anchor.integration.cpu.rollout" first is what the hf server's Ray actor process does.
    got = _probe(first_import, cpu_env())
    assert (got["device"], got["backend"], got["device_id"], got["gpu_name"]) == ("cpu", "gloo", "cpu", "CPU")
    assert got["allocated"] == 0 and 0 < got["mem"][0] <= got["mem"][1]


def test_importing_cpu_mode_without_verl_platform_changes_nothing():
    got = _probe("import verl_anchor.integration.cpu", {})
    assert got["device"] != "cpu"  # stock detection (falls back to nvidia without a GPU)
    assert "cpu" in got["registered"]


# ---------------------------------------------------------------- hf rollout server


def _eos_prone_model(out_dir: Path) -> Path:
    """The tiny model with its eos logit amplified: responses end at varied lengths."""
    model = tiny.build_model()
    with torch.no_grad():
        model.lm_head.weight[tiny.EOS_ID] *= 40
    model.save_pretrained(out_dir)
    tiny.build_tokenizer(out_dir)
    return out_dir


def test_hf_server_generates_with_log_probs_and_loads_weights(tmp_path):
    from verl_anchor.integration.cpu.rollout import HFServer

    server = HFServer(str(_eos_prone_model(tmp_path)), prompt_length=32, response_length=24)
    tok = tiny.build_tokenizer()
    lengths = []
    for i in range(12):
        prompt = tok(
            tok.apply_chat_template(
                [{"role": "user", "content": f"What is {i} + 2?"}], add_generation_prompt=True, tokenize=False
            )
        )["input_ids"]
        out = asyncio.run(
            server.generate(
                "r",
                prompt_ids=prompt,
                sampling_params=dict(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0, logprobs=True),
            )
        )
        assert 1 <= len(out.token_ids) <= 24 and len(out.log_probs) == len(out.token_ids)
        assert tiny.EOS_ID not in out.token_ids[:-1]  # generation stops at the first eos
        lengths.append(len(out.token_ids))
        with torch.no_grad():  # log-probs are those of a full forward over prompt + response
            logits = server.model(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.log_probs), ref, atol=1e-4, rtol=0)
    assert min(lengths) < 24 and max(lengths) > min(lengths)

    greedy = dict(temperature=0, top_p=1.0, top_k=-1, logprobs=False, max_tokens=5)
    first = asyncio.run(server.generate("g", prompt_ids=prompt, sampling_params=greedy))
    assert first.log_probs is None and len(first.token_ids) <= 5
    assert asyncio.run(server.generate("g", prompt_ids=prompt, sampling_params=greedy)).token_ids == first.token_ids

    new = {k: torch.randn_like(v) for k, v in server.model.state_dict().items()}
    asyncio.run(server.load_weights(new, global_steps=7))
    assert torch.equal(server.model.lm_head.weight, new["lm_head.weight"])
    assert asyncio.run(server.generate("g", prompt_ids=prompt, sampling_params=greedy)).extra_fields == {
        "global_steps": 7
    }
    with pytest.raises(KeyError):
        asyncio.run(server.load_weights({"not.a.weight": torch.zeros(1)}))


# ---------------------------------------------------------------- verl main_ppo end to end


def _gsm8k_rows(split: str, n: int) -> pd.DataFrame:
    """GSM8K-schema rows whose prompts differ in length."""
    rows = []
    for i in range(n):
        a, b = 3 + 7 * i, 5 + i * i
        question = f"What is {a} + {b}?" + " Then add one more apple." * (i % 3)
        rows.append(
            {
                "data_source": "openai/gsm8k",
                "prompt": [
                    {
                        "role": "user",
                        "content": question + ' Let\'s think step by step and output the final answer after "####".',
                    }
                ],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(a + b + i % 3)},
                "extra_info": {"split": split, "index": i},
            }
        )
    return pd.DataFrame(rows)


# verl's GSM8K rule ("#### N") plus the fraction of digits in the response: a random model never
# earns the GSM8K point, and without reward variance GRPO's advantages (and gradients) are zero.
_REWARD = """
from verl.utils.reward_score import default_compute_score

def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    base = default_compute_score(data_source, solution_str, ground_truth, extra_info)
    return float(base) + sum(c.isdigit() for c in solution_str) / max(len(solution_str), 1)
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_main_ppo_grpo_runs_on_cpu(tmp_path, layout):
    model_dir = _eos_prone_model(tmp_path / "model")
    _gsm8k_rows("train", 16).to_parquet(tmp_path / "train.parquet")
    _gsm8k_rows("test", 8).to_parquet(tmp_path / "test.parquet")
    (tmp_path / "reward.py").write_text(_REWARD)
    overrides = cpu_overrides(
        model_dir,
        tmp_path / "train.parquet",
        tmp_path / "test.parquet",
        total_training_steps=2,
        max_prompt_length=64,
        max_response_length=32,
        # A large step, so that a rollout server left with step-1 weights would be caught below.
        lr=1e-2,
        # padded: verl right-pads each micro-batch with a 2-D mask; packed (verl's default):
        # one (1, total_tokens) row, position ids restarting per sequence, no mask.
        use_remove_padding=layout == "packed",
        attn_implementation="sdpa" if layout == "packed" else "eager",
    ) + [
        f"reward.custom_reward_function.path={tmp_path / 'reward.py'}",
        "reward.custom_reward_function.name=compute_score",
    ]
    log_path = tmp_path / "main_ppo.log"
    rc = run_main_ppo(overrides, tmp_path, log_path, timeout=840)
    log = log_path.read_text(errors="replace")
    assert rc == 0, log[-6000:]
    steps = parse_step_metrics(log)
    assert sorted(steps) == [1, 2], log[-6000:]
    # Step 1's random responses score differently, so GRPO has advantages and the actor a gradient.
    # After the large step-1 update the policy may collapse (all rewards equal, all advantages 0,
    # seen in CI): then a zero gradient is right, so later steps need a gradient only where
    # their advantages are non-zero.
    assert steps[1]["critic/advantages/max"] > 0
    for metrics in steps.values():
        assert metrics["timing_s/step"] > 0
        assert (metrics["actor/grad_norm"] > 0) == (metrics["critic/advantages/max"] > 0)
        # The actor's forward (this layout) reproduces the hf server's sampling probabilities. At
        # step 2 this also proves the weight sync: with the server still on the initial weights the
        # difference was 0.998 (1e-6 when synced).
        assert metrics["training/rollout_probs_diff_max"] < 1e-4
    # Responses stopped at eos before the length limit, so sequences really differ in length.
    assert min(m["response_length/mean"] for m in steps.values()) < 32


def test_step_metrics_read_numpy_scalars_as_the_legacy_trainer_prints_them():
    from verl_anchor.integration.cpu.launch import parse_step_metrics

    log = "noise\nstep:3 - critic/vf_loss:np.float64(0.081) - actor/lr:1e-05 - b:np.float32(-2e-3) - c:text\n"
    assert parse_step_metrics(log) == {3: {"critic/vf_loss": 0.081, "actor/lr": 1e-05, "b": -0.002}}
