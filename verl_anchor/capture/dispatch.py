"""The attention-function dispatcher that active captures share.

The attention function: transformers looks it up by name in `ALL_ATTENTION_FUNCTIONS` on every
call. While at least one capture is active, one dispatcher sits under each implementation name in
use (`eager`, `sdpa`, `flash_attention_2`, ...) in that mapping's local layer; it shows every call
to each active capture (each records only its own model's selected layers) and then calls the
function that was there before (under Ulysses SP it then checks that the call reached verl's inner
flash call). The first capture to enter installs it and the last to exit puts the entry back
exactly as it found it, so captures may nest, exit in any order, and run at the same time on
different models in different threads; the registry holds no capture once all have exited. Entering
a capture that is already active is refused, and so is entering a capture of a model that a capture
entered in another thread is still capturing: the state of the forward in progress is per capture,
not per thread, and each capture's hooks see every forward of its model, so two threads capturing
one model would mix their forwards. Using the model's existing name matters: a new name would need
its own mask function, and without one transformers silently drops the padding mask.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from verl_anchor.capture import ulysses as capture_ulysses
from verl_anchor.capture.checks import CaptureError, eager_default
from verl_anchor.integration import verl_api
from verl_anchor.integration.verl_api import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from verl_anchor.capture.hooks import AttentionCapture

_MISSING = object()


class Registry:
    """The dispatchers that active captures share in `ALL_ATTENTION_FUNCTIONS` (module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active: tuple[AttentionCapture, ...] = ()  # replaced, never mutated: dispatchers read it unlocked
        self._installed: dict[str, tuple[Callable, Any]] = {}  # name -> (dispatcher, the entry it replaced)

    def enter(self, capture: AttentionCapture) -> None:
        with self._lock:
            if any(active is capture for active in self.active):
                raise CaptureError(
                    "this AttentionCapture is already active: enter it once at a time "
                    "(build a second capture to capture the same model twice)"
                )
            thread = threading.get_ident()
            if any(active.decoder is capture.decoder and active._thread != thread for active in self.active):
                raise CaptureError(
                    f"this {type(capture.decoder).__name__} is already being captured by an AttentionCapture "
                    "entered in another thread; the captures of one model share its forward hooks and the state "
                    "of the forward in progress, so they cannot run in two threads at once: capture that model in "
                    "one thread at a time, or give each thread its own copy of the model"
                )
            capture._thread = thread
            name = capture.implementation
            if name not in self._installed:
                previous = _local_mapping().get(name, _MISSING)
                original = ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else None
                dispatcher = _dispatcher(original)
                ALL_ATTENTION_FUNCTIONS[name] = dispatcher
                self._installed[name] = (dispatcher, previous)
            self.active = (*self.active, capture)

    def exit(self, capture: AttentionCapture) -> None:
        with self._lock:
            if not any(active is capture for active in self.active):
                return
            self.active = tuple(active for active in self.active if active is not capture)
            if not self.active:
                capture_ulysses.remove_hook()
            name = capture.implementation
            if any(active.implementation == name for active in self.active):
                return
            dispatcher, previous = self._installed.pop(name)
            # Put back what was there, unless someone replaced the dispatcher since (theirs stays).
            if _local_mapping().get(name) is dispatcher:
                if previous is _MISSING:
                    del _local_mapping()[name]
                else:
                    _local_mapping()[name] = previous


REGISTRY = Registry()


def _local_mapping() -> dict:
    """The layer of `ALL_ATTENTION_FUNCTIONS` that registrations write to (a transformers internal)."""
    return verl_api.resolve("ALL_ATTENTION_FUNCTIONS._local_mapping")


def _dispatcher(original: Callable | None) -> Callable:
    """The attention function installed while captures are active: show the call to each, then run `original`
    (None: the eager function of the module's own modeling file, as transformers falls back to)."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any):
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")  # args: (value, attention_mask, ...)
        active = REGISTRY.active
        for capture in active:
            capture._observe(module, query, key, mask, kwargs)
        function = original or eager_default(type(module))
        output = function(module, query, key, *args, **kwargs)
        for capture in active:
            capture._observed(module)
        return output

    return attention


def observe_gathered(query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None) -> None:
    """Shows verl's inner flash call under Ulysses SP to each active capture (`capture.ulysses`)."""
    for capture in REGISTRY.active:
        capture._observe_gathered(query, key, position_ids)
