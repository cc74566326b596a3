"""Trainer side: attention-guided credit in whichever verl v1 trainer mode the user runs.

The plugin wraps verl's `get_trainer_cls` (`anchor_trainer_cls`), so `sync`, `colocate_async`
and `separate_async` each come back as a subclass of verl's own class with `AnchorTrainerMixin`
in front. Built with a non-anchor estimator, that subclass hands back an instance of verl's
class itself, untouched; with an anchor estimator the mixin adds:

1. the anchor variant of the actor worker verl chose (statistics inside the old-log-prob forward);
2. at start-up: the options checked, the capture built on the real actor module;
3. the statistics requested from the old-log-prob pass (attention strategies only);
4. the advantage step run by verl's own code for the base estimator (`algorithm.anchor.base_estimator`,
   exactly as if the user had selected it, critic values and whitening included), then each real
   response's advantages scaled by gamma (`credit.batch_gamma` + the sign rule; the critic's
   `returns` stay unscaled) and `anchor/*` metrics logged.

Mode strings stay verl's own, so every place verl compares `trainer_mode` behaves as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from tensordict import TensorDict

from verl_anchor.core.credit import response_seed, scale_advantages
from verl_anchor.integration.handoff import (
    ANCHOR_OPTIONS_KEY,
    OUTPUT_KEYS,
    response_batch,
    token_digest,
    write_dump,
)
from verl_anchor.integration.settings import AnchorSettings, prepare_config
from verl_anchor.integration.verl_api import response_to_nested
from verl_anchor.integration.verl_api import transfer_queue as tq
from verl_anchor.integration.worker import use_anchor_workers

logger = logging.getLogger(__name__)

_VARIANTS: dict[type, type] = {}


def anchor_trainer_cls(trainer_cls: type) -> type:
    """The anchor variant of a verl v1 trainer class (cached, so each base gets one subclass).

    Each variant is also reachable as a module attribute (`__getattr__`), so pickle finds it by reference.
    """
    if issubclass(trainer_cls, AnchorTrainerMixin):
        return trainer_cls
    if trainer_cls not in _VARIANTS:
        _VARIANTS[trainer_cls] = type(
            f"Anchor{trainer_cls.__name__}",
            (AnchorTrainerMixin, trainer_cls),
            {"__module__": __name__, "_anchor_base": trainer_cls},
        )
    return _VARIANTS[trainer_cls]


def __getattr__(name: str) -> type:
    """`AnchorPPOTrainerSync` and friends by name, built on first use: pickle finds variants by reference."""
    from verl_anchor.integration.verl_api import TRAINER_REGISTRY

    for trainer_cls in TRAINER_REGISTRY.values():
        if name == f"Anchor{trainer_cls.__name__}":
            return anchor_trainer_cls(trainer_cls)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class AnchorTrainerMixin:
    """Attention-guided credit on top of a verl v1 trainer (see the module docstring)."""

    _anchor_base: type
    anchor: AnchorSettings | None = None

    def __new__(cls, config: DictConfig | None = None, *args, **kwargs):
        settings = prepare_config(config) if config is not None else None  # None: copy/pickle rebuilding
        if settings is None and config is not None and _VARIANTS.get(cls._anchor_base) is cls:
            # Not an anchor run, and nobody subclassed the variant: verl's own class, step for step.
            return cls._anchor_base(config, *args, **kwargs)
        instance = super().__new__(cls)
        instance.anchor = settings  # None in a user's subclass on a plain run: every hook below passes through
        return instance

    # -- start-up ---------------------------------------------------------------------------
    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        if self.anchor is None:
            return
        use_anchor_workers(self.role_worker_mapping)

    def _setup(self) -> None:
        super()._setup()
        if self.anchor is not None and self.anchor.cfg.needs_attention:
            layers = self.actor_rollout_wg.anchor_prepare(self.anchor.cfg.to_dict())
            logger.warning("verl_anchor: %s captures attention of layers %s", self.anchor.estimator, layers[0])

    # -- step -------------------------------------------------------------------------------
    def _compute_old_log_prob(self, batch, metrics: dict):
        if self.anchor is not None and self.anchor.cfg.needs_attention:
            batch.extra_info[ANCHOR_OPTIONS_KEY] = self.anchor.cfg.to_dict()
        try:
            return super()._compute_old_log_prob(batch, metrics)
        finally:
            batch.extra_info.pop(ANCHOR_OPTIONS_KEY, None)  # keep it out of later RPCs

    def _compute_advantage(self, batch, metrics: dict):
        if self.anchor is None:
            return super()._compute_advantage(batch, metrics)
        real = [not tag.get("is_padding", False) for tag in batch.tags]  # verl's _balance_batch padding
        algorithm = self.config.algorithm
        estimator = algorithm.adv_estimator
        # verl picks GAE and GRPO by name inside its advantage code, with inputs (values, multi-turn
        # broadcast) a registered estimator never receives: run the base under its own name.
        algorithm.adv_estimator = self.anchor.base_estimator
        try:
            batch = super()._compute_advantage(batch, metrics)
        finally:
            algorithm.adv_estimator = estimator
        start = time.perf_counter()
        fields = ["advantages", "response_mask"]
        if self.anchor.cfg.needs_entropy:  # (bypass mode writes no entropy; random needs none)
            fields.append("entropy")
        if self.anchor.cfg.needs_attention:
            fields += list(OUTPUT_KEYS)
        if self.anchor.cfg.needs_seeds:
            fields.append("prompts")  # the random draw's seed (see `_response_seeds`)
        if self.anchor.dump_dir:
            fields.append("input_ids")
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        local_step = getattr(self, "local_trigger_step", 0)
        seeds = self._response_seeds(batch.keys, data, local_step) if self.anchor.cfg.needs_seeds else None
        world = self.config.trainer.n_gpus_per_node * self.config.trainer.nnodes
        responses = response_batch(data, real)
        shaped, gamma, anchor_metrics = scale_advantages(responses, self.anchor.cfg, seeds, world_size=world)
        out = TensorDict({"advantages": response_to_nested(shaped, data["response_mask"])}, batch_size=len(batch))
        batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=out)
        if self.anchor.dump_dir:
            path = Path(self.anchor.dump_dir) / f"step{self.global_steps:06d}_{local_step:03d}.pt"
            write_dump(path, batch.keys, data["input_ids"].unbind(), responses, gamma)
        anchor_metrics["timing_s/anchor_weights"] = time.perf_counter() - start
        metrics.update(anchor_metrics)
        return batch

    def _response_seeds(self, keys: Sequence[str], data: TensorDict, local_step: int) -> list[int]:
        """One seed per response for the random baseline, from what identifies it across runs and ranks.

        Seeded per response, not per batch, so a response draws the same tokens on any rank and in any
        order; async modes run the advantage step several times per global step, hence the local step.
        verl's keys are `{uuid4}_{session}_{output}`: the random uid is replaced by the prompt's tokens,
        so two runs with the same seed draw the same tokens for the same prompt.
        """
        seeds = []
        for key, prompt in zip(keys, data["prompts"].unbind()):
            session_and_output = key.rsplit("_", 2)[1:]
            seeds.append(
                response_seed(
                    self.anchor.cfg.seed, self.global_steps, local_step, token_digest(prompt), *session_and_output
                )
            )
        return seeds
