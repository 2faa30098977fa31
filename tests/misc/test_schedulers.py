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
