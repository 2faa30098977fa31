"""ParameterMask: exact global top-k selection, deterministic ties, bit-packed save/load, wrong-model errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_lm

from lit_align.unlearning import ParameterMask, attribution_scores, model_signature
from lit_align.unlearning.masks import _pack, _unpack


def _reference_mask(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """The plain way: concatenate, stable sort descending, keep the first int(N * ratio)."""
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = torch.sort(-flat, stable=True).indices[: int(flat.numel() * ratio)]
    sel = torch.zeros(flat.numel(), dtype=torch.bool)
    sel[keep] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = sel[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.37, 0.5, 0.95, 1.0])
def test_exactly_int_n_ratio_ones_global_and_equal_to_a_full_sort(ratio):
    model = tiny_lm(vocab_size=60, hidden_size=32)
    scores = attribution_scores(model, method="magnitude")
    mask = ParameterMask.select_top(scores, ratio)
    assert mask.num_selected() == int(mask.numel * ratio)
    assert mask.density() == pytest.approx(int(mask.numel * ratio) / mask.numel)
    ref = _reference_mask(scores, ratio)
    assert all(torch.equal(mask[n], ref[n]) for n in ref)


def test_the_top_weight_is_in_and_embeddings_norms_and_head_are_covered():
    model = tiny_lm(vocab_size=60, hidden_size=32)
    scores = attribution_scores(model, method="random", seed=1)
    names = list(scores)
    assert any("embed_tokens" in n for n in names) and any("norm" in n for n in names) and "lm_head.weight" in names
    top = max(names, key=lambda n: float(scores[n].max()))
    scores[top].view(-1)[5] = 10.0  # the single largest score
    mask = ParameterMask.select_top(scores, 0.001)
    assert bool(mask[top].view(-1)[5])
    assert set(mask) == set(names)  # every parameter has a mask: embeddings, norms, head


def test_ranking_is_global_not_per_layer():
    """All of the top scores live in one tensor: a global ranking gives that tensor every one,
    a per-layer top-k would give each tensor its share."""
    scores = {"a": torch.full((10,), 5.0), "b": torch.rand(30), "c": torch.rand(60)}
    mask = ParameterMask.select_top(scores, 0.1)
    assert int(mask["a"].sum()) == 10 and int(mask["b"].sum()) == 0 and int(mask["c"].sum()) == 0


def test_ties_are_broken_by_parameter_order_then_flat_index():
    scores = {"x": torch.tensor([1.0, 2.0, 2.0, 0.0]), "y": torch.tensor([[2.0, 2.0], [3.0, 0.0]])}
    mask = ParameterMask.select_top(scores, 0.5)  # 4 of 8: the 3, then the first three 2s in order
    assert mask["x"].tolist() == [False, True, True, False]
    assert mask["y"].tolist() == [[True, False], [True, False]]
    zeros = ParameterMask.select_top({"z": torch.zeros(7), "w": -torch.zeros(3)}, 0.6)  # -0.0 ties with 0.0
    assert zeros["z"].tolist() == [True] * 6 + [False] and not zeros["w"].any()


def test_bad_scores_and_ratios_are_refused():
    with pytest.raises(ValueError, match="ratio must be in"):
        ParameterMask.select_top({"a": torch.rand(4)}, 1.5)
    with pytest.raises(ValueError, match="NaN or negative"):
        ParameterMask.select_top({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="NaN or negative"):
        ParameterMask.select_top({"a": torch.tensor([1.0, -1.0])}, 0.5)


def test_bit_packing_roundtrip():
    for n in (1, 7, 8, 9, 100):
        m = torch.rand(n) > 0.5
        packed = _pack(m)
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
        assert torch.equal(_unpack(packed, (n,)), m)
    import numpy as np

    m = torch.rand(21) > 0.3
    assert np.array_equal(_pack(m).numpy(), np.packbits(m.numpy()))  # the numpy bit order


def test_save_load_roundtrip_is_bit_packed(tmp_path):
    model = tiny_lm(vocab_size=200, hidden_size=64)
    mask = ParameterMask.select_top(attribution_scores(model, method="random"), 0.8, method="random",
                                    signature=model_signature(model))
    path = tmp_path / "mask.pt"
    mask.save(path)
    assert path.stat().st_size < mask.numel / 4  # a bool tensor would take numel bytes; bits take numel / 8
    loaded = ParameterMask.load(path, model)
    assert list(loaded) == list(mask) and all(torch.equal(loaded[n], mask[n]) for n in mask)
    assert loaded.ratio == 0.8 and loaded.method == "random"
    assert loaded.signature["architecture"] == "Qwen2Config/Qwen2ForCausalLM"


def test_a_mask_of_another_model_is_refused_naming_file_and_parameter(tmp_path):
    model = tiny_lm(vocab_size=60, hidden_size=32)
    path = tmp_path / "mask.pt"
    ParameterMask.select_top(attribution_scores(model, method="magnitude"), 0.5,
                             signature=model_signature(model)).save(path)
    wider = tiny_lm(vocab_size=64, hidden_size=32)
    with pytest.raises(ValueError, match=r"mask\.pt belongs to another model.*'model\.embed_tokens\.weight' has shape \(60, 32\)"):
        ParameterMask.load(path, wider)
    other = tiny_lm("llama", vocab_size=60, hidden_size=32)  # same weight shapes, but no q/k/v biases
    with pytest.raises(ValueError, match="belongs to another model"):
        ParameterMask.load(path, other)
    bad = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="other.pt is not a lit_align weight mask"):
        ParameterMask.load(bad, model)
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        ParameterMask.load(tmp_path / "missing.pt", model)


def test_mask_gradients_multiplies_in_place():
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    mask = ParameterMask({"weight": torch.tensor([[True, False, True], [False, False, True]]),
                          "bias": torch.tensor([False, True])})
    mask.mask_gradients_(model)
    assert model.weight.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert model.bias.grad.tolist() == [0.0, 1.0]
