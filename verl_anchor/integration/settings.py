"""Reading, completing and validating the anchor options of a verl config (`algorithm.anchor.*`).

`prepare_config` runs in the driver before Ray starts (wrapped around verl's `validate_config`)
and again when the trainer is built, so a bad config fails before any rollout, with a message
that names the option, the value and the fix. The estimator name is the only switch: any
stock `trainer.v1.trainer_mode` gets the anchor behaviour (see `integration.trainer`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from verl_anchor.core.config import AnchorConfig, suggest
from verl_anchor.integration import verl_api

logger = logging.getLogger(__name__)

# verl estimator name -> strategy of spec §5.
ANCHOR_ESTIMATORS: dict[str, str] = {
    "anchor_local_chunk": "local_chunk",
    "anchor_global_anchor": "global_anchor",
    "anchor_coupled": "coupled",
    "anchor_random": "random",
    "anchor_entropy": "entropy",
}
# The first version's trainer mode; kept as an alias of verl's "sync" so old command lines still run.
LEGACY_TRAINER_MODE = "anchor_sync"
# The base when algorithm.anchor.base_estimator is unset and critic.enable is not true.
DEFAULT_BASE_ESTIMATOR = "grpo"
# verl 0.9.1's placeholder for critic.model.path (trainer/config/critic/critic.yaml): never a real model.
VERL_PLACEHOLDER_CRITIC_PATH = "~/models/deepseek-llm-7b-chat"
# Base estimators each verl 0.9.1 trainer cannot run under the anchor name, and why.
UNSUPPORTED_BASES: dict[str, dict[str, str]] = {
    "v1": {
        "gdpo": "verl 0.9.1's v1 trainer does not give it the raw batch and reward keys it needs "
        "(it fails natively too)",
        "optimal_token_baseline": "verl 0.9.1's v1 trainer never computes sum_pi_squared for it "
        "(it fails natively too)",
        "tir_optimal_token_baseline": "verl 0.9.1's v1 trainer never computes sum_pi_squared for it "
        "(it fails natively too)",
        "remax": "verl 0.9.1's v1 trainer never computes the greedy reward_baselines it needs (it fails natively too)",
    },
    "legacy": {
        "remax": "verl's RayPPOTrainer.fit generates the greedy reward_baselines it needs only when "
        "algorithm.adv_estimator=remax itself",
    },
}


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
    """What the anchor trainer needs to know, read once from the verl config."""

    cfg: AnchorConfig
    estimator: str
    base_estimator: str
    dump_dir: str | None = None


def anchor_block(config: DictConfig) -> dict[str, Any]:
    block = config.algorithm.get("anchor", None)
    if block is None:
        return {}
    return OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else dict(block)


def prepare_config(config: DictConfig) -> AnchorSettings | None:
    """Complete a verl config for the anchor estimators in place, then validate it (`read_settings`).

    Completing means: the legacy mode name `anchor_sync` becomes verl's `sync`, and a `gae` base
    turns the critic on when `critic.enable` is unset (verl enables it only for adv_estimator=gae),
    starting it from the actor's model when `critic.model.path` is still verl's placeholder.
    """
    v1 = config.trainer.get("v1", None)
    if v1 is not None and v1.get("trainer_mode", None) == LEGACY_TRAINER_MODE:
        logger.warning(
            "trainer.v1.trainer_mode=%s is an alias of sync: the estimator alone selects the anchor "
            "trainer now; drop the override",
            LEGACY_TRAINER_MODE,
        )
        with open_dict(config):
            v1.trainer_mode = "sync"
    settings = read_settings(config)
    if settings is not None:
        # The driver decides the base once (it alone sees the command line); the trainer reads it back.
        with open_dict(config):
            if config.algorithm.get("anchor", None) is None:  # absent, or `algorithm.anchor: null` (no options)
                config.algorithm.anchor = {}
            config.algorithm.anchor.base_estimator = settings.base_estimator
    if settings is not None and settings.base_estimator == "gae" and config.critic.get("enable", None) is not False:
        with open_dict(config):
            if config.critic.get("enable", None) is None:
                logger.warning(
                    "verl_anchor: algorithm.anchor.base_estimator=gae turns verl's critic on "
                    "(critic.enable=true); an earlier 'Disabled critic' warning from verl no longer applies"
                )
                config.critic.enable = True
            critic_model = config.critic.get("model", None)
            if critic_model is not None and critic_model.get("path", None) == VERL_PLACEHOLDER_CRITIC_PATH:
                logger.warning(
                    "verl_anchor: critic.model.path is unset; the critic starts from the actor's model "
                    "(%s); set critic.model.path to choose another",
                    config.actor_rollout_ref.model.path,
                )
                critic_model.path = config.actor_rollout_ref.model.path
    return settings


# verl entry points whose trainer is built directly, never through the v1 trainer lookup, so the
# anchor step never runs there: module -> its trainer (their configs: `async_training` block, and
# one-step-off's top-level `rollout` block beside `actor_rollout_ref`).
UNSUPPORTED_ENTRY_POINTS = {
    "verl.experimental.fully_async_policy.fully_async_main": "FullyAsyncTrainer",
    "verl.experimental.one_step_off_policy.main_ppo": "OneStepOffRayTrainer",
}


def check_entry_point(config: DictConfig | None, entry_point: str | None = None) -> None:
    """Refuse the anchor estimators in a verl entry point that never runs the anchor trainer.

    Called from verl's `auto_set_device`, the first thing every entry point does with its config
    (SFT trainers too: their config has no `algorithm`, and verl accepts None). `entry_point`:
    default the `python -m` module of this process. The fully-async and one-step-off pipelines
    (`UNSUPPORTED_ENTRY_POINTS`) build their own trainers, so without this a run would die at its
    first advantage step, after the model load and a rollout; a fully-async config launched by
    another script is recognised by its `async_training` block.
    """
    if config is None:
        return
    estimator = OmegaConf.select(config, "algorithm.adv_estimator", default=None)
    if estimator not in ANCHOR_ESTIMATORS:
        return
    entry_point = _main_module() if entry_point is None else entry_point
    if entry_point not in UNSUPPORTED_ENTRY_POINTS and "async_training" in config:
        entry_point = "verl.experimental.fully_async_policy.fully_async_main"
    if entry_point in UNSUPPORTED_ENTRY_POINTS:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} is not supported by python -m {entry_point}: its "
            f"{UNSUPPORTED_ENTRY_POINTS[entry_point]} never runs the anchor step; launch python -m "
            "verl.trainer.main_ppo instead (trainer.v1.trainer_mode=separate_async puts the rollout on GPUs of its "
            "own), or choose a plain estimator such as grpo"
        )


def _main_module() -> str | None:
    """The module this process runs as `__main__` (`python -m NAME`), if any."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None)


