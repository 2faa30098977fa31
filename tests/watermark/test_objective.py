"""kept_objective: the detector's loss over the kept rows, scaled by the rank's share, and a zero that still
reaches every score when a rank kept no row (its backward then runs over the whole detector, as on the others)."""

from __future__ import annotations

import torch

from lit_align.losses.watermark import DetectorPair, detector_objective
from lit_align.watermark.objective import kept_objective


def _scores():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, generator=g).requires_grad_() for _ in range(3)]


def test_the_kept_rows_only_scaled_by_the_share():
    s_w, s_h, s_p = _scores()
    keep = torch.tensor([True, False, True, True])
    extra = [DetectorPair("paraphrase", s_p, s_h, 0.5)]
    scaled, loss, metrics = kept_objective(s_w, s_h, extra, keep, torch.tensor(1.5), reg=0.01, reg_extra=False)
    expected, m = detector_objective(s_w[keep], s_h[keep], [DetectorPair("paraphrase", s_p[keep], s_h[keep], 0.5)],
                                     reg=0.01)
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(scaled, 1.5 * expected)
    assert metrics.keys() == m.keys()
    scaled.backward()
    assert s_w.grad[1] == 0 and s_w.grad[0] != 0  # the dropped row takes no part


def test_no_kept_row_gives_a_zero_that_reaches_every_score():
    s_w, s_h, s_p = _scores()
    keep = torch.zeros(4, dtype=torch.bool)
    scaled, loss, metrics = kept_objective(s_w, s_h, [DetectorPair("substitution", s_p, s_h)], keep, torch.tensor(0.0),
                                           reg=1e-4, reg_extra=False)
    assert float(scaled) == float(loss) == 0.0 and metrics == {}
    scaled.backward()
    for s in (s_w, s_h, s_p):
        assert s.grad is not None and torch.equal(s.grad, torch.zeros(4))
