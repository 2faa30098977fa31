import pytest
import torch

from lit_align.schedulers import WarmupLinearLR


def test_warmup_linear_factors_by_hand():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupLinearLR(opt, total_steps=6, warmup_steps=2)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 1.5, 1.0, 0.5, 0.0])


def test_warmup_linear_rejects_bad_lengths():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        WarmupLinearLR(opt, total_steps=5, warmup_steps=5)


def test_warmup_cosine_factors_by_hand():
    from lit_align.schedulers import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=5, warmup_steps=1)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)


def test_warmup_inverse_sqrt_is_gpo_schedule():
    """Warm-up from 0.1 to 1 over 4 steps, then sqrt(4 / s) (the docstring's example)."""
    from lit_align.schedulers import WarmupInverseSqrtLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupInverseSqrtLR(opt, warmup_steps=4, floor=0.1)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1, 0.325, 0.55, 0.775, 1.0, (4 / 5) ** 0.5, (4 / 6) ** 0.5]
    assert lrs == pytest.approx([2.0 * f for f in expected])
    with pytest.raises(ValueError, match="floor"):
        WarmupInverseSqrtLR(opt, floor=1.5)
