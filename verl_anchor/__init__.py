"""verl_anchor: attention-guided (preplan-and-anchor) credit assignment for verl.

Layers (`docs/architecture.md`): `core` (options, the formulas, the packed statistics engine and its
kernels, gamma; pure tensors), `capture` (the statistics inside a Hugging Face model's forward),
`integration` (the verl plugin, its trainers and workers, the CPU mode) and `commands` (the
`verl-anchor` sub-commands), with `analysis`, `data`, `rewards` and `models` beside them.

The library API is importable from here; each name is loaded on first use, so `import verl_anchor`
(which every verl process does through the plugin) imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "AnchorConfig": "verl_anchor.core.config",
    "reference_stats": "verl_anchor.core.metrics",
    "token_stats": "verl_anchor.core.metrics",
    "response_signals": "verl_anchor.core.metrics",
    "packed_token_stats": "verl_anchor.core.stats_engine",
    "packed_response_signals": "verl_anchor.core.stats_engine",
    "token_weights": "verl_anchor.core.credit",
    "batch_gamma": "verl_anchor.core.credit",
    "shape_advantages": "verl_anchor.core.credit",
    "AttentionCapture": "verl_anchor.capture.hooks",
    "CaptureError": "verl_anchor.capture.checks",
    "capturable_layers": "verl_anchor.capture.checks",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
