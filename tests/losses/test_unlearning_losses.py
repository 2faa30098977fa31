"""Unlearning losses and terms against values derived by hand, and their intended effects on a tiny LM.

Spec: shared/methods/core.md §4.5 (GA, GradDiff, NPO, PO), others.md §1(g) (LLMU tests), §2(g) (UGradSL tests).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_lm

from lit_align.losses import (
    NPO,
    GradientAscent,
    LabelSmoothedAscent,
    MismatchNLL,
    Refusal,
    RetainKL,
    RetainNLL,
    UnlearningTerm,
    gls_cross_entropy,
    gradient_ascent_loss,
    kl_loss,
    label_smoothed_ascent_loss,
    npo_loss,
)
from lit_align.rollout import TokenStats, sequence_logps, token_kl, token_stats
from lit_align.rollout.logps import position_ids_from_mask

VOCAB = 61
PAD = 0
LOG2 = math.log(2.0)


def _model(seed: int = 0):
    return tiny_lm("qwen2", vocab_size=VOCAB, hidden_size=32, seed=seed, max_position_embeddings=64)


def _batch(lengths=((3, 4), (5, 2), (2, 3)), seed: int = 1, pad_right: int = 0):
    """Right-padded rows (prompt_len, answer_len); loss_mask = 1 on the answer. ``pad_right`` extra pad columns."""
    g = torch.Generator().manual_seed(seed)
    T = max(p + r for p, r in lengths) + pad_right
    ids = torch.full((len(lengths), T), PAD)
    attn = torch.zeros(len(lengths), T, dtype=torch.long)
    lmask = torch.zeros_like(attn)
    for b, (p, r) in enumerate(lengths):
        ids[b, : p + r] = torch.randint(1, VOCAB, (p + r,), generator=g)
        attn[b, : p + r] = 1
        lmask[b, p : p + r] = 1
    return ids, attn, lmask


def _stats(model, batch, **kw) -> TokenStats:
    return token_stats(model, *batch, **kw)


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


# -- pure functions against hand-derived values -----------------------------------------------------


def test_gradient_ascent_hand_values():
    """Docstring example: NLL = (log 2 + 2 log 2)/2 = 1.5 log 2; sequence mean over rows (1.5 log 2, 3 log 2)."""
    logps = torch.tensor([[0.0, math.log(0.5), math.log(0.25)], [7.0, math.log(0.125), float("nan")]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    loss, m = gradient_ascent_loss(logps[:1], mask[:1])
    assert loss.item() == pytest.approx(-1.5 * LOG2) and m["nll"].item() == pytest.approx(1.5 * LOG2)
    token, m = gradient_ascent_loss(logps, mask)  # (log2 + 2log2 + 3log2) / 3 = 2 log 2; unmasked nan / 7 ignored
    assert token.item() == pytest.approx(-2 * LOG2) and m["tokens"].item() == 3
    seq, m = gradient_ascent_loss(logps, mask, reduction="sequence")  # mean(1.5 log 2, 3 log 2) = 2.25 log 2
    assert seq.item() == pytest.approx(-2.25 * LOG2) and m["nll"].item() == pytest.approx(2 * LOG2)


def test_npo_hand_values_and_metrics():
    """beta = 0.5, r = (0, 1): per-row losses 4 log 2 and -4 log sigmoid(-0.5) = 4 log(1 + e^0.5)."""
    pol, ref = torch.tensor([-3.0, -1.0]), torch.tensor([-3.0, -2.0])
    loss, m = npo_loss(pol, ref, beta=0.5)
    expected = (4 * LOG2 + 4 * math.log(1 + math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["log_ratio"].item() == pytest.approx(0.5)
    assert m["weight"].item() == pytest.approx((1.0 + 2 / (1 + math.exp(-0.5))) / 2, rel=1e-6)
    assert m["logps"].item() == pytest.approx(-2.0) and m["ref_logps"].item() == pytest.approx(-2.5)
    for beta in (0.1, 1.0, 3.0):  # at policy == reference: (2 / beta) log 2
        assert npo_loss(ref, ref, beta=beta)[0].item() == pytest.approx(2 / beta * LOG2, rel=1e-6)
    assert npo_loss(ref, ref)[0].item() == pytest.approx(13.8629, abs=1e-4)


@pytest.mark.parametrize("bad", [0, -0.1, float("inf"), float("nan"), "0.1", True])
def test_npo_rejects_bad_beta(bad):
    with pytest.raises(ValueError, match="beta"):
        npo_loss(torch.zeros(2), torch.zeros(2), beta=bad)
    with pytest.raises(ValueError, match="beta"):
        NPO(beta=bad)


def test_npo_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same \\(B,\\) shape"):
        npo_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="same \\(B,\\) shape"):
        npo_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="empty"):
        npo_loss(torch.zeros(0), torch.zeros(0))


def test_kl_loss_hand_values():
    """Token mean (0.2 + 0.4 + 0.6) / 3 = 0.4; sequence mean (0.3 + 0.6) / 2 = 0.45."""
    values = torch.tensor([[0.0, 0.2, 0.4], [0.0, 0.6, 9.9]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    loss, m = kl_loss(values, mask)
    assert loss.item() == pytest.approx(0.4) and m["mean"].item() == pytest.approx(0.4) and m["tokens"].item() == 3
    assert kl_loss(values, mask, reduction="sequence")[0].item() == pytest.approx(0.45)
    with pytest.raises(ValueError, match="reduction"):
        kl_loss(values, mask, reduction="sum")


def test_label_smoothed_ascent_hand_values():
    """alpha = -1: l = -2 log p_y + mean_v log p_v = [2 log 2 - 2, 4 log 2 - 3]; the loss is minus their token mean."""
    logps = torch.tensor([[0.0, math.log(0.5), math.log(0.25)]])
    means = torch.tensor([[0.0, -2.0, -3.0]])
    mask = torch.tensor([[0, 1, 1]])
    loss, m = label_smoothed_ascent_loss(logps, means, mask, alpha=-1.0)
    gls = ((2 * LOG2 - 2) + (4 * LOG2 - 3)) / 2
    assert loss.item() == pytest.approx(-gls) and m["gls"].item() == pytest.approx(gls)
    assert m["nll"].item() == pytest.approx(1.5 * LOG2) and m["uniform_nll"].item() == pytest.approx(2.5)
    # alpha = 0 is plain gradient ascent, for either reduction
    for reduction in ("token", "sequence"):
        a = label_smoothed_ascent_loss(logps, means, mask, alpha=0.0, reduction=reduction)[0]
        assert a.item() == pytest.approx(gradient_ascent_loss(logps, mask, reduction=reduction)[0].item())


# -- generalised label smoothing, classification form (others §2(g)) ------------------------------------


def _soft_target_ce(logits, labels, alpha):
    """Cross-entropy with the smoothed target (1 - alpha) onehot(y) + alpha / K, written directly."""
    K = logits.shape[-1]
    target = (1 - alpha) * F.one_hot(labels, K).float() + alpha / K
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def test_gls_equals_ce_and_soft_target_ce():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    torch.testing.assert_close(gls_cross_entropy(logits, labels, 0.0), F.cross_entropy(logits, labels))
    for alpha in (0.3, -0.5, -4.0):
        torch.testing.assert_close(gls_cross_entropy(logits, labels, alpha), _soft_target_ce(logits, labels, alpha))
    # positive smoothing agrees with torch's own label smoothing
    torch.testing.assert_close(gls_cross_entropy(logits, labels, 0.3), F.cross_entropy(logits, labels, label_smoothing=0.3))
    assert gls_cross_entropy(torch.zeros(2, 2), torch.tensor([0, 1]), -6.0).item() == pytest.approx(LOG2)
    assert gls_cross_entropy(logits, labels, -1.0, reduction="none").shape == (8,)


def test_torch_label_smoothing_cannot_do_negative_alpha():
    """Why a custom loss is needed (others §2(g)4, §2(h)2). The spec expects torch's built-in label smoothing to
    reject alpha < 0; torch 2.13 instead accepts it and silently ignores it (plain cross-entropy), which is worse.
    Either way it is not the GLS loss. Values above 1 are refused."""
    torch.manual_seed(0)
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    gls = gls_cross_entropy(logits, labels, -0.5)
    try:
        builtin = torch.nn.CrossEntropyLoss(label_smoothing=-0.5)(logits, labels)
    except RuntimeError as err:  # torch versions that validate the sign
        assert "label_smoothing" in str(err)
    else:
        torch.testing.assert_close(builtin, F.cross_entropy(logits, labels))  # the smoothing was dropped
        assert (builtin - gls).abs() > 1e-2
    with pytest.raises(RuntimeError, match="label_smoothing"):
        torch.nn.CrossEntropyLoss(label_smoothing=1.5)(logits, labels)
    assert torch.isfinite(gls_cross_entropy(logits * 1e4, labels, -8.0))  # log-space: no overflow


def test_gls_ascent_step_forgets_the_true_class():
    """p = 0, alpha = -1: starting from a classifier trained on the data (as unlearning does), one SGD step on
    -l_GLS lowers the true-class probability and the max probability and raises the prediction entropy on the
    forget set (others §2(g)2)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
    x, y = torch.randn(12, 6), torch.randint(0, 5, (12,))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(100):  # fit the "forget set" first
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.zero_grad()

    def probs():
        with torch.no_grad():
            return net(x).softmax(-1)

    before = probs()
    (-gls_cross_entropy(net(x), y, -1.0)).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.1 * p.grad
    after = probs()
    true_before, true_after = before.gather(-1, y[:, None]).mean(), after.gather(-1, y[:, None]).mean()
    entropy = lambda p: -(p * p.log()).sum(-1).mean()  # noqa: E731
    assert true_after < true_before
    assert after.max(-1).values.mean() < before.max(-1).values.mean()
    assert entropy(after) > entropy(before)


