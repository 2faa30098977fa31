"""FIS influences, pseudo-labels and selection (others.md §4(g) 1, 3, 5 and the 2-process selection)."""

import pytest
import torch
from conftest import gloo_group, spawn_ranks
from torch import nn

from lit_align.classifiers.influence import (
    fis_scores,
    parameter_names,
    per_class_gradients,
    score_candidates,
    select_most_negative,
    true_label_keep,
    unshard,
    validation_gradients,
    validation_losses,
)
from lit_align.classifiers.sampling import (
    EntropySampler,
    FairInfluenceSampler,
    JTTSampler,
    RandomSampler,
    SelectionContext,
)
from lit_align.errors import ConfigError


def _rows(n: int, seed: int):
    """Two groups; y = [x0 > 0]; group 1 shifts x1 by 1.5 (a proxy the model can pick up)."""
    g = torch.Generator().manual_seed(seed)
    group = (torch.rand(n, generator=g) < 0.5).long()
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long()
    x[:, 1] += 1.5 * group
    return x, y, group


def _biased_net(dtype=torch.float32) -> nn.Sequential:
    """A 1-hidden-layer MLP trained on labelled rows where group 1 is almost never positive."""
    torch.manual_seed(0)
    x, y, group = _rows(400, 0)
    keep = ~((group == 1) & (y == 1)) | (torch.rand(400) < 0.1)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[keep].to(dtype)), y[keep]).backward()
        opt.step()
    return net


