"""FEWL (Wei et al. 2024, arXiv 2402.10412): the minimal CPU tests of shared/methods/others.md §5(g) 1-5 with
exact-match / token-Jaccard similarities and hand-made strings, the scorer's neighbour exclusion (§5(h)2), the
selectors, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gloo_group, spawn_ranks

from lit_align.errors import ConfigError, DataError
from lit_align.metrics import (
    FEWL,
    FEWLItem,
    FEWLScorer,
    fewl_expertise,
    fewl_scores,
    fewl_terms,
    select_by_fewl,
    select_demonstrations,
)
from lit_align.retrieval import CallableSimilarity, ExactMatch, HashEncoder, Retriever, TokenJaccard

EXPERT = "Ada was born in Paris."
NOVICE = "Ada was born in Rome."


def _item(question: str, answer: str, references: list[str], wrong: list[str], corrected: list[str]) -> FEWLItem:
    return FEWLItem(question=question, answer=answer, references=references, wrong=wrong, corrected=corrected)


def _pool(answer: str = EXPERT) -> list[FEWLItem]:
    """Question 0: reference 0 says the corrected answer, reference 1 the wrong one. Two neighbour questions whose
    reference answers share no sentence with question 0's."""
    return [
        _item("Where was Ada born?", answer, [EXPERT, NOVICE], [NOVICE], [EXPERT]),
        _item("What does Ada eat for breakfast?", "Bread.", ["Ada eats bread.", "Ada eats rice."],
              ["Ada eats rice."], ["Ada eats bread."]),
        _item("Which pet does Ada keep?", "A cat.", ["Ada keeps a cat.", "Ada keeps a dog."],
              ["Ada keeps a dog."], ["Ada keeps a cat."]),
    ]


def _scorer(similarity=None, k: int = 1, near_duplicate: float = 0.95) -> FEWLScorer:
    return FEWLScorer(similarity or ExactMatch(), Retriever(HashEncoder(dim=512), near_duplicate=near_duplicate), k=k)


# -- §5(g)1 expertise ----------------------------------------------------------------------------------------------
def test_expertise_prefers_the_reference_that_agrees_with_corrections():
    """Exact match: reference 0 equals CO and differs from IW, reference 1 the reverse. Contrast form:
    e = (1 - 0, 0 - 1) = (1, -1), lambda_0 = e / (e + e^-1) = 1 / (1 + e^-2); disagreement form: e = (1, 0),
    lambda_0 = e / (e + 1). Both rows sum to 1."""
    items = _pool()
    contrast = _scorer().score(items).lam
    disagreement = _scorer().score(items, form="disagreement").lam
    assert contrast[0, 0].item() == pytest.approx(1 / (1 + math.exp(-2)))
    assert disagreement[0, 0].item() == pytest.approx(math.e / (math.e + 1))
    for lam in (contrast, disagreement):
        assert (lam[:, 0] > lam[:, 1]).all()
        assert torch.allclose(lam.sum(-1), torch.ones(3, dtype=torch.float64))


def test_expertise_temperature_and_uniform_weights():
    """lambda = softmax(e / tau): e = (1, -1) and tau = 2 give 1 / (1 + e^-1); uniform weights give 1/N."""
    co, iw = torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[0.0], [1.0]]])  # (1, 2, 1)
    assert fewl_expertise(co, iw, temperature=2.0)[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)))
    assert fewl_expertise(co, iw, weights="uniform").tolist() == [[0.5, 0.5]]


class _UndevicedFactoriesOnMeta(torch.overrides.TorchFunctionMode):
    """Tensor factories called without ``device=`` build on "meta": a CPU stand-in for "another default device"."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.full, torch.zeros, torch.ones, torch.empty, torch.tensor) and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def test_uniform_weights_stay_on_the_inputs_device():
    """The uniform lambda is built on the similarities' device (a CPU lambda broke the uniform ablation on CUDA
    inputs: ``lam * joint`` mixed devices)."""
    co = torch.rand(2, 3, 1)
    with _UndevicedFactoriesOnMeta():
        lam = fewl_expertise(co, co, weights="uniform")
    assert lam.device == co.device and lam.tolist() == [[1 / 3] * 3] * 2


# -- §5(g)2 truthfulness --------------------------------------------------------------------------------------------
def test_agreeing_with_the_high_lambda_reference_scores_higher():
    """K = 1 and no neighbour answer matches, so P = 0 and FEWL = T = the lambda of the matched reference:
    1 / (1 + e^-2) for the expert's answer, 1 / (1 + e^2) for the other."""
    good = _scorer().score(_pool(EXPERT)).score[0].item()
    bad = _scorer().score(_pool(NOVICE)).score[0].item()
    assert good == pytest.approx(1 / (1 + math.exp(-2)))
    assert bad == pytest.approx(1 / (1 + math.exp(2)))


