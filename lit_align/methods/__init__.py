"""One LightningModule per method; the only place a ``training_step`` lives."""

from lit_align.methods.base import PolicyModule
from lit_align.methods.dpo import DPOModule
from lit_align.methods.sft import SFTModule

__all__ = ["DPOModule", "PolicyModule", "SFTModule"]
