"""Pure objective functions: tensors in, ``(loss, metrics)`` out; no forward passes.

Functions:
    dpo_loss     sigmoid / conservative DPO on summed sequence log-probs (Rafailov et al. 2023)
    ipo_loss     IPO on length-averaged sequence log-probs (Azar et al. 2023)
    nll_loss     negative log-likelihood of masked tokens, token- or sequence-averaged

Config objects (selected from YAML by ``class_path``):
    PreferenceLoss   base: ``loss(pc, pr, rc, rr) -> (loss, metrics)`` and the ``reduction``
                     its inputs need
    DPOLoss          ``dpo_loss`` with ``beta`` and ``label_smoothing``
    IPOLoss          ``ipo_loss`` with ``beta``
"""

from lit_align.losses.preference import DPOLoss, IPOLoss, PreferenceLoss, dpo_loss, ipo_loss
from lit_align.losses.sft import nll_loss

__all__ = ["DPOLoss", "IPOLoss", "PreferenceLoss", "dpo_loss", "ipo_loss", "nll_loss"]
