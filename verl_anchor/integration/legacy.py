"""The anchor step in verl's legacy trainer (`trainer.use_v1=false`: `RayPPOTrainer` and its subclasses).

verl's `main_ppo_v0` builds `RayPPOTrainer` by name, and verl-recipe's recipes (DAPO and others)
subclass it and override `fit()`, so there is no lookup to wrap. The plugin patches the class and
its module in place when verl imports them, and every subclass inherits the anchor step:

1. `RayPPOTrainer.init_workers`: with an anchor estimator, the actor role gets the anchor variant of
   its worker (as in v1), and the capture is built on the real actor module before any rollout;
2. `RayPPOTrainer._compute_old_log_prob`: the anchor options ride to the worker in the old-log-prob
   TensorDict; the worker's `anchor_*` outputs, which verl's method drops, are added (padded) to the
   `DataProto` it returns, so `fit`'s union brings them into the batch;
3. the module-level `compute_advantage` (`fit` and DAPO call it by name): for an anchor estimator,
   verl's own code for the base estimator, then gamma (`core.credit.scale_advantages`, shared with v1);
   the `anchor_*` columns leave the batch there, and the metrics ride in its `meta_info`;
4. `metric_utils.compute_data_metrics` (every trainer's metrics call) adds those `anchor/*` metrics.

A plain estimator passes through all four untouched. v1 imports this `compute_advantage` too,
always with the base estimator's name, so nothing is scaled twice.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tensordict import TensorDict

from verl_anchor.core.credit import ResponseBatch, response_seed, scale_advantages
from verl_anchor.integration import verl_api
from verl_anchor.integration.estimator import refuse_outside_anchor_trainer
from verl_anchor.integration.handoff import (
    ANCHOR_OPTIONS_KEY,
    OUTPUT_KEYS,
    padded,
    sequence_columns,
    token_digest,
    write_dump,
)
from verl_anchor.integration.settings import ANCHOR_ESTIMATORS, prepare_config
from verl_anchor.integration.verl_api import tensordict_utils as tu

# `integration.worker` (verl's engine workers) is imported on first use: this module is imported
# right after verl's ray_trainer, which may itself be mid-way through importing them.

logger = logging.getLogger(__name__)

METRICS_KEY = "verl_anchor_metrics"  # meta_info key: the advantage step's metrics, until the metrics call
ENTROPY_KEY = "anchor_entropy"  # verl drops the old-log-prob entropy before the advantage step; entropy reads it
# Trainers with an anchor estimator, by their `config.algorithm` (what `compute_advantage` receives).
_TRAINERS: dict[int, weakref.ref] = {}


def patch_ray_trainer() -> None:
    """Patch `verl.trainer.ppo.ray_trainer` in place (idempotent)."""
    verl_api.patch("RayPPOTrainer.init_workers", _with_anchor_workers)
    verl_api.patch("RayPPOTrainer._compute_old_log_prob", _with_anchor_statistics)
    verl_api.patch("ray_trainer.compute_advantage", _with_anchor_credit)
    verl_api.patch("ray_trainer.compute_data_metrics", _with_anchor_metrics)


def patch_metric_utils() -> None:
    """Patch `verl.trainer.ppo.metric_utils.compute_data_metrics`, which recipes import from there (idempotent)."""
    verl_api.patch("metric_utils.compute_data_metrics", _with_anchor_metrics)


def _with_anchor_workers(init_workers: Callable) -> Callable:
    def init(self, *args, **kwargs):
        from verl_anchor.integration.worker import use_anchor_workers

        self.anchor = prepare_config(self.config)
        if self.anchor is None:
            return init_workers(self, *args, **kwargs)
        if self.anchor.base_estimator == "gae" and not getattr(self, "use_critic", True):
            # RayPPOTrainer.__init__ decided before this ran; verl's validate_config (main_ppo's driver) turns it on.
            raise ValueError(
                "algorithm.anchor.base_estimator=gae needs verl's critic, but this trainer was built "
                "without one (critic.enable was unset when it was constructed): set critic.enable=true"
            )
        use_anchor_workers(self.role_worker_mapping)
        _TRAINERS[id(self.config.algorithm)] = weakref.ref(self)
        result = init_workers(self, *args, **kwargs)
        if self.anchor.cfg.needs_attention:
            layers = self.actor_rollout_wg.anchor_prepare(self.anchor.cfg.to_dict())
            logger.warning("verl_anchor: %s captures attention of layers %s", self.anchor.estimator, layers[0])
        return result

    return init


def _with_anchor_statistics(compute_old_log_prob: Callable) -> Callable:
    def compute(self, batch, *args, **kwargs):
        settings = getattr(self, "anchor", None)
        if settings is None or not settings.cfg.needs_forward:
            return compute_old_log_prob(self, batch, *args, **kwargs)
        group, outputs = self.actor_rollout_wg, {}
        own = "compute_log_prob" in vars(group)  # verl binds worker methods on the instance
        rpc = group.compute_log_prob

        def compute_log_prob(data, *rpc_args, **rpc_kwargs):
            if not isinstance(data, TensorDict):  # a data plane that moves references (verl's neo NeoProto)
                raise RuntimeError(
                    f"{settings.estimator}: the old-log-prob call sends a {type(data).__name__}, not a "
                    "TensorDict; the anchor options cannot ride with it (trainer.data_plane=classic)"
                )
            if settings.cfg.needs_attention:
                tu.assign_non_tensor(data, **{ANCHOR_OPTIONS_KEY: settings.cfg.to_dict()})
            output = rpc(data, *rpc_args, **rpc_kwargs)
            outputs.update({name: tu.get(output, name) for name in OUTPUT_KEYS if name in output.keys()})
            return output

        group.compute_log_prob = compute_log_prob
        try:
            result = compute_old_log_prob(self, batch, *args, **kwargs)
        finally:
            if own:
                group.compute_log_prob = rpc
            else:
                del group.compute_log_prob
        old_log_prob = result[0] if isinstance(result, tuple) else result
        width = batch.batch["responses"].shape[1]
        for name, values in outputs.items():
            old_log_prob.batch[name] = padded(values, math.nan, None if name == "anchor_seq" else width)
        if settings.cfg.needs_entropy:
            old_log_prob.batch[ENTROPY_KEY] = old_log_prob.batch["entropys"].clone()
        return result

    return compute


def _with_anchor_credit(compute_advantage: Callable) -> Callable:
    signature = inspect.signature(compute_advantage)

    def compute(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        estimator = str(getattr(call.arguments["adv_estimator"], "value", call.arguments["adv_estimator"]))
        if estimator not in ANCHOR_ESTIMATORS:
            return compute_advantage(*args, **kwargs)
        trainer = _trainer_for(call.arguments.get("config", None))
        call.arguments["adv_estimator"] = trainer.anchor.base_estimator
        data = compute_advantage(*call.args, **call.kwargs)
        start = time.perf_counter()
        metrics = anchor_credit(trainer, data)
        metrics["timing_s/anchor_weights"] = time.perf_counter() - start
        data.meta_info[METRICS_KEY] = metrics
        return data

    return compute


def _trainer_for(algorithm: Any) -> Any:
    """The anchor trainer whose `config.algorithm` a compute_advantage call passed; without one (recipes that
    leave `config=` out: PRIME, SPPO, ...), the process's one anchor trainer."""
    if algorithm is None:
        live = [trainer for trainer in (ref() for ref in _TRAINERS.values()) if trainer is not None]
        if len(live) == 1:
            return live[0]
        raise RuntimeError(
            f"compute_advantage was called with an anchor estimator and no config, and this process "
            f"holds {len(live)} anchor trainers: pass config=self.config.algorithm to tell them apart"
        )
    trainer = _TRAINERS.get(id(algorithm), lambda: None)()
    if trainer is None or trainer.config.algorithm is not algorithm:
        refuse_outside_anchor_trainer()
    return trainer


