"""The detector's objective over the rows a co-training step keeps, with the same backward on every rank."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lit_align.losses.watermark import DetectorPair, detector_objective

__all__ = ["kept_objective"]


def kept_objective(watermarked: Tensor, human: Tensor, extra: Sequence[DetectorPair], keep: Tensor, share: Tensor,
                   *, reg: float, reg_extra: bool) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`~lit_align.losses.watermark.detector_objective` over the rows ``keep`` (B,) selects, every score
    (B,) computed on all rows.

    Returns ``(scaled, loss, metrics)``: ``loss`` is the objective (a mean over the kept rows), ``scaled`` is
    ``loss * share`` (``share``: this rank's share of the kept rows of every rank,
    :func:`lit_align.engine.distributed.global_share`; 1 in one process), the loss to backward, so that the
    rank-averaged gradient is the gradient of the mean over all ranks' kept rows. Without a kept row the loss
    is a zero that still reaches every score, so the backward runs over the whole detector as on the other
    ranks (FSDP2 reduce-scatters every parameter), and ``metrics`` is empty.
    """
    if not bool(keep.any()):
        scores = [watermarked, human, *(t for pair in extra for t in (pair.watermarked, pair.negatives))]
        zero = sum(s.sum() for s in scores) * 0.0
        return zero, zero.detach(), {}
    pairs = [pair._replace(watermarked=pair.watermarked[keep], negatives=pair.negatives[keep]) for pair in extra]
    loss, metrics = detector_objective(watermarked[keep], human[keep], pairs, reg=reg, reg_extra=reg_extra)
    return loss * share.to(loss.device), loss.detach(), metrics