def _check_transfer_queue(estimator: str) -> None:
    """verl's v1 trainer, which runs the anchor step, moves every batch through TransferQueue (verl[verl-core])."""
    if importlib.util.find_spec("transfer_queue") is None:
        raise ImportError(
            f"algorithm.adv_estimator={estimator} runs in verl's v1 trainer, which needs TransferQueue, and it is "
            "not installed: pip install 'verl[verl-core]'"
        )


def read_settings(config: DictConfig) -> AnchorSettings | None:
    """The anchor settings of a full verl config, or None when no anchor estimator is selected.

    Raises ValueError naming the option, the value and the fix for every unsupported combination.
    """
    estimator = str(config.algorithm.adv_estimator)
    if estimator not in ANCHOR_ESTIMATORS:
        _check_not_a_typo(estimator)
        if anchor_block(config):
            # Not refused: the recipes keep their anchor block when run with grpo as the plain baseline.
            logger.warning(
                "verl_anchor: algorithm.anchor.* is ignored with algorithm.adv_estimator=%s; "
                "an anchor_* estimator turns the method on",
                estimator,
            )
        return None
    if config.trainer.get("use_v1", True):
        _check_transfer_queue(estimator)
    # verl's neo branch: the legacy trainer's batches may move as references (NeoProto), which carry only the
    # fields verl itself names, not the statistics the anchor step adds to the old-log-prob batch.
    data_plane = config.trainer.get("data_plane", "classic")
    if data_plane != "classic":
        raise ValueError(
            f"trainer.data_plane={data_plane} is not supported by {estimator}: its batches carry only "
            "the fields verl names, not the anchor statistics; set trainer.data_plane=classic"
        )
    options = anchor_block(config)
    base, why = choose_base_estimator(config, options.pop("base_estimator", None))
    enable = options.pop("enable", True)
    dump_dir = options.pop("dump_dir", None)
    if dump_dir is not None and (not isinstance(dump_dir, str) or not dump_dir or os.path.isfile(dump_dir)):
        raise ValueError(
            f"algorithm.anchor.dump_dir={dump_dir!r} is invalid: give a directory path (it is created), or null"
        )
    if enable is not True:
        raise ValueError(
            f"algorithm.anchor.enable={enable!r} contradicts algorithm.adv_estimator={estimator}: the estimator name "
            f"turns the method on; for the plain baseline set algorithm.adv_estimator={base} instead"
        )
    if "strategy" in options:
        raise ValueError(
            f"algorithm.anchor.strategy={options['strategy']!r} is not an option: the strategy is chosen by "
            f"algorithm.adv_estimator (one of {', '.join(ANCHOR_ESTIMATORS)})"
        )
    cfg = AnchorConfig.from_mapping({**options, "strategy": ANCHOR_ESTIMATORS[estimator]}, prefix="algorithm.anchor.")
    _check_base_estimator(config, base)
    rollout_correction = config.algorithm.get("rollout_correction", None) or {}
    if rollout_correction.get("bypass_mode", False) and cfg.needs_forward:
        reads = "computes its attention statistics" if cfg.needs_attention else "reads the policy's token entropy"
        raise ValueError(
            f"algorithm.rollout_correction.bypass_mode=true skips the old-log-prob forward in which {estimator} "
            f"{reads}: set algorithm.rollout_correction.bypass_mode=false (anchor_random needs no such forward)"
        )
    if cfg.needs_attention:
        _check_attention_backend(config, estimator)
    # Last: the messages above name options the user can change; this one, the verl install.
    verl_api.check_installed(verl_pipelines(config, cfg))
    logger.warning("verl_anchor: %s runs on the %s base estimator (%s)", estimator, base, why)
    return AnchorSettings(cfg=cfg, estimator=estimator, base_estimator=base, dump_dir=dump_dir)


