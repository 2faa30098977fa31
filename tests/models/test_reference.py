"""Reference policies: adapter-disabled == base, frozen copies stay put, precomputed tables are cached and keyed."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.cli import cli_main
from lit_align.data.batches import SequenceBatch
from lit_align.methods import DPOModule
from lit_align.models import (
    LoRASpec,
    ModelSpec,
    ReferencePolicy,
    TinyArch,
    apply_lora,
    build_causal_lm,
    build_tokenizer,
    frozen_copy,
    model_fingerprint,
)
from lit_align.models.reference import atomic_save
from lit_align.rollout.logps import sequence_logps, token_logps

SPEC = ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64))


def _base(spec: ModelSpec = SPEC) -> torch.nn.Module:
    return build_causal_lm(spec, build_tokenizer(spec))


def _batch(vocab: int) -> SequenceBatch:
    """Two right-padded rows: (prompt, response) lengths (4, 5) and (3, 2)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (2, 9), generator=g)  # (B, T)
    attn = torch.tensor([[1] * 9, [1] * 5 + [0] * 4])
    loss = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 2 + [0] * 4])
    return SequenceBatch(input_ids=ids, attention_mask=attn, loss_mask=loss, index=torch.arange(2))


def _logps(model, batch: SequenceBatch) -> torch.Tensor:
    with torch.no_grad():
        return token_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask).logps


# -- adapter / copy ------------------------------------------------------------------------------


def test_adapter_reference_equals_the_base_model():
    """LoRA B starts at zero, so adapters are perturbed first: enabled they change the log-probs,
    disabled they give the base model's log-probs bit for bit."""
    base = _base().eval()
    start = frozen_copy(base)
    ref = ReferencePolicy("adapter")
    ref.attach(base, lora_enabled=True)
    assert ref.copy is None, "adapter mode must not hold a second copy of the weights"
    policy = apply_lora(base, LoRASpec(r=4)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    batch = _batch(base.config.vocab_size)

    expected = _logps(start, batch)
    torch.testing.assert_close(ref.token_logps(policy, batch).logps, expected, rtol=0, atol=0)
    assert not torch.allclose(_logps(policy, batch), expected, atol=1e-4), "perturbed adapters had no effect"


def test_adapter_reference_without_lora_names_the_key():
    with pytest.raises(ValueError, match="model.lora"):
        ReferencePolicy("adapter").attach(_base(), lora_enabled=False)
    module = DPOModule(SPEC, reference="adapter")
    with pytest.raises(ValueError, match="model.lora"):
        module.configure_model()
    with pytest.raises(ValueError, match="precomputed"):
        ReferencePolicy("frozen")


def test_copy_reference_is_frozen_and_survives_a_policy_step():
    module = DPOModule(SPEC, reference="copy")
    module.configure_model()
    ref, policy = module.reference, module.policy
    assert ref.copy is not None and ref.copy is not policy
    assert any(m is ref.copy for m in module.modules()), "the copy must move with the module"
    assert not ref.copy.training and all(not p.requires_grad for p in ref.copy.parameters())
    optimizer = module.configure_optimizers()
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in policy.parameters()}

    batch = _batch(policy.config.vocab_size)
    before_ref = {k: v.clone() for k, v in ref.copy.state_dict().items()}
    before_policy = {k: v.clone() for k, v in policy.state_dict().items()}
    before_logps = ref.token_logps(policy, batch).logps
    torch.testing.assert_close(before_logps, _logps(policy.eval(), batch), rtol=0, atol=0)

    policy.train()
    loss = -sequence_logps(policy, batch.input_ids, batch.attention_mask, batch.loss_mask).mean()
    loss.backward()
    assert all(p.grad is None for p in ref.copy.parameters())
    optimizer.step()

    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in before_policy.items()), "policy did not move"
    for k, v in ref.copy.state_dict().items():
        assert torch.equal(v, before_ref[k]), k
    torch.testing.assert_close(ref.token_logps(policy, batch).logps, before_logps, rtol=0, atol=0)


# -- fingerprint and atomic save -----------------------------------------------------------------


def test_model_fingerprint_tracks_every_weight():
    model = _base()
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model) == model_fingerprint(_base()), "not stable"
    assert fp != model_fingerprint(_base(ModelSpec(tiny=SPEC.tiny, seed=1)))
    assert fp != model_fingerprint(_base(ModelSpec(tiny=SPEC.tiny, dtype="bfloat16")))
    w = model.model.layers[1].mlp.up_proj.weight.view(-1)
    with torch.no_grad():
        a, b = w[0].item(), w[1].item()
        w[3] = torch.nextafter(w[3], torch.tensor(1.0))  # one element, one ulp
        assert model_fingerprint(model) != fp
        w[3] = torch.nextafter(w[3], torch.tensor(-1.0))
        assert model_fingerprint(model) == fp
        w[0], w[1] = b, a  # same sum and sum of squares, different weights
        assert model_fingerprint(model) != fp