def anchor_credit(trainer: Any, data: Any) -> dict[str, float]:
    """Scale a padded `DataProto`'s base advantages by gamma in place; returns the `anchor/*` metrics."""
    settings, batch = trainer.anchor, data.batch
    width = batch["responses"].shape[1]
    attention = batch["attention_mask"].bool()
    lengths = tuple(attention[:, -width:].sum(-1).tolist())  # responses are right-padded
    anchor_columns = [name for name in (*OUTPUT_KEYS, ENTROPY_KEY) if name in batch.keys()]
    columns = {name: batch[name].float() for name in anchor_columns}
    needed = "anchor_waad" if settings.cfg.needs_attention else ENTROPY_KEY if settings.cfg.needs_entropy else None
    if needed is not None and needed not in columns:
        raise RuntimeError(
            f"{settings.estimator}: the batch has no {needed}; the old-log-prob forward did not run "
            "through verl_anchor (a trainer that bypasses RayPPOTrainer._compute_old_log_prob)"
        )
    responses = ResponseBatch(
        advantages=batch["advantages"].float(),
        trainable=batch["response_mask"].bool(),
        lengths=lengths,
        real=torch.ones(len(lengths), dtype=torch.bool),
        waad=columns.get("anchor_waad"),
        fai=columns.get("anchor_fai"),
        **sequence_columns(columns.get("anchor_seq")),
        entropy=columns.get(ENTROPY_KEY),
    )
    seeds = _response_seeds(trainer, batch["input_ids"], attention) if settings.cfg.needs_seeds else None
    world = trainer.config.trainer.n_gpus_per_node * trainer.config.trainer.nnodes
    shaped, gamma, metrics = scale_advantages(responses, settings.cfg, seeds, world_size=world)
    batch["advantages"] = shaped.to(batch["advantages"].dtype)
    if settings.dump_dir:
        keys = [f"{uid}_{i}" for i, uid in enumerate(data.non_tensor_batch["uid"])]
        tokens = [ids[keep] for ids, keep in zip(batch["input_ids"], attention)]
        write_dump(Path(settings.dump_dir) / f"step{trainer.global_steps:06d}_000.pt", keys, tokens, responses, gamma)
    data.pop(batch_keys=anchor_columns)  # the actor update needs none of them
    return metrics


def _response_seeds(trainer: Any, input_ids: torch.Tensor, attention: torch.Tensor) -> list[int]:
    """One seed per response for the random baseline, from its own tokens (prompt and response; verl's uids
    are random), so a response draws the same tokens whatever its row; copies of one response are told apart
    by their count, which no row order changes."""
    seen: defaultdict[str, int] = defaultdict(int)
    seeds = []
    for ids, keep in zip(input_ids, attention):
        digest = token_digest(ids[keep])
        seeds.append(response_seed(trainer.anchor.cfg.seed, trainer.global_steps, 0, digest, seen[digest]))
        seen[digest] += 1
    return seeds


def _with_anchor_metrics(compute_data_metrics: Callable) -> Callable:
    def compute(*args, **kwargs):
        metrics = compute_data_metrics(*args, **kwargs)
        batch = kwargs.get("batch", args[0] if args else None)
        anchor_metrics = getattr(batch, "meta_info", {}).pop(METRICS_KEY, None)
        return metrics if anchor_metrics is None else {**metrics, **anchor_metrics}

    return compute
