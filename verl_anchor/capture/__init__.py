"""Statistics computed inside a Hugging Face decoder's forward pass (`AttentionCapture`), from the q/k its
attention function receives: hooks and the attention-function dispatcher (`hooks`), where the sequences are
(`layout`), what is refused (`checks`), and whole sequences under verl's Ulysses SP (`ulysses`)."""

from verl_anchor.capture.checks import CaptureError
from verl_anchor.capture.hooks import AttentionCapture

__all__ = ["AttentionCapture", "CaptureError"]