def choose_base_estimator(config: DictConfig, explicit: Any, argv: Sequence[str] | None = None) -> tuple[str, str]:
    """The estimator whose advantages gamma scales, and why; an explicit `algorithm.anchor.base_estimator` wins.

    Otherwise it follows what the user's launch says. The estimator the anchor name replaced is gone
    from the config, but a launch script that sets `algorithm.adv_estimator=rloo` and gets the anchor
    name appended still shows it on the command line (`argv`, default `sys.argv`): that one is the
    base. Then verl's own critic switch: `critic.enable=true` means gae. Else grpo, refused with
    rollout.n=1 (a group of one response: its advantage would be the raw reward). A critic model path
    alone is no switch: verl builds no critic from it unless the estimator is gae.
    """
    if explicit is not None:
        return str(explicit), "algorithm.anchor.base_estimator"
    replaced = replaced_estimator(sys.argv[1:] if argv is None else argv)
    if replaced is not None:
        return replaced, f"it replaces algorithm.adv_estimator={replaced} on the command line"
    critic = config.get("critic", None) or {}
    if critic.get("enable", None) is True:
        return "gae", "critic.enable=true"
    responses = int(config.actor_rollout_ref.rollout.get("n", 1))
    if responses == 1:
        raise ValueError(
            "algorithm.anchor.base_estimator is unset and actor_rollout_ref.rollout.n=1 without critic.enable=true: "
            f"the default base {DEFAULT_BASE_ESTIMATOR} would compare each response with a group of one (its "
            "advantage would be the raw reward); for PPO with a critic set +algorithm.anchor.base_estimator=gae, "
            "for a group base set actor_rollout_ref.rollout.n>1, or name another base (e.g. reinforce_plus_plus)"
        )
    return DEFAULT_BASE_ESTIMATOR, f"critic.enable is not true, rollout.n={responses}"