# -- §5(g)3 laziness ------------------------------------------------------------------------------------------------
def test_generic_answer_is_penalised_against_an_equally_truthful_specific_one():
    """Question 0's references are a generic "Nobody knows." and the specific "Paris." with equal expertise (the IW /
    CO answers match neither: lambda = 1/2 each), so both answers have T = 1/2. Every neighbour's references are
    "Nobody knows.": the generic answer gets P = 1, the specific one P = 0. FEWL: -1/2 vs 1/2; without the penalty
    they tie."""
    generic = ["Nobody knows.", "Nobody knows."]
    pool = [_item("Where was Ada born?", "Nobody knows.", ["Nobody knows.", "Paris."], ["Rome."], ["Not Rome."]),
            _item("Where was Bo born?", "x", generic, ["Oslo."], ["Not Oslo."]),
            _item("Where was Cy born?", "x", generic, ["Lima."], ["Not Lima."])]
    specific = [_item(pool[0].question, "Paris.", pool[0].references, pool[0].wrong, pool[0].corrected)]
    scorer = _scorer(k=2)
    lazy, fair = scorer.score(pool[:1], pool=pool), scorer.score(specific, pool=pool)
    assert lazy.truthfulness.item() == pytest.approx(0.5) and fair.truthfulness.item() == pytest.approx(0.5)
    assert lazy.score.item() == pytest.approx(-0.5) and fair.score.item() == pytest.approx(0.5)
    assert scorer.score(pool[:1], pool=pool, laziness=False).score.item() == pytest.approx(0.5)


def test_tv_form_by_hand_and_the_reconstructed_kl_js_forms():
    """lam = (0.75, 0.25), truth = (0.8, 0.4), lazy means = (0.2, 0.6): TV = 0.7 - 0.3 = 0.4. KL: truth term as TV,
    penalty sum lam mean exp(s - 1). JS: sum lam (log 2 - softplus(-s)) - sum lam mean (softplus(s') - log 2)."""
    lam = torch.tensor([[0.75, 0.25]])
    truth, lazy = torch.tensor([[0.8, 0.4]]), torch.tensor([[[0.0, 0.4], [0.6, 0.6]]])
    assert fewl_scores(truth, lazy, lam).item() == pytest.approx(0.4)
    kl = 0.7 - (0.75 * (math.exp(-1) + math.exp(-0.6)) / 2 + 0.25 * math.exp(-0.4))
    assert fewl_scores(truth, lazy, lam, divergence="kl").item() == pytest.approx(kl)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    js = (0.75 * (math.log(2) - sp(-0.8)) + 0.25 * (math.log(2) - sp(-0.4))
          - 0.75 * ((sp(0.0) + sp(0.4)) / 2 - math.log(2)) - 0.25 * (sp(0.6) - math.log(2)))
    assert fewl_scores(truth, lazy, lam, divergence="js").item() == pytest.approx(js)
    with pytest.raises(ConfigError, match="divergence"):
        fewl_scores(truth, lazy, lam, divergence="chi2")


# -- §5(g)4 invariance ----------------------------------------------------------------------------------------------
def test_permuting_the_references_leaves_fewl_unchanged():
    items = _pool("Ada was born in Paris, France.")
    flipped = [_item(it.question, it.answer, it.references[::-1], it.wrong, it.corrected) for it in items]
    scorer = _scorer(TokenJaccard(), k=2)
    assert torch.allclose(scorer.score(items).score, scorer.score(flipped).score)
    g = torch.Generator().manual_seed(0)
    truth, lazy, co, iw = (torch.rand(s, generator=g) for s in [(4, 3), (4, 3, 5), (4, 3, 2), (4, 3, 2)])
    perm = torch.tensor([2, 0, 1])
    a = fewl_terms(truth, lazy, co, iw).score
    b = fewl_terms(truth[:, perm], lazy[:, perm], co[:, perm], iw[:, perm]).score
    assert torch.allclose(a, b)


def test_one_reference_gets_all_the_weight():
    items = [_item(it.question, it.answer, it.references[:1], it.wrong, it.corrected) for it in _pool(NOVICE)]
    for form in ("contrast", "disagreement"):
        assert _scorer(TokenJaccard()).score(items, form=form).lam.tolist() == [[1.0]] * 3


# -- §5(g)5 torchmetrics ---------------------------------------------------------------------------------------------
def _random_batch(b: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s, generator=g) for s in [(b, 3), (b, 3, 4), (b, 3, 2), (b, 3, 2)]]


def test_metric_over_batches_equals_the_batch_free_computation():
    sims = _random_batch()
    expected = fewl_terms(*sims, form="disagreement", temperature=0.5)
    metric = FEWL(form="disagreement", temperature=0.5)
    for chunk in (slice(0, 3), slice(3, 6), slice(6, 10)):
        metric.update(*(s[chunk] for s in sims))
    assert metric.compute().item() == pytest.approx(expected.score.mean().item(), abs=1e-12)
    per = metric.per_question()
    assert torch.allclose(per["score"], expected.score) and torch.allclose(per["laziness"], expected.laziness)