def test_label_smoothed_ascent_on_lm_equals_token_wise_gls():
    """The token-wise port: with mean_logps from token_stats, the loss is minus the GLS cross-entropy of every
    answer token's full-vocabulary logits (computed naively here)."""
    model = _model()
    ids, attn, lmask = _batch()
    stats = _stats(model, (ids, attn, lmask), mean_logps=True)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
        rows = (lmask[:, 1:] * attn[:, 1:]).bool()
        naive_logits, targets = logits[:, :-1][rows], ids[:, 1:][rows]  # (N, V), (N,)
    for alpha in (-0.5, -4.0, 0.2):
        loss, _ = label_smoothed_ascent_loss(stats.logps, stats.mean_logps, stats.mask, alpha=alpha)
        torch.testing.assert_close(loss.detach(), -gls_cross_entropy(naive_logits, targets, alpha), atol=1e-5, rtol=0)


# -- effects on a tiny LM (others §1(g)) ------------------------------------------------------------------


def _sgd_step(model, loss, lr=0.5):
    model.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _batch_nll(model, batch) -> float:
    with torch.no_grad():
        stats = _stats(model, batch)
        return (-(stats.logps.sum()) / stats.mask.sum()).item()


@pytest.mark.parametrize("term", [GradientAscent(), GradientAscent("sequence"), LabelSmoothedAscent(alpha=-1.0),
                                  NPO(beta=0.1), NPO(reduction="mean_token")])
