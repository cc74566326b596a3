"""Worker side: compute the anchor statistics inside the old-log-prob forward verl already runs.

`AnchorActorRolloutRefWorker` (sync, colocate_async) and `AnchorDetachActorWorker`
(separate_async) are the worker classes verl's trainer picks, with one change: their actor is
an `AnchorTrainingWorker`. When the trainer puts the anchor options in the batch's
`extra_info`, that worker's `infer_batch` runs with an `AttentionCapture` on the actor's
HF module and a temporary "loss" whose only job is to turn each micro-batch's captured
statistics into per-token outputs. verl's engine calls that function after the forward with
the micro-batch, adds what it writes into `model_output` to the log-probs and entropy,
restores the original row order (dynamic batch sizes) and stores it in TransferQueue:

* `anchor_waad` (nested, one value per response token): WAAD averaged over the local heads;
* `anchor_fai` (nested, per response token, NaN = undefined): FAI over the global heads;
* `anchor_seq` (nested, 3 values per sequence): local-group span, global-group span, and the
  seconds this sequence's statistics took (its micro-batch's time split evenly; under Ulysses
  sequence parallelism, summed over the SP ranks).

Values belong to the token *at* each response position (not shifted like log-probs).
No second forward, no model copy; the capture is inert outside this call.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from tensordict import TensorDict

from verl_anchor.capture.hooks import AttentionCapture
from verl_anchor.capture.ulysses import gather_head_span, sequence_parallel_group, sum_over_ranks
from verl_anchor.core.config import AnchorConfig
from verl_anchor.core.stats_engine import PackedTokenStats, packed_response_signals
from verl_anchor.integration.handoff import ANCHOR_OPTIONS_KEY, SEQUENCE_COLUMNS
from verl_anchor.integration.verl_api import (
    ActorRolloutRefWorker,
    DetachActorWorker,
    Dispatch,
    TrainingWorker,
    register,
)
from verl_anchor.integration.verl_api import tensordict_utils as tu


def anchor_outputs(
    model_output: dict, data: TensorDict, dp_group: Any, capture: AttentionCapture, cfg: AnchorConfig
) -> tuple[torch.Tensor, dict]:
    """The stand-in "loss" of the statistics pass: writes the per-token anchor outputs of a micro-batch.

    All responses at once (`stats_engine.packed_response_signals`) on the statistics' device; one host
    sync per micro-batch, to check that the captured sequences are the micro-batch's. Under Ulysses
    sequence parallelism each rank holds some heads: the ranks combine theirs (`capture.ulysses`; two
    more syncs) and every rank writes the same outputs.
    """
    start = time.perf_counter()
    stats = _micro_batch_stats(capture.pop_packed(), data)
    device = stats.row_span.device
    lengths, num_response_tokens = _response_lengths(data)
    lengths = lengths.to(device)
    group = sequence_parallel_group() if stats.heads_per_layer != stats.num_heads_total else None
    signals = packed_response_signals(
        stats,
        lengths,
        cfg,
        num_response_tokens=num_response_tokens,
        head_span=None if group is None else gather_head_span(stats, lengths, group),
    )
    num_sequences = stats.sequences.num_sequences
    seconds = (capture.seconds + time.perf_counter() - start) / max(1, num_sequences)
    capture.seconds = 0.0
    if group is not None:  # the group's time on this micro-batch
        signals, seconds = sum_over_ranks(signals, seconds, group)
    out = model_output["log_probs"].device if "log_probs" in model_output else torch.device("cpu")
    columns = {
        "span_local": signals.span_loc,
        "span_global": signals.span_glob,
        "seconds": torch.zeros_like(signals.span_loc) + seconds,
    }
    per_sequence = torch.stack([columns[name] for name in SEQUENCE_COLUMNS], 1)
    model_output["anchor_waad"] = _nested(signals.waad, signals.cu_response, out)
    model_output["anchor_fai"] = _nested(signals.fai, signals.cu_response, out)
    model_output["anchor_seq"] = _nested(
        per_sequence.flatten(), torch.arange(num_sequences + 1, device=device) * 3, out
    )
    return torch.zeros((), device=out), {}


def _response_lengths(data: TensorDict) -> tuple[torch.Tensor, int | None]:
    """Tokens of each response in the micro-batch, and their total where it is known without a host sync."""
    responses = data["response_mask"]
    if responses.is_nested:  # v1: one row per response
        return responses.offsets().diff(), responses.values().shape[0]
    # The legacy trainer's old-log-prob call keeps verl's left-right padded masks beside the packed inputs
    # (`left_right_2_no_padding`): responses are right-padded to the response_mask's width.
    return data["attention_mask"][:, -responses.shape[1] :].sum(-1), None


def _micro_batch_stats(forwards: list[PackedTokenStats], data: TensorDict) -> PackedTokenStats:
    """The captured statistics of the micro-batch's sequences, after checking that they are its sequences."""
    lengths = data["input_ids"].offsets().diff()
    captured = [stats.sequences.cu_seqlens.diff() for stats in forwards]
    # Packed inputs may carry padding after the last sequence; it forms extra trailing segments.
    if (
        len(forwards) != 1
        or captured[0].numel() < lengths.numel()
        or not torch.equal(captured[0][: lengths.numel()], lengths.to(captured[0].device))
    ):  # the one host sync
        raise RuntimeError(
            f"captured sequences {[c.tolist() for c in captured]} (per forward) do not match the micro-batch's "
            f"sequence lengths {lengths.tolist()}; the capture cannot tell the sequences of this input layout apart"
        )
    return forwards[0].first_sequences(lengths.numel(), data["input_ids"].values().shape[0])


