"""CPU mode: run verl 0.9.1's whole `main_ppo` loop (Ray, FSDP2, rollout, TQ) on a CPU-only host.

Three parts, none of which edits verl:

- `register()` adds the "cpu" platform (`platform.PlatformCPU`) and the "hf" rollout
  (`rollout.py`) to verl's registries and wraps `torch.distributed.init_process_group`. It runs
  on import, so `VERL_USE_EXTERNAL_MODULES` (see `cpu_env`) or the package's `verl.plugins`
  entry point loads it in every verl process: driver, TaskRunner and Ray workers.
- `cpu_env()`: the environment variables that select the CPU platform and keep everything offline.
- `cpu_overrides(...)`: the hydra overrides that make `python -m verl.trainer.main_ppo` fit a
  small CPU machine (FSDP2, eager/sdpa attention, hf rollout, a fake logical GPU, one TQ unit).

The platform and the process-group fix act only under `VERL_PLATFORM=cpu`, the rollout only when
`rollout.name=hf` is chosen, so importing the package on a GPU cluster changes nothing. This is a
smoke/integration path, not training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["cpu_env", "cpu_overrides", "register"]

_ROLLOUT_ADAPTER = "verl_anchor.integration.cpu.rollout.HFServerAdapter"


def _load_hf_replica() -> type:
    from verl_anchor.integration.cpu.rollout import HFReplica

    return HFReplica


def register() -> None:
    """Register the CPU platform and the hf rollout with verl. Idempotent, cheap, any process."""
    # Import verl before our platform module, so that when this is the process's first verl import,
    # verl itself imports the (then complete) platform module from VERL_USE_EXTERNAL_MODULES.
    from verl_anchor.integration import verl_api

    verl_api.resolve("PlatformRegistry")  # imports verl.plugin.platform

    # The platform before the rollout modules: importing those may already resolve the platform.
    from verl_anchor.integration.cpu.platform import patch_init_process_group, patch_valuehead_loader, register_platform

    register_platform()
    patch_init_process_group()
    patch_valuehead_loader()

    rollouts, replicas = verl_api.resolve("_ROLLOUT_REGISTRY"), verl_api.resolve("RolloutReplicaRegistry")
    rollouts.setdefault(("hf", "async"), _ROLLOUT_ADAPTER)
    if "hf" not in replicas._registry:
        replicas.register("hf", _load_hf_replica)


def cpu_env(extra_modules: Sequence[str] = ()) -> dict[str, str]:
    """Environment for a CPU `main_ppo` run; merge it into `os.environ` of the launching process.

    `extra_modules` are appended to `VERL_USE_EXTERNAL_MODULES` (imported by every verl process).
    The platform module comes first: verl imports these modules before anything can resolve the
    platform, even in a process whose first import is `verl_anchor.integration.cpu` itself (whose own
    registration only runs after verl's import, plugins included, has finished).
    """
    return {
        "VERL_USE_EXTERNAL_MODULES": ",".join(
            ["verl_anchor.integration.cpu.platform", "verl_anchor.integration.cpu", *extra_modules]
        ),
        "VERL_PLATFORM": "cpu",
        # verl registers its FSDP engine for cuda/npu only; select that one explicitly.
        "VERL_ENGINE_DEVICE": "cuda",
        "VERL_ENGINE_VENDOR": "nvidia",
        # Ray 2.60 turns on token auth by default; a local throwaway cluster does not need it.
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }


def cpu_overrides(
    model_path: str | os.PathLike,
    train_files: str | os.PathLike,
    val_files: str | os.PathLike,
    *,
    adv_estimator: str = "grpo",
    train_batch_size: int = 4,
    rollout_n: int = 2,
    max_prompt_length: int = 64,
    max_response_length: int = 32,
    total_training_steps: int = 2,
    ppo_mini_batch_size: int | None = None,
    micro_batch_size_per_gpu: int = 2,
    lr: float = 1e-4,
    use_remove_padding: bool = False,
    attn_implementation: str = "eager",
    param_dtype: str = "fp32",
    num_cpus: int = 16,
    seed: int = 0,
    n_gpus: int = 1,
    use_dynamic_bsz: bool = False,
    max_token_len_per_gpu: int | None = None,
) -> list[str]:
    """Hydra overrides for `python -m verl.trainer.main_ppo` on CPU (use with `cpu_env()`).

    Batch sizes count prompts (`ppo_mini_batch_size` defaults to `train_batch_size`); each prompt
    gets `rollout_n` responses. `param_dtype` is FSDP's compute dtype: with verl's default, bf16,
    the actor's log-probs come out in bf16 (CPU autocast); fp32 matches the fp32 hf rollout to
    ~1e-6. `num_cpus` is what Ray is told the host has: the TQ controller, storage unit,
    TaskRunner, worker, agent-loop and reward-loop actors each reserve a CPU, and with the real
    count (2) the placement group never becomes ready.

    `n_gpus` actor ranks (gloo processes, each on a fake logical GPU). `use_dynamic_bsz` packs
    micro-batches by token budget (actor, log-prob pass and critic alike) with
    `max_token_len_per_gpu` tokens each (default: two longest sequences, so that batches split).
    The critic (used when verl enables it, e.g. a `gae` base) is configured like the actor.
    """
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be eager or sdpa on CPU, not {attn_implementation!r}")
    mini = ppo_mini_batch_size or train_batch_size
    token_budget = max_token_len_per_gpu or 2 * (max_prompt_length + max_response_length)
    return [
        f"algorithm.adv_estimator={adv_estimator}",
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={train_files}",
        f"data.val_files={val_files}",
        f"data.train_batch_size={train_batch_size}",
        f"data.max_prompt_length={max_prompt_length}",
        f"data.max_response_length={max_response_length}",
        "data.dataloader_num_workers=0",
        f"data.seed={seed}",
        f"actor_rollout_ref.model.path={model_path}",
        f"actor_rollout_ref.model.use_remove_padding={use_remove_padding}",
        f"++actor_rollout_ref.model.override_config.attn_implementation={attn_implementation}",
        # FSDP1 needs an accelerator (device_id=...); FSDP2 runs on CPU with gloo.
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.strategy=fsdp2",
        "actor_rollout_ref.actor.use_torch_compile=False",
        # torch.compile of the entropy kernel costs ~18 s of inductor time on CPU, on the first step.
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.ref.fsdp_config.use_torch_compile=False",
        f"++actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype={param_dtype}",
        f"++actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype={param_dtype}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro_batch_size_per_gpu}",
        f"actor_rollout_ref.actor.use_dynamic_bsz={use_dynamic_bsz}",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={token_budget}",
        f"actor_rollout_ref.rollout.log_prob_use_dynamic_bsz={use_dynamic_bsz}",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={token_budget}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        "actor_rollout_ref.rollout.name=hf",
        f"actor_rollout_ref.rollout.n={rollout_n}",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro_batch_size_per_gpu}",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        # The critic, when verl enables one, runs on CPU exactly like the actor.
        f"critic.model.path={model_path}",
        f"critic.model.use_remove_padding={use_remove_padding}",
        f"++critic.model.override_config.attn_implementation={attn_implementation}",
        "critic.strategy=fsdp2",
        "critic.fsdp.strategy=fsdp2",
        "critic.fsdp.use_torch_compile=False",
        f"++critic.fsdp.mixed_precision.param_dtype={param_dtype}",
        f"critic.ppo_micro_batch_size_per_gpu={micro_batch_size_per_gpu}",
        f"critic.ppo_max_token_len_per_gpu={token_budget}",
        f"critic.optim.lr={lr}",
        f"ray_kwargs.ray_init.num_cpus={num_cpus}",
        # verl's resource-pool manager always asks Ray for GPUs: advertise one logical GPU.
        f"++ray_kwargs.ray_init.num_gpus={n_gpus}",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={n_gpus}",
        "trainer.nnodes=1",
        "trainer.logger=[console]",
        f"trainer.total_training_steps={total_training_steps}",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
    ]


register()
