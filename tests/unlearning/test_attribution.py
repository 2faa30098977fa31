"""WAGLE attribution: summed gradients, the score formula, the baselines, and FSDP2 sharding."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import gloo_group, tiny_lm

from lit_align.data.batches import SequenceBatch
from lit_align.unlearning import ParameterMask, accumulate_gradients, attribution_scores

VOCAB = 50


def make_batches(n_batches: int, rows: int = 3, length: int = 10, seed: int = 0) -> list[tuple[SequenceBatch, torch.Tensor]]:
    """Right-padded batches: row lengths vary, the last ~half of each row's real tokens is the answer;
    the last batch carries a zero-weight padding row."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        ids = torch.randint(1, VOCAB, (rows, length), generator=g)
        attn = torch.zeros(rows, length, dtype=torch.long)
        loss = torch.zeros(rows, length, dtype=torch.long)
        for r in range(rows):
            real = length - (r % 3)
            attn[r, :real] = 1
            loss[r, real // 2:real] = 1
        ids = ids * attn
        weights = torch.ones(rows)
        if b == n_batches - 1:
            weights[-1] = 0.0
        index = torch.arange(b * rows, (b + 1) * rows)
        out.append((SequenceBatch(ids, attn, loss, index), weights))
    return out


def direct_nll_sum(model, batches) -> torch.Tensor:
    """sum_i w_i * (mean over answer tokens of -log p), from the model's full logits."""
    total = 0.0
    for batch, w in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), batch.input_ids[:, 1:], reduction="none")  # (B, T-1)
        m = (batch.loss_mask[:, 1:] * batch.attention_mask[:, 1:]).float()
        total = total + ((nll * m).sum(-1) / m.sum(-1) * w).sum()
    return total


def test_accumulated_gradients_equal_the_summed_weighted_nll_gradient_and_leave_no_trace():
    model = tiny_lm(vocab_size=VOCAB, hidden_size=32, attention_dropout=0.5).train()
    batches = make_batches(3)
    grads = accumulate_gradients(model, batches)
    assert model.training and all(m.training for m in model.modules()), "train mode not restored"
    assert all(p.grad is None for p in model.parameters()), "model gradients not cleared"

    model.eval()  # the expected value: dropout off
    names = [n for n, _ in model.named_parameters()]
    expected = torch.autograd.grad(direct_nll_sum(model, batches), list(model.parameters()), allow_unused=True)
    assert list(grads) == names
    for name, e in zip(names, expected):
        e = torch.zeros_like(grads[name]) if e is None else e
        torch.testing.assert_close(grads[name], e, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max() for g in grads.values()) > 0


def test_wagle_score_equals_the_hand_computed_formula():
    """theta = [2, -1], g_f = [0.5, 3], g_r = [1, -2], gamma = 4:
    S = |(theta - g_r / gamma) * g_f| = |(2 - 0.25) * 0.5|, |(-1 + 0.5) * 3| = [0.875, 1.5]."""
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -1.0]]))
    g_f = {"weight": torch.tensor([[0.5, 3.0]])}
    g_r = {"weight": torch.tensor([[1.0, -2.0]])}
    s = attribution_scores(model, g_f, g_r, method="wagle", gamma=4.0)
    torch.testing.assert_close(s["weight"], torch.tensor([[0.875, 1.5]]))
    # baselines on the same numbers: SNIP |theta g_f| = [1, 3]; gradient |g_f|; magnitude |theta|
    torch.testing.assert_close(attribution_scores(model, g_f, method="snip")["weight"], torch.tensor([[1.0, 3.0]]))
    torch.testing.assert_close(attribution_scores(model, g_f, method="gradient")["weight"], torch.tensor([[0.5, 3.0]]))
    torch.testing.assert_close(attribution_scores(model, method="magnitude")["weight"], torch.tensor([[2.0, 1.0]]))


def test_wagle_score_on_a_tiny_lm_and_the_snip_limit():
    model = tiny_lm(vocab_size=VOCAB, hidden_size=32)
    g_f = accumulate_gradients(model, make_batches(2, seed=1))
    g_r = accumulate_gradients(model, make_batches(2, seed=2))
    s = attribution_scores(model, g_f, g_r, method="wagle", gamma=1e-2)
    for name, p in model.named_parameters():  # the direct elementwise formula
        torch.testing.assert_close(s[name], ((p.detach() - g_r[name] / 1e-2) * g_f[name]).abs())
    assert any(not torch.equal(s[n], (p.detach() * g_f[n]).abs()) for n, p in model.named_parameters())
    # gamma -> infinity: the ranking (hence the mask) is SNIP's
    snip = ParameterMask.select_top(attribution_scores(model, g_f, method="snip"), 0.3)
    limit = ParameterMask.select_top(attribution_scores(model, g_f, g_r, method="wagle", gamma=1e30), 0.3)
    small = ParameterMask.select_top(s, 0.3)
    assert all(torch.equal(snip[n], limit[n]) for n in snip)
    assert any(not torch.equal(snip[n], small[n]) for n in snip)