def replaced_estimator(overrides: Sequence[str]) -> str | None:
    """The plain estimator an anchor estimator replaced in a hydra command line, if one did.

    `... algorithm.adv_estimator=gae ... algorithm.adv_estimator=anchor_coupled`: hydra keeps the last
    value, so the config never sees `gae`; the command line still does.
    """
    replaced, chosen_anchor = None, False
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key != "algorithm.adv_estimator":
            continue
        value = value.strip("'\"")
        if value in ANCHOR_ESTIMATORS:
            chosen_anchor = True
        elif not chosen_anchor:
            replaced = value
        else:  # a plain estimator after the anchor one wins in hydra: no anchor run, nothing replaced
            replaced, chosen_anchor = None, False
    return replaced if chosen_anchor else None


def suggest_estimator(name: str, choices: Iterable[str]) -> str | None:
    """The estimator a wrong estimator name most likely meant: the anchor estimator of a bare strategy name
    (coupled), else the closest of `choices` (one letter off: anchor_copuled)."""
    by_strategy = {strategy: estimator for estimator, strategy in ANCHOR_ESTIMATORS.items()}
    return by_strategy.get(name) or suggest(name, choices)


def _check_not_a_typo(estimator: str) -> None:
    """An unregistered name one letter off an anchor estimator would fail only at the first advantage step."""
    from verl_anchor.integration.verl_api import ADV_ESTIMATOR_REGISTRY

    if estimator in ADV_ESTIMATOR_REGISTRY or estimator in ("gae", "grpo"):
        return
    close = suggest_estimator(estimator, ANCHOR_ESTIMATORS)
    if close:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} is not a registered estimator; "
            f"did you mean algorithm.adv_estimator={close}?"
        )
    if estimator.startswith("anchor"):
        raise ValueError(
            f"algorithm.adv_estimator={estimator} is not a registered estimator; "
            f"the anchor estimators are {', '.join(ANCHOR_ESTIMATORS)}"
        )


def _check_base_estimator(config: DictConfig, base: str) -> None:
    from verl_anchor.integration.verl_api import ADV_ESTIMATOR_REGISTRY

    if base in ANCHOR_ESTIMATORS:
        raise ValueError(
            f"algorithm.anchor.base_estimator={base} is invalid: the base must be a plain verl estimator "
            "such as grpo, gae, rloo or reinforce_plus_plus"
        )
    unsupported = UNSUPPORTED_BASES["v1" if config.trainer.get("use_v1", True) else "legacy"]
    if base in unsupported:
        raise ValueError(
            f"algorithm.anchor.base_estimator={base} is not supported: {unsupported[base]}; "
            "use grpo (default), gae, rloo, reinforce_plus_plus, ..."
        )
    known = {"grpo", "gae"} | set(ADV_ESTIMATOR_REGISTRY)
    if base not in known:
        plain = sorted(k for k in known if k not in ANCHOR_ESTIMATORS and k not in unsupported)
        raise ValueError(
            f"algorithm.anchor.base_estimator={base} is not a registered verl estimator; "
            f"choose one of {', '.join(plain)}"
        )
    if base == "gae" and config.critic.get("enable", None) is False:
        raise ValueError(
            "algorithm.anchor.base_estimator=gae needs verl's critic for its values, but "
            "critic.enable=false: set critic.enable=true (or leave it unset)"
        )


