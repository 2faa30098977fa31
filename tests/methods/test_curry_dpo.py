"""Curry-DPO on the real ranked DataModule (others.md §9(g) 2-4): per-stage reference checksums, log 2 at every
stage start, level-k rows only in stage k (iterative), one monotone stage (non-iterative), reference margins."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lit_align.data import DataSource, RankedPreferenceDataModule
from lit_align.errors import ConfigError
from lit_align.losses import DPOLoss
from lit_align.methods import CurryDPOModule
from lit_align.models import ModelSpec, TinyArch
from lit_align.models.reference import model_fingerprint
from lit_align.rollout.logps import token_logps

SPEC = ModelSpec(tiny=TinyArch(family="qwen2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                               intermediate_size=64))


class Watch(L.Callback):
    """Per step: stage, loss, reference fingerprint and the pair-table rows of the batch; the policy at stage ends."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.stage_ends: list[str] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        rows = trainer.train_dataloader.dataset.rows
        ref = module.reference.copy
        self.steps.append({"stage": module.stage, "batch": batch_idx, "loss": float(outputs["loss"]),
                           "ref": model_fingerprint(ref) if ref is not None else module.reference_fingerprint,
                           "rows": [rows[i] for i in batch.index.tolist()]})

    def on_train_epoch_end(self, trainer, module) -> None:
        self.stage_ends.append(model_fingerprint(module.policy))


def _module(tmp_path, reference: str = "copy", **kwargs) -> CurryDPOModule:
    module = CurryDPOModule(model=SPEC, loss=DPOLoss(beta=0.1), reference=reference, kl_every_n_steps=0,
                            reference_cache_dir=str(tmp_path / "cache"),
                            optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0), **kwargs)
    module.hparams.clear()  # built in Python, not by the CLI
    return module


def _fit(tmp_path, module, **data_args) -> tuple[Watch, RankedPreferenceDataModule]:
    L.seed_everything(0)
    watch = Watch()
    # 40 prompts, 4 rated responses each: 120 best-vs-k-th pairs, three stages of 40, batches of 16: 3 steps each
    data = RankedPreferenceDataModule(DataSource("builtin:ranked_preferences", limit=40), val_fraction=0.0,
                                      batch_size=16, max_length=40, **data_args)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), callbacks=[watch],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    return watch, data


def test_iterative_stages_reference_the_previous_stage_and_serve_one_level(tmp_path):
    module = _module(tmp_path)
    module.configure_model()
    sft = model_fingerprint(module.policy)
    watch, data = _fit(tmp_path, module)
    assert [s["stage"] for s in watch.steps] == [0] * 3 + [1] * 3 + [2] * 3
    firsts = [s for s in watch.steps if s["batch"] == 0]
    assert firsts[0]["ref"] == sft  # stage 1's reference is the SFT model
    for k in (1, 2):  # stage k's reference has the checksum of the policy at the end of stage k - 1
        assert firsts[k]["ref"] == watch.stage_ends[k - 1] != firsts[k - 1]["ref"]
    assert all(s["ref"] == firsts[s["stage"]]["ref"] for s in watch.steps)  # never updated within a stage
    assert [s["loss"] for s in firsts] == pytest.approx([math.log(2)] * 3, abs=1e-6)  # policy == reference
    levels, gaps = data.pair_levels(), [p.gap for p in data.pair_table]
    for s in watch.steps:  # stage k serves level-k rows only: easy (gap 3), medium (2), hard (1)
        assert {levels[i] for i in s["rows"]} == {s["stage"]} and {gaps[i] for i in s["rows"]} == {3.0 - s["stage"]}
    served = [i for s in watch.steps for i in s["rows"]]
    assert sorted(served) == list(range(data.num_pairs))  # every pair once
    rows = [r for f in tmp_path.rglob("metrics.csv") for r in __import__("csv").DictReader(f.open())]
    logged = {(float(r["train/stage"]), float(r["train/stage_prompts"]), float(r["train/stage_pairs"]))
              for r in rows if r.get("train/stage")}
    assert logged == {(0.0, 40.0, 40.0), (1.0, 40.0, 40.0), (2.0, 40.0, 40.0)}


