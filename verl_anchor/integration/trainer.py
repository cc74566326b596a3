"""Trainer side: the `anchor_sync` v1 trainer mode.

verl's synchronous PPO trainer with four additions:

1. its hybrid worker is `AnchorActorRolloutRefWorker` (statistics inside the old-log-prob forward);
2. at start-up it validates `algorithm.anchor.*` and builds the capture on the real actor module;
3. it asks the old-log-prob pass for the anchor statistics (attention strategies only);
4. right after verl's advantage step it scales each response's advantages by gamma
   (`credit.token_weights` + the sign rule) and logs `anchor/*` metrics.

With a non-anchor estimator (e.g. `grpo`) the trainer is verl's own, step for step, so the
plain baseline runs through the same code.
"""

from __future__ import annotations

import logging
import math
import time

import ray
import torch
import transfer_queue as tq
from omegaconf import DictConfig, open_dict
from tensordict import TensorDict
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.utils.padding import response_to_nested

from verl_anchor.credit import effective_gamma, is_degenerate, token_weights
from verl_anchor.integration.estimator import anchor_trainer_active
from verl_anchor.integration.settings import TRAINER_MODE, AnchorSettings, read_settings
from verl_anchor.integration.worker import ANCHOR_OPTIONS_KEY, OUTPUT_KEYS, AnchorActorRolloutRefWorker

logger = logging.getLogger(__name__)


@register_trainer(TRAINER_MODE)
class AnchorPPOTrainer(PPOTrainerSync):
    """`trainer.v1.trainer_mode=anchor_sync`: verl's sync trainer + attention-guided credit."""

    def __init__(self, config: DictConfig) -> None:
        self.anchor: AnchorSettings | None = read_settings(config)
        # verl compares trainer_mode with "sync" throughout; it was only needed to pick this class.
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    # -- start-up ---------------------------------------------------------------------------
    def _init_resource_pool_mgr(self) -> None:
        super()._init_resource_pool_mgr()
        for role in (Role.ActorRollout, Role.ActorRolloutRef, Role.Actor):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(AnchorActorRolloutRefWorker)

    def _setup(self) -> None:
        super()._setup()
        if self.anchor is not None and self.anchor.cfg.needs_attention:
            layers = self.actor_rollout_wg.anchor_prepare(self.anchor.cfg.to_dict())
            logger.warning("verl_anchor: %s captures attention of layers %s", self.anchor.estimator, layers[0])

    # -- step -------------------------------------------------------------------------------
    def _compute_old_log_prob(self, batch, metrics: dict):
        wants_stats = self.anchor is not None and self.anchor.cfg.needs_attention
        if wants_stats:
            batch.extra_info[ANCHOR_OPTIONS_KEY] = self.anchor.cfg.to_dict()
        try:
            return super()._compute_old_log_prob(batch, metrics)
        finally:
            batch.extra_info.pop(ANCHOR_OPTIONS_KEY, None)  # keep it out of later RPCs

    def _compute_advantage(self, batch, metrics: dict):
        if self.anchor is None:
            return super()._compute_advantage(batch, metrics)
        with anchor_trainer_active():
            batch = super()._compute_advantage(batch, metrics)
        start = time.perf_counter()
        fields = ["advantages", "response_mask", "entropy"]
        if self.anchor.cfg.needs_attention:
            fields += list(OUTPUT_KEYS)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        world = self.config.trainer.n_gpus_per_node * self.config.trainer.nnodes
        shaped, anchor_metrics = scale_advantages(data, self.anchor, step=self.global_steps, world_size=world)
        out = TensorDict({"advantages": response_to_nested(shaped, data["response_mask"])}, batch_size=len(batch))
        batch = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=out)
        anchor_metrics["timing_s/anchor_weights"] = time.perf_counter() - start
        metrics.update(anchor_metrics)
        return batch


def _padded(nested: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    return torch.nested.to_padded_tensor(nested, fill) if nested.is_nested else nested


def scale_advantages(
    data: TensorDict, settings: AnchorSettings, step: int, world_size: int = 1
) -> tuple[torch.Tensor, dict]:
    """gamma-scaled advantages `(batch, response_length)` and the `anchor/*` metrics of one batch.

    `data` holds nested per-response `advantages`, `response_mask`, `entropy` and, for attention
    strategies, the worker's `anchor_*` outputs (see `integration.worker`).
    """
    cfg = settings.cfg
    advantages = _padded(data["advantages"]).float()
    mask = _padded(data["response_mask"]).bool()
    lengths = data["response_mask"].offsets().diff().tolist()
    entropy = _padded(data["entropy"]).float()
    waad = _padded(data["anchor_waad"], math.nan).float() if cfg.needs_attention else None
    fai = _padded(data["anchor_fai"], math.nan).float() if cfg.needs_attention else None
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(step))  # reproducible per step
    gamma = torch.ones_like(advantages)
    degenerate = 0
    for i, n in enumerate(lengths):
        row_waad = waad[i, :n] if waad is not None else torch.zeros(n)
        row_fai = fai[i, :n] if fai is not None else torch.zeros(n)
        if cfg.needs_attention and is_degenerate(row_waad, row_fai):
            degenerate += 1  # token_weights returns gamma = 1 for it
        gamma[i, :n] = token_weights(row_waad, row_fai, cfg, entropy=entropy[i, :n], generator=generator)
    effective = effective_gamma(advantages, gamma, cfg.sign)
    tokens = max(1, int(mask.sum()))
    metrics = {
        "anchor/selected_frac": float(((gamma != 1.0) & mask).sum()) / tokens,  # chosen by the strategy
        "anchor/amplified_frac": float(((effective != 1.0) & mask).sum()) / tokens,  # after the sign rule
        "anchor/gamma_mean": float(effective[mask].sum()) / tokens,
        "anchor/degenerate_frac": degenerate / max(1, len(lengths)),
    }
    if cfg.needs_attention:
        per_seq = _padded(data["anchor_seq"], math.nan).float()
        defined_fai = fai[mask & ~torch.isnan(fai)]
        metrics.update({
            "anchor/waad_mean": float(waad[mask & torch.isfinite(waad)].mean()) if mask.any() else math.nan,
            "anchor/fai_mean": float(defined_fai.mean()) if defined_fai.numel() else math.nan,
            "anchor/span_local": float(per_seq[:, 0].nanmean()),
            "anchor/span_global": float(per_seq[:, 1].nanmean()),
            # Each sequence carries its share of its rank's time: the sum over ranks, averaged per rank.
            "timing_s/anchor_stats": float(per_seq[:, 2].nansum()) / max(1, world_size),
        })
    return advantages * effective, metrics