def test_forget_terms_raise_the_forget_nll(term):
    """One SGD step on each forget term strictly increases the answer NLL of that batch."""
    model = _model()
    reference = copy.deepcopy(model).requires_grad_(False)
    batch = _batch()
    before = _batch_nll(model, batch)
    stats = _stats(model, batch, mean_logps=term.needs_mean_logps)
    ref = sequence_logps(reference, *batch, reduction=term.reduction) if term.needs_reference_logps else None
    loss, metrics = term(stats, ref)
    assert metrics["nll"].item() == pytest.approx(before, rel=1e-5)
    assert all(not v.requires_grad for v in metrics.values())
    _sgd_step(model, loss, lr=0.05)
    assert _batch_nll(model, batch) > before + 1e-4


@pytest.mark.parametrize("term", [RetainNLL(), MismatchNLL(), Refusal()])
def test_descent_terms_lower_their_nll(term):
    model = _model()
    batch = _batch(seed=4)
    before = _batch_nll(model, batch)
    loss, _ = term(_stats(model, batch))
    _sgd_step(model, loss, lr=0.05)
    assert _batch_nll(model, batch) < before - 1e-4


def test_npo_at_init_and_gradient_is_a_positive_multiple_of_ga():
    """At theta == theta_ref: the loss is (2 / beta) log 2; grad NPO = mean_b 2 sigma(0) grad(logp_b):
    mean_token NPO's gradient equals GA's with the "sequence" reduction, and sum_sequence NPO's is
    N_tokens / B times GA's "token" gradient (cosine 1 either way)."""
    model = _model()
    reference = copy.deepcopy(model).requires_grad_(False)
    batch = _batch()
    n_tokens, B = _stats(model, batch).mask.sum().item(), batch[0].shape[0]
    pairs = [(NPO(beta=0.1, reduction="mean_token"), GradientAscent("sequence"), 1.0),
             (NPO(beta=0.1, reduction="sum_sequence"), GradientAscent("token"), n_tokens / B)]
    for npo, ga, ratio in pairs:
        ref = sequence_logps(reference, *batch, reduction=npo.reduction)
        model.zero_grad(set_to_none=True)
        loss, metrics = npo(_stats(model, batch), ref)
        assert loss.item() == pytest.approx(2 / 0.1 * LOG2, abs=1e-4)
        assert metrics["log_ratio"].abs().item() < 1e-5 and metrics["weight"].item() == pytest.approx(1.0)
        loss.backward()
        g_npo = _flat_grad(model)
        model.zero_grad(set_to_none=True)
        ga(_stats(model, batch))[0].backward()
        g_ga = _flat_grad(model)
        assert F.cosine_similarity(g_npo, g_ga, dim=0).item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(g_npo, ratio * g_ga, atol=1e-6, rtol=1e-4)