def test_non_iterative_is_one_monotone_stage_against_sft(tmp_path):
    module = _module(tmp_path)
    module.configure_model()
    sft = model_fingerprint(module.policy)
    watch, data = _fit(tmp_path, module, curriculum="non_iterative", shuffle_within_stage=False)
    assert {s["stage"] for s in watch.steps} == {0} and len(watch.steps) == 8  # 120 pairs, batches of 16
    assert {s["ref"] for s in watch.steps} == {sft}
    levels = data.pair_levels()
    order = [levels[i] for s in watch.steps for i in s["rows"]]
    assert order == sorted(order) and len(order) == 120  # easy, then medium, then hard


def test_reference_margin_order_uses_the_starting_model(tmp_path):
    """The module scores every pair with the starting model before the first stage; stage 0 then holds each
    prompt's pair with the largest margin log pi_ref(chosen) - log pi_ref(rejected)."""
    module = _module(tmp_path / "pre", reference="precomputed")
    module.configure_model()
    start = {k: v.clone() for k, v in module.policy.state_dict().items()}
    watch, data = _fit(tmp_path, module, order="ref_logprob_margin")
    margins = data.state_dict()["reference_margins"]
    assert margins is not None and len(margins) == data.num_pairs
    module.policy.load_state_dict(start)
    module.policy.eval()
    with torch.no_grad():
        batch = next(iter(data.pair_loader()))
        logps = [token_logps(module.policy, s.input_ids, s.attention_mask, s.loss_mask).sum()
                 for s in (batch.chosen, batch.rejected)]
    torch.testing.assert_close(margins[: len(batch)], logps[0] - logps[1], rtol=0, atol=1e-4)
    stage0 = {i for s in watch.steps if s["stage"] == 0 for i in s["rows"]}
    for prompt in {p.prompt for p in data.pair_table}:
        mine = [i for i, p in enumerate(data.pair_table) if p.prompt == prompt]
        assert max(mine, key=lambda i: margins[i]) in stage0
    assert [s["loss"] for s in watch.steps if s["batch"] == 0] == pytest.approx([math.log(2)] * 3, abs=1e-6)


def test_max_epochs_must_match_the_stages(tmp_path):
    module = _module(tmp_path)
    data = RankedPreferenceDataModule(DataSource("builtin:ranked_preferences", limit=8), val_fraction=0.0,
                                      batch_size=8, max_length=32)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        trainer.fit(module, datamodule=data)


def test_resume_mid_stage_is_exact_with_checkpointed_margins(tmp_path):
    """Stopped in stage 2 (after a refresh) and resumed: the same rows and losses as an uninterrupted run; the
    reference margins come from the checkpoint (the trained policy would order the pairs differently)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, stop=-1, ckpt=None):
        L.seed_everything(0)
        watch = Watch()
        saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
        data = RankedPreferenceDataModule(DataSource("builtin:ranked_preferences", limit=40), val_fraction=0.0,
                                          batch_size=16, max_length=40, order="ref_logprob_margin")
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=stop, logger=False, callbacks=[watch, saver],
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=root)
        trainer.fit(_module(root, reference="precomputed"), datamodule=data, ckpt_path=ckpt)
        return watch

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=4)
    resumed = run(tmp_path / "c", ckpt=tmp_path / "b" / "ckpt" / "step=4.ckpt")
    assert [s["stage"] for s in resumed.steps] == [1, 1, 2, 2, 2]
    assert [s["rows"] for s in resumed.steps] == [s["rows"] for s in straight.steps[4:]]
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in straight.steps[4:]], abs=1e-6)


class _SmallFirstStage(RankedPreferenceDataModule):
    """Stage 0 keeps its first batch only (16 pairs): stages of 1, 3 and 3 batches, so the next stage is larger."""

    def stage_size(self, stage: int) -> int:
        return 16 if stage == 0 else super().stage_size(stage)

    def stage_rows(self, stage: int) -> list[int]:
        rows = super().stage_rows(stage)
        return rows[:16] if stage == 0 else rows


def _run_saving_each_step(root, data_cls=RankedPreferenceDataModule, stop=-1, ckpt=None, when=None):
    """A fit that writes a checkpoint at every step's on_train_batch_end (``when``: other ModelCheckpoint
    arguments instead); returns the watch, trainer and module."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    watch = Watch()
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{step}",
                            **(when or {"every_n_train_steps": 1}))
    data = data_cls(DataSource("builtin:ranked_preferences", limit=40), val_fraction=0.0, batch_size=16,
                    max_length=40)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=stop, logger=False, callbacks=[watch, saver],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root)
    module = _module(root)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    return watch, trainer, module


