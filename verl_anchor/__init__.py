"""verl_anchor: attention-guided (preplan-and-anchor) credit assignment for verl.

The pure-tensor core is `verl_anchor.metrics` (head span, WAAD, FAI, head groups) and
`verl_anchor.credit` (token selection, credit weights); `verl_anchor.capture` computes the
statistics inside a Hugging Face model's forward pass; `verl_anchor.verl_plugin` wires it
all into verl's GRPO/PPO trainer.
"""

from verl_anchor.config import AnchorConfig

__all__ = ["AnchorConfig"]
__version__ = "0.1.0"