def _check_attention_backend(config: DictConfig, estimator: str) -> None:
    actor = config.actor_rollout_ref.actor
    engine = actor_engine(actor)
    if engine is not None:
        raise ValueError(
            f"actor_rollout_ref.actor is verl's {engine} (model_engine={config.get('model_engine', None)}), which "
            f"builds its own engine whatever actor_rollout_ref.actor.strategy says; {estimator} captures its "
            "statistics from Hugging Face attention modules, which only verl's FSDP engines run: set model_engine=dp "
            "(also with --config-name=ppo_megatron_trainer) and drop the actor_rollout_ref.*.megatron.* overrides, "
            "or use anchor_random / anchor_entropy"
        )
    strategy = actor.get("strategy", "fsdp")
    if strategy not in ("fsdp", "fsdp2"):
        raise ValueError(
            f"actor_rollout_ref.actor.strategy={strategy} is not supported by {estimator}: its statistics are captured "
            "from Hugging Face attention modules, which only verl's FSDP engines run; set "
            "actor_rollout_ref.actor.strategy=fsdp (verl's default) or fsdp2, or use anchor_random / anchor_entropy"
        )
    # Ulysses SP: the capture reads verl's flash-attention call after its all-to-all (capture.ulysses). verl's
    # HFModelConfig takes the actor's attention implementation from this option (default flash_attention_2).
    implementation = str(
        (config.actor_rollout_ref.model.get("override_config", None) or {}).get(
            "attn_implementation", "flash_attention_2"
        )
    )
    for key, value in ulysses_sizes(actor):
        if value > 1 and not implementation.startswith("flash_attention"):
            raise ValueError(
                f"{key}={value} with actor_rollout_ref.model.override_config.attn_implementation={implementation} is "
                f"not supported by {estimator}: verl's Ulysses all-to-all runs only inside flash attention, so each "
                f"rank's {implementation} attention sees only its slice of every sequence (docs/usage.md); use "
                f"attn_implementation=flash_attention_2 (verl's default), or set {key}=1"
            )


def ulysses_sizes(actor: DictConfig) -> list[tuple[str, int]]:
    """The actor's Ulysses SP options (verl reads either), with their values (unset: 1)."""
    return [
        (key, int(value if value is not None else 1))
        for key, value in (
            ("actor_rollout_ref.actor.ulysses_sequence_parallel_size", actor.get("ulysses_sequence_parallel_size", 1)),
            (
                "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size",
                (actor.get("fsdp_config", None) or {}).get("ulysses_sequence_parallel_size", 1),
            ),
        )
    ]


def verl_pipelines(config: DictConfig, cfg: AnchorConfig) -> list[str]:
    """The parts of verl this run touches (`verl_api.PIPELINES`), for the start-up check of verl's internals."""
    pipelines = ["v1" if config.trainer.get("use_v1", True) else "legacy"]
    if os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu":
        pipelines.append("cpu")
    if cfg.needs_attention and any(size > 1 for _, size in ulysses_sizes(config.actor_rollout_ref.actor)):
        pipelines.append("ulysses")
    return pipelines


def actor_engine(actor: DictConfig) -> str | None:
    """The actor config class's name when it is not verl's FSDP one, else None.

    verl 0.9.1 builds the actor's engine from the dataclass that the block's `_target_` names
    (`workers/config/actor.py`): FSDPActorConfig hands its `strategy` to the FSDP engine, the other
    classes (McoreActorConfig, ...) build their own engine and ignore `strategy`. The hydra group
    `model_engine` (dp, megatron, ...) chooses that class.
    """
    target = actor.get("_target_", None)
    if target is None:  # a hand-built block: verl's default class
        return None
    from hydra.utils import get_class

    from verl_anchor.integration.verl_api import FSDPActorConfig

    target_cls = get_class(target)
    return None if issubclass(target_cls, FSDPActorConfig) else target_cls.__name__