def _same_weights(a: CurryDPOModule, b: CurryDPOModule) -> bool:
    return model_fingerprint(a.policy) == model_fingerprint(b.policy)


def test_resume_at_a_stage_boundary_into_a_larger_stage_trains_all_of_it(tmp_path):
    """A checkpoint written at stage 0's last batch (before the epoch-end hooks), resumed into a stage with more
    batches: Lightning kept "1 of 1 batches done" for the 3-batch stage 1 and trained 2 of its 3 steps."""
    straight, _, a = _run_saving_each_step(tmp_path / "a", _SmallFirstStage)
    assert [s["stage"] for s in straight.steps] == [0, 1, 1, 1, 2, 2, 2]
    _run_saving_each_step(tmp_path / "b", _SmallFirstStage, stop=1)
    resumed, trainer, c = _run_saving_each_step(tmp_path / "c", _SmallFirstStage,
                                                ckpt=tmp_path / "b" / "ckpt" / "step=1.ckpt")
    assert trainer.global_step == 7
    assert [s["rows"] for s in resumed.steps] == [s["rows"] for s in straight.steps[1:]]
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in straight.steps[1:]], abs=1e-6)
    assert _same_weights(a, c)


def test_resume_at_a_stage_boundary_then_again_mid_stage_is_exact(tmp_path):
    """Equal stages (3 batches each): stopped at stage 0's last batch, resumed and stopped again mid stage 1, then
    resumed once more. Lightning started the resumed stage 1 as a "restarted" epoch it never counted started, so
    the second checkpoint read as one after the stage's end and stage 1 ran again from its first batch (11 steps)."""
    straight, _, a = _run_saving_each_step(tmp_path / "a")
    _run_saving_each_step(tmp_path / "b", stop=3)
    first, _, _ = _run_saving_each_step(tmp_path / "c", stop=5, ckpt=tmp_path / "b" / "ckpt" / "step=3.ckpt")
    second, trainer, d = _run_saving_each_step(tmp_path / "d", ckpt=tmp_path / "c" / "ckpt" / "step=5.ckpt")
    assert trainer.global_step == 9
    assert [s["stage"] for s in first.steps + second.steps] == [1, 1, 1, 2, 2, 2]
    assert [s["rows"] for s in first.steps + second.steps] == [s["rows"] for s in straight.steps[3:]]
    losses = [s["loss"] for s in first.steps + second.steps]
    assert losses == pytest.approx([s["loss"] for s in straight.steps[3:]], abs=1e-6)
    assert _same_weights(a, d)


@pytest.mark.parametrize("when, name", [({"save_on_train_epoch_end": True}, "step=4.ckpt"),
                                        ({"every_n_train_steps": 100, "save_last": True}, "last.ckpt")])
def test_resume_from_the_epoch_end_checkpoint_of_a_fit_stopped_mid_stage_finishes_the_stage(tmp_path, when, name):
    """max_steps stops the fit after stage 1's first batch; ModelCheckpoint then saves in the epoch-end hooks
    (save_on_train_epoch_end) or in on_train_end (save_last). Lightning counted that epoch processed, so a resume
    skipped stage 1's other 2 steps."""
    straight, _, a = _run_saving_each_step(tmp_path / "a")
    _run_saving_each_step(tmp_path / "b", stop=4, when=when)
    resumed, trainer, c = _run_saving_each_step(tmp_path / "c", ckpt=tmp_path / "b" / "ckpt" / name, when=when)
    assert trainer.global_step == 9
    assert [s["rows"] for s in resumed.steps] == [s["rows"] for s in straight.steps[4:]]
    assert _same_weights(a, c)
