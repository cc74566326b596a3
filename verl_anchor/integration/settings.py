"""Reading and validating the anchor options of a verl config (`algorithm.anchor.*`).

Runs in the driver before Ray starts (wrapped around verl's `validate_config`) and again
when the trainer is built, so a bad config fails before any rollout, with a message that
names the option, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_anchor.config import AnchorConfig

# verl estimator name -> strategy of spec §5.
ANCHOR_ESTIMATORS: dict[str, str] = {
    "anchor_local_chunk": "local_chunk",
    "anchor_global_anchor": "global_anchor",
    "anchor_coupled": "coupled",
    "anchor_random": "random",
    "anchor_entropy": "entropy",
}
TRAINER_MODE = "anchor_sync"
DEFAULT_BASE_ESTIMATOR = "grpo"
# Base estimators we cannot call: they need a critic (verl enables it only for adv_estimator=gae)
# or inputs that verl's compute_advantage passes only under their own name.
UNSUPPORTED_BASES = {
    "gae": "it needs a critic, which verl enables only when algorithm.adv_estimator=gae",
    "gdpo": "verl passes it the raw batch only under its own name",
    "optimal_token_baseline": "verl passes it sum_pi_squared only under its own name",
    "tir_optimal_token_baseline": "verl passes it sum_pi_squared only under its own name",
}


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
    """What the anchor trainer needs to know, read once from the verl config."""

    cfg: AnchorConfig
    estimator: str
    base_estimator: str


def anchor_block(config: DictConfig) -> dict[str, Any]:
    block = config.algorithm.get("anchor", None)
    if block is None:
        return {}
    return OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else dict(block)


def read_settings(config: DictConfig) -> AnchorSettings | None:
    """The anchor settings of a full verl config, or None when no anchor estimator is selected.

    Raises ValueError naming the option, the value and the fix for every unsupported combination.
    """
    estimator = str(config.algorithm.adv_estimator)
    mode = config.trainer.get("v1", {}).get("trainer_mode", None)
    if estimator not in ANCHOR_ESTIMATORS:
        return None
    if not config.trainer.get("use_v1", True):
        raise ValueError(f"algorithm.adv_estimator={estimator} needs verl's v1 trainer: set trainer.use_v1=true")
    if mode != TRAINER_MODE:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} needs trainer.v1.trainer_mode={TRAINER_MODE} (got {mode!r}): "
            f"add `trainer.v1.trainer_mode={TRAINER_MODE}`; the stock trainer would never compute or apply the "
            "attention-derived weights and would silently train plain GRPO"
        )
    options = anchor_block(config)
    base = options.pop("base_estimator", DEFAULT_BASE_ESTIMATOR)
    options.pop("enable", None)  # tolerated: the estimator name already says it
    if "strategy" in options:
        raise ValueError(
            f"algorithm.anchor.strategy={options['strategy']!r} is not an option: the strategy is chosen by "
            f"algorithm.adv_estimator (one of {', '.join(ANCHOR_ESTIMATORS)})"
        )
    cfg = AnchorConfig.from_mapping({**options, "strategy": ANCHOR_ESTIMATORS[estimator]}, prefix="algorithm.anchor.")
    _check_base_estimator(base)
    rollout_correction = config.algorithm.get("rollout_correction", None) or {}
    if rollout_correction.get("bypass_mode", False):
        raise ValueError(
            f"algorithm.rollout_correction.bypass_mode=true skips the old-log-prob forward in which {estimator} "
            "computes its statistics: set algorithm.rollout_correction.bypass_mode=false"
        )
    if cfg.needs_attention:
        _check_attention_backend(config, estimator)
    return AnchorSettings(cfg=cfg, estimator=estimator, base_estimator=base)


def _check_base_estimator(base: str) -> None:
    from verl.trainer.ppo import core_algos

    if base in ANCHOR_ESTIMATORS:
        raise ValueError(f"algorithm.anchor.base_estimator={base} is invalid: the base must be a plain verl estimator "
                         "such as grpo, rloo or reinforce_plus_plus")
    if base in UNSUPPORTED_BASES:
        raise ValueError(f"algorithm.anchor.base_estimator={base} is not supported: {UNSUPPORTED_BASES[base]}; "
                         "use grpo (default), rloo, reinforce_plus_plus, ...")
    known = {"grpo"} | set(core_algos.ADV_ESTIMATOR_REGISTRY)
    if base not in known:
        plain = sorted(k for k in known if k not in ANCHOR_ESTIMATORS and k not in UNSUPPORTED_BASES)
        raise ValueError(f"algorithm.anchor.base_estimator={base} is not a registered verl estimator; "
                         f"choose one of {', '.join(plain)}")


def _check_attention_backend(config: DictConfig, estimator: str) -> None:
    actor = config.actor_rollout_ref.actor
    strategy = actor.get("strategy", "fsdp")
    if strategy not in ("fsdp", "fsdp2"):
        raise ValueError(
            f"actor_rollout_ref.actor.strategy={strategy} is not supported by {estimator}: its statistics are captured "
            "from Hugging Face attention modules, which only the FSDP backend runs; set "
            "actor_rollout_ref.actor.strategy=fsdp2 (or fsdp), or use anchor_random / anchor_entropy"
        )
    for key, value in (
        ("actor_rollout_ref.actor.ulysses_sequence_parallel_size", actor.get("ulysses_sequence_parallel_size", 1)),
        ("actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
         actor.get("fsdp_config", {}).get("ulysses_sequence_parallel_size", 1)),
    ):
        if value is not None and int(value) > 1:
            raise ValueError(
                f"{key}={value} is not supported by {estimator}: with Ulysses sequence parallelism each rank sees "
                f"only a slice of every sequence's keys; set {key}=1"
            )