def _context(net, pool, validation, budget=40, **kw) -> SelectionContext:
    return SelectionContext(net=net, head=list(net[2].parameters()), candidates=torch.arange(len(pool)),
                            features=lambda i: pool[i], validation=validation, num_classes=2, num_groups=2,
                            budget=budget, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("which", ["head", "all"])
@pytest.mark.parametrize("fairness", ["dp", "eop", "eod"])
def test_one_sgd_step_changes_validation_losses_by_eta_times_influence(which, fairness):
    """§4(g)1 with the code's sign: I = -<g_z, g_val>; one SGD step theta <- theta - eta g_z(c), eta = 1e-4, on a
    random candidate moves L_acc and L_fair by eta * I (relative error < 5%; float64, two validation batches)."""
    net = _biased_net(torch.float64)
    xv, yv, gv = _rows(300, 1)
    val = [(xv[:180].double(), yv[:180], gv[:180]), (xv[180:].double(), yv[180:], gv[180:])]
    names = parameter_names(net, which, list(net[2].parameters()))
    g_acc, g_fair = validation_gradients(net, names, val, fairness=fairness)
    xp, _, _ = _rows(20, 2)
    i_acc, i_fair = score_candidates(net, names, xp.double(), 2, g_acc, g_fair)
    z, c, eta = 3, 1, 1e-4
    cur_acc, cur_fair = (v.item() for v in validation_losses(net, val, fairness=fairness))
    params = dict(net.named_parameters())
    loss = nn.functional.cross_entropy(net(xp[z:z + 1].double()), torch.tensor([c]))
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    with torch.no_grad():
        for name, grad in zip(names, grads):
            params[name] -= eta * grad
        new_acc, new_fair = (v.item() for v in validation_losses(net, val, fairness=fairness))
    assert new_acc - cur_acc == pytest.approx(eta * i_acc[z, c].item(), rel=0.05)
    assert new_fair - cur_fair == pytest.approx(eta * i_fair[z, c].item(), rel=0.05)
    assert abs(i_fair[z, c].item()) > 0


def test_vmap_per_class_gradients_match_a_loop():
    net = _biased_net()
    x, _, _ = _rows(4, 3)
    names = parameter_names(net, "all", [])
    grads = per_class_gradients(net, names, x, 2)  # (4, 2, P)
    for n in range(4):
        for c in range(2):
            net.zero_grad()
            nn.functional.cross_entropy(net(x[n:n + 1]), torch.tensor([c])).backward()
            flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            assert torch.allclose(grads[n, c], flat, atol=1e-6)


def test_pseudo_label_score_and_selection_rules():
    """c_hat = argmin_c |I_acc|; s = I_fair(c_hat), zeroed where I_acc(c_hat) > 0; at most `budget` items, all
    s < 0, most negative first; a candidate with I_acc > 0 at its pseudo-label is never selected. (Hand-made
    influences, possible with K > 2 only: for two classes see the next test.)"""
    i_acc = torch.tensor([[-0.1, 0.5], [0.2, -0.9], [0.3, 0.4], [-0.2, -0.05], [-0.01, 0.3]])
    i_fair = torch.tensor([[-1.0, 0.0], [-2.0, 9.0], [-3.0, -3.0], [4.0, 1.0], [-0.5, 0.0]])
    scores, c_hat = fis_scores(i_acc, i_fair)
    assert c_hat.tolist() == [0, 0, 0, 1, 0]
    assert scores.tolist() == pytest.approx([-1.0, 0.0, 0.0, 1.0, -0.5])  # rows 1, 2 zeroed: I_acc(c_hat) > 0
    assert select_most_negative(scores, 5).tolist() == [0, 4]
    assert select_most_negative(scores, 1).tolist() == [0]
    assert fis_scores(i_acc, i_fair, remove_pos=False)[0][1].item() == -2.0
    keep = true_label_keep(i_acc, i_fair, torch.tensor([0, 1, 0, 1, 0]))
    assert keep.tolist() == [True, False, False, False, True]


def test_two_classes_pseudo_label_is_the_prediction_and_recheck_drops_the_misclassified():
    """K = 2: g_z(0) = -(p1 / p0) g_z(1) over any subset, so c_hat = argmax p, and a selected row (I_acc(c_hat)
    <= 0, s < 0) survives the true-label recheck exactly when its label is the prediction."""
    net = _biased_net(torch.float64)
    pool, y, _ = _rows(300, 2)
    pool = pool.double()
    vx, vy, vg = _rows(300, 1)
    for which in ("head", "all"):
        names = parameter_names(net, which, list(net[2].parameters()))
        g_acc, g_fair = validation_gradients(net, names, [(vx.double(), vy, vg)], fairness="dp")
        i_acc, i_fair = score_candidates(net, names, pool, 2, g_acc, g_fair)
        p = net(pool).softmax(-1).detach()
        assert torch.allclose(i_acc[:, 0], -(p[:, 1] / p[:, 0]) * i_acc[:, 1], rtol=1e-6, atol=1e-12)
        scores, c_hat = fis_scores(i_acc, i_fair)
        assert torch.equal(c_hat, p.argmax(-1))
        chosen = select_most_negative(scores, 300)
        assert len(chosen) > 0
        for labels in (y, 1 - y, torch.randint(2, (300,), generator=torch.Generator().manual_seed(3))):
            keep = true_label_keep(i_acc[chosen], i_fair[chosen], labels[chosen])
            assert torch.equal(keep, labels[chosen] == c_hat[chosen])


def test_validation_set_without_a_group_or_rows_names_the_keys():
    """A validation set lacking a group would give g_fair = 0 (nothing ever selected): a ConfigError naming
    data.init_args.group; an empty one names the split's val_ratio."""
    net = _biased_net()
    x, y, group = _rows(50, 1)
    names = parameter_names(net, "head", list(net[2].parameters()))
    with pytest.raises(ConfigError, match=r"no row of group\(s\) \[1\].*data.init_args.group"):
        validation_gradients(net, names, [(x, y, torch.zeros_like(group))], fairness="dp")
    with pytest.raises(ConfigError, match="data.init_args.split.init_args.val_ratio"):
        validation_losses(net, [], fairness="dp")


def test_fis_selection_on_a_real_model_respects_budget_sign_and_accuracy():
    """§4(g)3 on a trained MLP: <= budget items, every selected score < 0, no selected item has I_acc > 0 at its
    pseudo-label."""
    net = _biased_net()
    pool, _, _ = _rows(300, 2)
    val = [_rows(300, 1)]
    ctx = _context(net, pool, val, budget=30)
    sampler = FairInfluenceSampler()
    selection = sampler.select(ctx)
    assert 0 < len(selection.indices) <= 30
    assert (selection.scores < 0).all()
    i_acc, _ = sampler.influences(ctx, torch.arange(300))
    rows = selection.indices
    assert (i_acc[rows, selection.pseudo_labels] <= 0).all()
    assert selection.indices.unique().numel() == len(selection.indices)


def test_planted_fair_helpful_cluster_is_selected_more_than_at_random():
    """§4(g)5: the labelled set almost lacks group-1 positives (the model under-predicts 1 for group 1, a DP gap on
    validation); in the pool those rows are the fair-helpful cluster (about 27% of it). FIS picks them far more
    often than random sampling's share."""
    net = _biased_net()
    pool, y, group = _rows(400, 2)
    cluster = (group == 1) & (y == 1)
    ctx = _context(net, pool, [_rows(300, 1)], budget=40)
    chosen = FairInfluenceSampler(fairness="dp").select(ctx).indices
    random_pick = RandomSampler().select(ctx).indices
    share = cluster[chosen].float().mean().item()
    assert share > cluster.float().mean().item() + 0.2
    assert share > cluster[random_pick].float().mean().item()


def test_parameter_subset_option():
    net = _biased_net()
    assert parameter_names(net, "head", list(net[2].parameters())) == ["2.weight", "2.bias"]
    assert len(parameter_names(net, "all", [])) == 4
    assert parameter_names(net, ["0.bias", "2.bias"], []) == ["0.bias", "2.bias"]
    with pytest.raises(ConfigError, match=r"sampler.init_args.parameters: unknown .*'nope'.*2.weight"):
        parameter_names(net, ["nope"], [])
    with pytest.raises(ConfigError, match="sampler.init_args.parameters"):
        parameter_names(net, "last", [])


def test_mc_dropout_mutual_information():
    """BALD with dropout: the selected rows carry positive mutual information, the top of the pool's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 2))
    pool, _, _ = _rows(200, 4)
    ctx = SelectionContext(net=net, head=list(net[3].parameters()), candidates=torch.arange(200),
                           features=lambda i: pool[i], validation=[], num_classes=2, num_groups=2, budget=10,
                           generator=torch.Generator().manual_seed(0))
    selection = EntropySampler(mc_samples=20).select(ctx)
    assert (selection.scores > 0).all() and len(selection.indices) == 10
    again = EntropySampler(mc_samples=20).select(SelectionContext(**{**vars(ctx),
                                                                     "generator": torch.Generator().manual_seed(0)}))
    assert torch.equal(again.indices, selection.indices)  # seeded from the round's generator


def test_sampler_options_are_checked_at_construction():
    with pytest.raises(ConfigError, match="sampler.init_args.upweight"):
        JTTSampler(upweight=0)
    with pytest.raises(ConfigError, match="sampler.init_args.mc_samples"):
        EntropySampler(mc_samples=-1)


def test_baseline_samplers():
    """Random: budget distinct candidates; entropy: the most uncertain rows (near x0 = 0); JTT: misclassified
    queried rows get `upweight` copies."""
    net = _biased_net()
    pool, y, _ = _rows(200, 4)
    ctx = _context(net, pool, [], budget=10)
    rand = RandomSampler().select(ctx).indices
    assert len(rand.unique()) == 10
    ent = EntropySampler().select(ctx)
    assert pool[ent.indices, 0].abs().mean() < pool[:, 0].abs().mean() / 2
    assert torch.equal(ent.pseudo_labels, net(pool[ent.indices]).argmax(-1))  # last epochs: predicted labels
    assert (EntropySampler(mc_samples=3).select(ctx).scores.abs() < 1e-6).all()  # no dropout: MI = 0
    jtt = JTTSampler(upweight=4)
    sel = jtt.select(ctx)
    wrong = net(pool[sel.indices]).argmax(-1) != y[sel.indices]
    repeats = jtt.accept(ctx, sel, y[sel.indices])
    assert repeats.tolist() == torch.where(wrong, 4, 1).tolist()


# -- two processes ------------------------------------------------------------------------------
def _select_worker(rank: int, world: int, init: str, queue) -> None:
    import torch.distributed as dist

    with gloo_group(rank, world, init):
        try:
            queue.put((rank, _fis_select(rank, world, _all_gather if world > 1 else None)))
        except Exception as err:  # report instead of leaving the parent waiting
            queue.put((rank, repr(err)))
    del dist


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.stack(out)


def _fis_select(rank: int, world: int, gather) -> tuple[list[int], list[float]]:
    net = _biased_net()
    pool, _, _ = _rows(101, 2)  # odd: the shards differ in length
    kw = {"gather": gather} if gather else {}
    ctx = _context(net, pool, [_rows(300, 1)], budget=20, rank=rank, world=world, **kw)
    selection = FairInfluenceSampler(chunk_size=16).select(ctx)
    return selection.indices.tolist(), selection.scores.tolist()


def test_unshard_puts_rows_back_in_candidate_order():
    shards = [torch.tensor([0, 3, 6]), torch.tensor([1, 4, 0]), torch.tensor([2, 5, 0])]  # n = 7, world 3
    out = unshard(shards[0], 7, 3, lambda t: torch.stack(shards))
    assert out.tolist() == list(range(7))


@pytest.mark.integration  # 7-17 s (two spawned interpreters import lit_align)
def test_two_process_selection_equals_one_process(tmp_path):
    """Candidates scored on each rank's shard, scores all-gathered: both ranks select exactly what one process
    selects."""
    results = spawn_ranks(_select_worker, tmp_path, timeout=120)
    single_indices, single_scores = _fis_select(0, 1, None)
    assert len(single_indices) > 0
    for rank in (0, 1):
        indices, scores = results[rank]
        assert indices == single_indices
        assert scores == pytest.approx(single_scores, rel=1e-5)