def test_model_level_mean_is_order_invariant():
    """Sorted summation: the same questions in any order and batching give the bit-identical mean."""
    sims = _random_batch(b=17, seed=1)
    forward, backward = FEWL(), FEWL()
    forward.update(*sims)
    reverse = torch.arange(16, -1, -1)
    for chunk in (reverse[:5], reverse[5:]):
        backward.update(*(s[chunk] for s in sims))
    assert torch.equal(forward.compute(), backward.compute())


# -- the scorer's neighbours ----------------------------------------------------------------------------------------
def test_neighbours_never_include_the_question_itself_or_a_near_duplicate():
    """The pool holds question 0 twice and a near-duplicate of it (same words, other case and punctuation): with a
    near-duplicate threshold none of them is a neighbour of question 0, even with k = all the other questions."""
    pool = _pool()
    pool += [pool[0], _item("where was ADA born ?", "x", ["a", "b"], ["c"], ["d"])]
    scorer = _scorer(k=2, near_duplicate=0.95)
    sims = scorer.similarities(pool[:1], pool=pool)
    assert sorted(sims.neighbours[0]) == [1, 2]  # positions in the de-duplicated pool: 0, 1, 2, near-duplicate 3
    with pytest.raises(ConfigError, match="k = 3"):
        _scorer(k=3, near_duplicate=0.95).similarities(pool[:1], pool=pool)


def _subset_sim() -> CallableSimilarity:
    """Asymmetric: 1 when the hypothesis' words are a subset of the premise's."""
    return CallableSimilarity(lambda ps, hs: [float(set(h.split()) <= set(p.split())) for p, h in zip(ps, hs)])


def test_a_retriever_without_near_duplicate_threshold_is_refused():
    """The default Retriever has no threshold: a case / white-space variant of the question would be its neighbour
    and cancel T against P (FEWL = 0, §5(h)2), so the scorer refuses it, naming the key."""
    with pytest.raises(ConfigError, match="retriever.near_duplicate"):
        FEWLScorer(ExactMatch(), Retriever(HashEncoder()), k=1)


def test_a_same_words_variant_of_the_question_is_never_its_neighbour():
    """Self-exclusion compares words, whatever the threshold: with near_duplicate = 1 (only exact cosine copies) the
    variant "where was Ada born ? " is still excluded, and k = 2 asks for more questions than are left."""
    variant = _item("where was Ada  born ? ", EXPERT, [EXPERT, EXPERT], [NOVICE], [EXPERT])
    pool = _pool() + [variant]
    sims = _scorer(k=2, near_duplicate=1.0).similarities(pool[:1], pool=pool)
    assert sorted(sims.neighbours[0]) == [1, 2]
    with pytest.raises(ConfigError, match="k = 3.*only 2 other"):
        _scorer(k=3, near_duplicate=1.0).similarities(pool[:1], pool=pool)


def test_similarity_argument_order_is_fixed():
    """An asymmetric SIM (1 when the hypothesis' words are a subset of the premise's): the evaluated answer is the
    hypothesis against each reference, so a short answer contained in the reference gets T = 1."""
    items = _pool("Ada was born")
    assert _scorer(_subset_sim()).score(items, weights="uniform").truthfulness[0].item() == pytest.approx(1.0)


def test_expertise_and_laziness_argument_orders_are_fixed():
    """Premise = the evidence, hypothesis = the answer checked, for the expertise and laziness pairs too. Question 0:
    reference 0 "Paris" is contained in CO "born in Paris" (not the reverse), reference 1 "Rome" in nothing:
    co = (1, 0), iw = (0, 0), e = (1, 0), lambda_0 = e / (e + 1) (swapped pairs: all 0, lambda = 1/2). The answer
    "Paris" matches reference 0 (T = lambda_0) and is contained in the neighbour's reference 0 "Bo lived in Paris"
    (not the reverse): P = lambda_0 (swapped pairs: P = 0)."""
    pool = [_item("Where was Ada born?", "Paris", ["Paris", "Rome"], ["born in Lyon"], ["born in Paris"]),
            _item("Where was Bo born?", "Oslo", ["Bo lived in Paris", "Bo lived in Oslo"], ["x"], ["y"]),
            _item("What does Cy eat?", "rice", ["Cy eats rice", "Cy eats bread"], ["x"], ["y"])]
    scorer = _scorer(_subset_sim())
    assert scorer.similarities(pool[:1], pool=pool).neighbours == [[1]]
    terms = scorer.score(pool[:1], pool=pool)
    lam0 = math.e / (math.e + 1)
    assert terms.lam[0].tolist() == pytest.approx([lam0, 1 - lam0])
    assert terms.truthfulness.item() == pytest.approx(lam0)
    assert terms.laziness.item() == pytest.approx(lam0)