def test_answer_only_masking():
    """Only answer positions count: garbage at prompt / pad positions changes nothing; changing an answer
    token's log-prob changes the loss (others §1(g)1)."""
    logps = torch.randn(2, 6) - 2
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]])
    garbage = torch.where(mask.bool(), logps, torch.full_like(logps, float("nan")))
    stats, dirty = TokenStats(logps, mask.float()), TokenStats(garbage, mask.float())
    for term in (GradientAscent(), MismatchNLL(), RetainNLL("sequence")):
        torch.testing.assert_close(term(dirty)[0], term(stats)[0])
    changed = logps.clone()
    changed[0, 2] -= 1.0
    assert GradientAscent()(TokenStats(changed, mask.float()))[0] != GradientAscent()(stats)[0]


def test_right_padding_invariance():
    """Extra pad columns leave every term unchanged on a real model (no hard-coded pad id, others §1(g)6)."""
    model = _model()
    reference = copy.deepcopy(model).requires_grad_(False)
    plain, padded = _batch(), _batch(pad_right=3)
    assert padded[0].shape[1] == plain[0].shape[1] + 3
    with torch.no_grad():
        for term in (GradientAscent(), GradientAscent("sequence"), MismatchNLL(), NPO(), LabelSmoothedAscent()):
            values = []
            for batch in (plain, padded):
                ref = sequence_logps(reference, *batch, reduction=term.reduction) if term.needs_reference_logps else None
                values.append(term(_stats(model, batch, mean_logps=term.needs_mean_logps), ref)[0])
            torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=0, msg=repr(term))
        kls = []
        for batch in (plain, padded):
            ids, attn, _ = batch
            kls.append(RetainKL()(None, kl=token_kl(model, _model(seed=3), ids, attn, attn))[0])
        torch.testing.assert_close(kls[0], kls[1], atol=1e-6, rtol=0)