def test_random_scores_are_seeded_and_bad_arguments_are_refused():
    model = tiny_lm(vocab_size=VOCAB, hidden_size=32)
    a = attribution_scores(model, method="random", seed=3)
    b = attribution_scores(model, method="random", seed=3)
    c = attribution_scores(model, method="random", seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    assert all(0 <= float(v.min()) and float(v.max()) < 1 for v in a.values())
    with pytest.raises(ValueError, match="unknown attribution method"):
        attribution_scores(model, method="wanda")
    with pytest.raises(ValueError, match="needs g_forget and g_retain"):
        attribution_scores(model, {}, None, method="wagle")
    with pytest.raises(ValueError, match="gamma must be > 0"):
        attribution_scores(model, {}, {}, method="wagle", gamma=0)


# -- FSDP2: two gloo processes give the one-process gradients and exactly the one-process mask ----------
def _fsdp2_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from lit_align.models.fsdp import fsdp2_parallelize

    with gloo_group(rank, world, init):
        mesh = init_device_mesh("cpu", (world,))
        model = tiny_lm(vocab_size=VOCAB, hidden_size=32)
        fsdp2_parallelize(model, mesh)
        batches = make_batches(4, seed=7)
        grads = accumulate_gradients(model, batches[rank::world])  # this rank's share, summed over ranks
        full = {n: g.full_tensor() for n, g in grads.items()}
        # selection on sharded scores (quantised, so ties straddle the shards) vs the full scores
        g = torch.Generator().manual_seed(0)
        scores = {n: (4 * torch.rand(tuple(p.shape), generator=g)).floor() for n, p in model.named_parameters()}
        sharded = {n: distribute_tensor(s, mesh, model.get_parameter(n).placements, src_data_rank=None)
                   for n, s in scores.items()}
        mask = ParameterMask.select_top(sharded, 0.37)
        selected = mask.num_selected()
        mask.save(os.path.join(out_dir, "mask.pt"))
        wagle = ParameterMask.select_top(attribution_scores(model, grads, grads, method="wagle", gamma=1.0), 0.5)
        wagle_full = {n: m.full_tensor() for n, m in wagle.items()}
        if rank == 0:
            torch.save({"grads": full, "selected": selected, "wagle_masks": wagle_full}, os.path.join(out_dir, "out.pt"))


def test_fsdp2_gradients_and_sharded_selection_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_fsdp2_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, start_method="spawn")  # fork breaks autograd on CUDA builds
    out = torch.load(tmp_path / "out.pt", weights_only=True)

    model = tiny_lm(vocab_size=VOCAB, hidden_size=32)
    grads = accumulate_gradients(model, make_batches(4, seed=7))
    for n, g in grads.items():  # the global sum, not FSDP's average
        torch.testing.assert_close(out["grads"][n], g, rtol=1e-4, atol=1e-6)

    g = torch.Generator().manual_seed(0)
    scores = {n: (4 * torch.rand(tuple(p.shape), generator=g)).floor() for n, p in model.named_parameters()}
    one = ParameterMask.select_top(scores, 0.37)
    two = ParameterMask.load(tmp_path / "mask.pt", model)
    assert out["selected"] == one.num_selected() == int(one.numel * 0.37)
    assert all(torch.equal(one[n], two[n]) for n in one), "sharded selection differs from one process"
    assert sum(int(m.sum()) for m in out["wagle_masks"].values()) == int(one.numel * 0.5)


def _ddp_worker(rank: int, world: int, init: str, out_dir: str) -> None:

    with gloo_group(rank, world, init):  # replicated weights (DDP's case): each rank its share, then all_reduce(SUM)
        grads = accumulate_gradients(tiny_lm(vocab_size=VOCAB, hidden_size=32), make_batches(4, seed=7)[rank::world])
        if rank == 0:
            torch.save(grads, os.path.join(out_dir, "grads.pt"))


def test_replicated_gradients_are_summed_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2, start_method="spawn")  # fork breaks autograd on CUDA builds
    two = torch.load(tmp_path / "grads.pt", weights_only=True)
    one = accumulate_gradients(tiny_lm(vocab_size=VOCAB, hidden_size=32), make_batches(4, seed=7))
    for n, g in one.items():
        torch.testing.assert_close(two[n], g, rtol=1e-4, atol=1e-6)