def test_scoring_another_answer_reuses_the_expertise_pairs():
    """Scoring a second answer to the same questions computes only its own truth and laziness pairs (N + N K = 4
    per item), not the expertise pairs again; with remember=False every call computes everything again."""
    seen: list[int] = []

    def counting(ps, hs):
        seen.append(len(ps))
        return [float(p == h) for p, h in zip(ps, hs)]

    scorer = _scorer(CallableSimilarity(counting))
    first = scorer.score(_pool(EXPERT)).score
    calls = sum(seen)
    second = scorer.score(_pool("Ada was born in Lyon.")).score
    assert sum(seen) - calls == 4  # only question 0's answer changed: its 2 truth + 2 x 1 laziness pairs
    assert not torch.equal(first, second)
    fresh = FEWLScorer(CallableSimilarity(counting), Retriever(HashEncoder(dim=512), near_duplicate=0.95), k=1,
                       remember=False)
    before = sum(seen)
    fresh.score(_pool(EXPERT))
    once = sum(seen) - before
    fresh.score(_pool(EXPERT))
    assert sum(seen) - before == 2 * once >= 2 * calls


# -- selectors --------------------------------------------------------------------------------------------------------
def test_select_by_fewl_and_demonstrations_are_deterministic():
    assert select_by_fewl([[0.1, 0.5, 0.5], [0.9], torch.tensor([-1.0, -0.5])]) == [1, 0, 1]
    items = ["a", "b", "c", "d"]
    assert select_demonstrations(items, [0.2, 0.7, 0.2, 0.7], k=3) == ["b", "d", "a"]
    with pytest.raises(ConfigError, match="k = 5"):
        select_demonstrations(items, [0.0] * 4, k=5)


# -- bad input ---------------------------------------------------------------------------------------------------------
def test_similarity_outside_unit_interval_is_refused_naming_the_key():
    too_big = CallableSimilarity(lambda ps, hs: [1.3] * len(ps))
    with pytest.raises(ValueError, match="similarity"):
        _scorer(too_big).score(_pool())

    def plain(ps, hs):  # not a Similarity subclass: the scorer's own check names the key
        return torch.full((len(ps),), -0.2)

    with pytest.raises(ConfigError, match="similarity.*\\[0, 1\\]"):
        _scorer(plain).score(_pool())
    with pytest.raises(ValueError, match="truth_sim"):
        fewl_scores(torch.tensor([[1.5]]), torch.zeros(1, 1, 1), torch.ones(1, 1))


def test_k_larger_than_the_pool_names_k():
    with pytest.raises(ConfigError, match="k = 3.*lower `k`"):
        _scorer(k=3).score(_pool())


def test_bad_records_name_the_record_and_field():
    pool = _pool()
    with pytest.raises(DataError, match="record 1.*`references` is empty"):
        _scorer().score([pool[0], _item("Q?", "a", [], ["w"], ["c"]), pool[2]])
    with pytest.raises(DataError, match="record 2.*R = 2"):
        _scorer().score([pool[0], pool[1], _item("Q?", "a", ["r", "s"], ["w", "v"], ["c", "d"])])
    with pytest.raises(DataError, match="record 0.*same length"):
        _scorer().score([_item("Q?", "a", ["r"], ["w", "v"], ["c"])] + pool[1:])


# -- two processes ----------------------------------------------------------------------------------------------------
def _fewl_worker(rank: int, world: int, init: str, queue) -> None:
    """Rank 0 scores every question, rank 1 none (an uneven last shard): both must compute the same mean."""
    with gloo_group(rank, world, init):
        try:
            metric = FEWL()
            if rank == 0:
                metric.update(*_random_batch(b=6, seed=3))
            queue.put((rank, (metric.compute().item(), metric.per_question()["score"].tolist())))
        except Exception as err:  # report instead of leaving the parent waiting
            queue.put((rank, repr(err)))


def test_metric_syncs_across_two_processes_when_one_has_no_update(tmp_path):
    """The float64 states of a rank that never updated are synced as float64 too (a float32 empty state made gloo
    abort with "Received data size doesn't match expected size")."""
    results = spawn_ranks(_fewl_worker, tmp_path)
    expected = fewl_terms(*_random_batch(b=6, seed=3)).score
    for rank in (0, 1):
        mean, scores = results[rank]
        assert mean == pytest.approx(expected.mean().item(), abs=1e-12)
        assert scores == pytest.approx(expected.tolist(), abs=1e-12)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_compute_before_update_says_so():
    with pytest.raises(ValueError, match="before any update"):
        FEWL().compute()