def test_retain_kl_at_init_both_forms():
    """theta == theta_o: form kl gives 0, form cross_entropy the reference entropy; identical gradients."""
    model = _model()
    reference = copy.deepcopy(model).requires_grad_(False)
    ids, attn, lmask = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for form in ("kl", "cross_entropy"):
        term = RetainKL(form=form)
        kl = token_kl(model, reference, ids, attn, attn if term.positions == "all" else lmask)
        loss, metrics = term(None, kl=kl)
        results[form] = (loss, metrics, torch.autograd.grad(loss, params))
    assert abs(results["kl"][0].item()) < 1e-6
    assert results["cross_entropy"][0].item() == pytest.approx(results["kl"][1]["cross_entropy"].item(), rel=1e-6)
    assert results["cross_entropy"][0].item() > 1.0  # ~ log V for a random tiny model: never 0
    for a, b in zip(results["kl"][2], results["cross_entropy"][2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# -- terms: flags, repr, errors ---------------------------------------------------------------------------


def test_term_flags_and_repr():
    assert (GradientAscent.target, Refusal.target, RetainNLL.target, RetainKL.target, MismatchNLL.target) == (
        "forget", "refusal", "retain", "retain", "mismatch")
    assert NPO.needs_reference_logps and not GradientAscent.needs_reference_logps
    assert LabelSmoothedAscent.needs_mean_logps and RetainKL.needs_kl and not RetainNLL.needs_kl
    assert NPO().reduction == "sum" and NPO(reduction="mean_token").reduction == "mean"
    assert RetainKL().positions == "all" and RetainKL(positions="response").positions == "response"
    assert GradientAscent().positions == "response"
    assert repr(NPO(beta=0.2, reduction="mean_token")) == "NPO(beta=0.2, reduction='mean_token')"
    assert repr(LabelSmoothedAscent(alpha=-2)) == "LabelSmoothedAscent(alpha=-2.0, reduction='token')"
    assert repr(RetainKL(form="cross_entropy")) == "RetainKL(form='cross_entropy', positions='all', reduction='token')"
    assert repr(MismatchNLL()) == "MismatchNLL(reduction='sequence')"
    assert isinstance(Refusal(), UnlearningTerm)


@pytest.mark.parametrize("make, field", [
    (lambda: GradientAscent("sum"), "reduction"),
    (lambda: RetainNLL("mean"), "reduction"),
    (lambda: NPO(reduction="sum"), "reduction"),
    (lambda: NPO(beta=0), "beta"),
    (lambda: LabelSmoothedAscent(alpha=2.0), "alpha"),
    (lambda: LabelSmoothedAscent(alpha=float("nan")), "alpha"),
    (lambda: RetainKL(form="reverse"), "form"),
    (lambda: RetainKL(positions="prompt"), "positions"),
])
def test_bad_hyperparameters_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_missing_inputs_raise_clear_errors():
    stats = TokenStats(torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="ref_logps"):
        NPO()(stats)
    with pytest.raises(ValueError, match="mean_logps=True"):
        LabelSmoothedAscent()(stats)
    with pytest.raises(ValueError, match="token_kl"):
        RetainKL()(stats)
    with pytest.raises(ValueError, match="same \\(B, T\\) shape"):
        gradient_ascent_loss(torch.zeros(2, 3), torch.ones(2, 4))