def _nested(values: torch.Tensor, offsets: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.nested.nested_tensor_from_jagged(values.float().to(device), offsets=offsets.to(device))


class AnchorTrainingWorker(TrainingWorker):
    """verl's TrainingWorker whose `infer_batch` also computes anchor statistics when asked to."""

    _captures: dict[AnchorConfig, AttentionCapture]
    # Longest sequence the rollout can produce (prompt + response), set at start-up by `anchor_prepare`:
    # the capture refuses sliding windows or attention chunks shorter than it before any rollout.
    max_length: int | None = None

    def capture_for(self, cfg: AnchorConfig) -> AttentionCapture:
        captures = self.__dict__.setdefault("_captures", {})
        if cfg not in captures:
            captures[cfg] = AttentionCapture(self.engine.module, cfg, max_length=self.max_length)
        return captures[cfg]

    def infer_batch(self, data: TensorDict) -> TensorDict:  # called directly by compute_log_prob, not over RPC
        options = tu.get_non_tensor_data(data, ANCHOR_OPTIONS_KEY, default=None)
        if options is None:
            return super().infer_batch(data)
        cfg = AnchorConfig.from_mapping(options)
        capture = self.capture_for(cfg)
        saved_loss, saved_flag = self.loss_fn, tu.get_non_tensor_data(data, "compute_loss", default=True)
        # infer_batch runs the loss function only with compute_loss=True (engine_workers.py, infer_batch).
        self.loss_fn = partial(anchor_outputs, capture=capture, cfg=cfg)
        tu.assign_non_tensor(data, compute_loss=True)
        try:
            with capture:
                return super().infer_batch(data)
        finally:
            self.loss_fn = saved_loss
            tu.assign_non_tensor(data, compute_loss=saved_flag)


class AnchorWorkerMixin:
    """Mixed in front of a verl actor worker class: an anchor-aware actor and the start-up check."""

    actor_worker_cls = AnchorTrainingWorker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def anchor_prepare(self, options: dict) -> list[int]:
        """Build the capture on the real actor module once, at start-up: a model the capture cannot
        handle or layers it does not have fail here, before any rollout. Returns the captured layers."""
        rollout = self.config.rollout
        self.actor.max_length = int(rollout.prompt_length) + int(rollout.response_length)
        return self.actor.capture_for(AnchorConfig.from_mapping(options)).layers


# Module-level classes, so Ray pickles them by reference in every worker process.
class AnchorActorRolloutRefWorker(AnchorWorkerMixin, ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker (sync and colocate_async) with an anchor-aware actor."""


class AnchorDetachActorWorker(AnchorWorkerMixin, DetachActorWorker):
    """verl's separate_async actor worker (pi_old save/restore) with an anchor-aware actor."""


_WORKER_VARIANTS: dict[type, type] = {
    ActorRolloutRefWorker: AnchorActorRolloutRefWorker,
    DetachActorWorker: AnchorDetachActorWorker,
}


def use_anchor_workers(role_worker_mapping: dict) -> None:
    """Give a trainer's actor role (whichever of verl's roles it uses) the anchor variant of its worker, in place."""
    import ray

    from verl_anchor.integration import verl_api

    for role in (verl_api.resolve(f"Role.{name}") for name in ("ActorRollout", "ActorRolloutRef", "Actor")):
        if role in role_worker_mapping:
            role_worker_mapping[role] = ray.remote(anchor_worker_cls(role_worker_mapping[role]))


def anchor_worker_cls(worker: Any) -> type:
    """The anchor variant of the actor worker a verl trainer chose (a class, or `ray.remote(class)`).

    verl's own classes get the module-level variants above; any other class (a recipe's worker)
    gets its own subclass with the mixin in front, so its overrides and RPCs stay.
    """
    worker_cls = worker if isinstance(worker, type) else worker.__ray_metadata__.modified_class.__bases__[0]
    if issubclass(worker_cls, AnchorWorkerMixin):  # already swapped (init_workers run twice)
        return worker_cls
    if worker_cls not in _WORKER_VARIANTS:
        # Not a module attribute on purpose: Ray then pickles it by value for the worker processes.
        _WORKER_VARIANTS[worker_cls] = type(
            f"Anchor{worker_cls.__name__}", (AnchorWorkerMixin, worker_cls), {"__module__": __name__}
        )
    return _WORKER_VARIANTS[worker_cls]