def test_atomic_save_leaves_no_temp_files_and_never_a_torn_target(tmp_path):
    target = tmp_path / "sub" / "tables.pt"
    atomic_save({"x": torch.arange(3)}, target)
    assert [p.name for p in target.parent.iterdir()] == ["tables.pt"]
    before = target.read_bytes()

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save({"x": torch.arange(5), "f": lambda: 0}, target)  # fails half way through pickling
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["tables.pt"]
    assert torch.equal(torch.load(target)["x"], torch.arange(3))


# -- precomputed through the real CLI -----------------------------------------------------------


def _fit(root, cache, steps: int, *extra: str):
    return cli_main([
        "fit", "--config", str(REPO / "configs/dpo/tiny.yaml"), "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
        *CSV_LOGGER, "--trainer.logger.save_dir", str(root),
        "--model.init_args.reference_cache_dir", str(cache), *extra,
    ])


def _start_tables(cli) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Summed log-probs and token counts of chosen (column 0) and rejected (column 1) under a
    freshly built copy of the starting model, example by example."""
    start = build_causal_lm(cli.model.spec, cli.model.tokenizer).eval()
    out = {}
    for split, loader in cli.datamodule.split_loaders().items():
        n = len(loader.dataset)
        sums, counts = torch.full((n, 2), float("nan")), torch.full((n, 2), float("nan"))
        for batch in loader:
            for col, seq in enumerate((batch.chosen, batch.rejected)):
                with torch.no_grad():
                    lp = token_logps(start, seq.input_ids, seq.attention_mask, seq.loss_mask)
                sums[batch.index, col] = lp.sum()
                counts[batch.index, col] = lp.mask.sum(-1)
        out[split] = (sums, counts)
    return out


def test_precomputed_reference_is_cached_keyed_and_checkpointed(tmp_path, caplog):
    cache = tmp_path / "cache"
    tables_dir = cache / "reference_logps"
    first = _fit(tmp_path / "a", cache, 2)
    files = sorted(tables_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt" and len(files[0].stem) == 32, files
    cached, mtime = files[0], files[0].stat().st_mtime_ns
    tables = first.model.reference.tables
    assert set(tables) == {"train", "val"}

    # the tables are the starting model's log-probs, whatever the training did afterwards
    expected = _start_tables(first)
    for split, (sums, counts) in tables.items():
        torch.testing.assert_close(counts, expected[split][1], rtol=0, atol=0)
        torch.testing.assert_close(sums, expected[split][0], rtol=1e-5, atol=1e-4)
    on_disk = torch.load(cached, weights_only=True)
    for split in tables:
        assert torch.equal(on_disk[split][0], tables[split][0])

    ckpt = torch.load(next((tmp_path / "a").rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["reference"]["mode"] == "precomputed"
    for split in tables:
        assert torch.equal(ckpt["reference"]["tables"][split][0], tables[split][0])
        assert torch.equal(ckpt["reference"]["tables"][split][1], tables[split][1])

    # an identical run loads the cache instead of recomputing it
    with caplog.at_level(logging.INFO, logger="lit_align.models.reference"):
        second = _fit(tmp_path / "b", cache, 1)
    assert f"reference log-probs loaded from {cached}" in caplog.text
    assert sorted(tables_dir.iterdir()) == [cached] and cached.stat().st_mtime_ns == mtime
    for split in tables:
        assert torch.equal(second.model.reference.tables[split][0], tables[split][0])

    # different data or different starting weights: a different key, a new file
    _fit(tmp_path / "c", cache, 1, "--data.init_args.max_length", "64")
    assert len(list(tables_dir.iterdir())) == 2
    _fit(tmp_path / "d", cache, 1, "--model.init_args.model.seed", "1")
    assert len(list(tables_dir.iterdir())) == 3
    assert not [p for p in tables_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_resuming_with_other_data_refuses_the_checkpoints_reference_tables(tmp_path):
    """Tables travel in the checkpoint; resuming them against re-tokenized data would silently pair
    examples with another sequence's reference log-probs, so it is refused with a clear error."""
    cache = tmp_path / "cache"
    _fit(tmp_path / "a", cache, 2)
    ckpt = next((tmp_path / "a").rglob("last.ckpt"))
    with pytest.raises(ValueError, match="another model, dataset or precision"):
        _fit(tmp_path / "b", cache, 4, "--ckpt_path", str(ckpt), "--data.init_args.max_length", "20")
