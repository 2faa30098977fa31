"""The stage driver (Curry-DPO stages, online DPO / SELM iterations): reference refresh, resets, resume."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_align.data import PreferenceDataModule
from lit_align.data.records import DataSource
from lit_align.errors import ConfigError
from lit_align.losses import DPOLoss
from lit_align.methods import CurryDPOModule
from lit_align.methods.staged import load_policy_weights
from lit_align.models import LoRASpec, ModelSpec, TinyArch
from lit_align.models.reference import model_fingerprint
from lit_align.rollout.logps import token_logps

STAGES = 3


#: DPO on the stage driver: Curry-DPO's module (its curriculum comes from the DataModule; StagedPairs has none)
StagedDPO = CurryDPOModule


class StagedPairs(PreferenceDataModule):
    """The built-in preference pairs dealt into ``num_stages`` disjoint slices, slice ``k`` served in epoch ``k``
    (the interface of the ranked DataModule: ``num_stages``, the stage's rows from ``train_dataloader()``)."""

    def __init__(self, num_stages: int = STAGES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_stages = num_stages
        self.stage_datasets: list = []

    def _split(self):
        train, val = super()._split()
        self._train_records = train
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        super().setup(stage)
        chat = self.chat_template if self.chat_template is not None else bool(self.tokenizer.chat_template)
        self.stage_datasets = [self._tokenize(self._train_records[k::self.num_stages], chat)
                               for k in range(self.num_stages)]

    def train_dataloader(self):
        self.train_dataset = self.stage_datasets[self.trainer.current_epoch]
        return super().train_dataloader()


class Record(L.Callback):
    """Per training step: optimiser state before it; stage, loss, learning rate and reference after it (the module's
    own on_train_batch_start may start a stage after this callback's); the policy at each stage end."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.stage_ends: list[str] = []
        self.stage_starts: list[tuple[int, bool]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.steps.append({"batch": batch_idx, "opt_state": sum(len(o.state) for o in trainer.optimizers)})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        ref = module.reference
        self.steps[-1].update(stage=module.stage, loss=float(outputs["loss"]),
                              lr=trainer.optimizers[0].param_groups[0]["lr"],
                              ref=model_fingerprint(ref.copy) if ref.copy is not None else module.reference_fingerprint)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.stage_ends.append(_policy_fingerprint(module))


def _policy_fingerprint(module) -> str:
    """Fingerprint of the policy's effective weights (a LoRA policy merged into a copy of its base)."""
    ref = module.reference.copy
    if ref is None:
        return model_fingerprint(module.policy)
    merged = copy.deepcopy(ref)
    load_policy_weights(merged, module.policy)
    return model_fingerprint(merged)


SPEC = dict(tiny=TinyArch(family="qwen2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                          intermediate_size=64))


def _module(tmp_path, *, reference: str = "copy", lora: bool = False, **stage_args) -> StagedDPO:
    spec = ModelSpec(**SPEC, lora=LoRASpec(r=4, alpha=8) if lora else None)
    module = StagedDPO(model=spec, loss=DPOLoss(beta=0.1), reference=reference, kl_every_n_steps=0,
                       reference_cache_dir=str(tmp_path / "cache"),
                       optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0), **stage_args)
    module.hparams.clear()  # built in Python, not by the CLI: checkpoints load with weights_only=True
    return module


def _fit(tmp_path, module, *, ckpt_path=None, max_steps: int = -1, checkpoints: bool = False,
         num_stages: int = STAGES, callbacks_extra=(), **trainer_args):
    L.seed_everything(0)
    record = Record()
    callbacks = [record, *callbacks_extra]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=checkpoints, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path, **trainer_args)
    # 270 training pairs in three stages of 90, batches of 48: two steps per stage
    data = StagedPairs(num_stages=num_stages, train=DataSource(path="builtin:preferences"), val_fraction=0.1, batch_size=48,
                       max_length=96)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, record


def _stage_firsts(record: Record) -> list[dict]:
    return [s for s in record.steps if s["batch"] == 0]


def test_copy_refresh_references_the_previous_stage(tmp_path):
    module = _module(tmp_path)
    module.configure_model()
    start = model_fingerprint(module.policy)
    trainer, record = _fit(tmp_path, module)
    assert trainer.current_epoch == STAGES  # max_epochs left unset: one epoch per stage
    assert [s["stage"] for s in record.steps] == [0, 0, 1, 1, 2, 2]
    firsts = _stage_firsts(record)
    assert firsts[0]["ref"] == start  # stage 1 (index 0) references the starting model
    for k in (1, 2):  # stage k's reference is the policy at the end of stage k - 1
        assert firsts[k]["ref"] == record.stage_ends[k - 1] != firsts[k - 1]["ref"]
    for s in record.steps:  # never updated within a stage
        assert s["ref"] == firsts[s["stage"]]["ref"]
    for s in firsts:  # policy == reference at every stage start
        assert s["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(s["loss"] != pytest.approx(math.log(2), abs=1e-4) for s in record.steps if s["batch"] == 1)


def test_refresh_never_keeps_the_starting_reference(tmp_path):
    module = _module(tmp_path, refresh="never")
    module.configure_model()
    start = model_fingerprint(module.reference.copy)
    _, record = _fit(tmp_path, module)
    assert {s["ref"] for s in record.steps} == {start}
    assert _stage_firsts(record)[1]["loss"] != pytest.approx(math.log(2), abs=1e-3)


class MergedCheck(L.Callback):
    """At each stage's first batch: log-probs of the reference copy and of the LoRA policy merged (peft's own merge,
    on a deep copy), on the batch's chosen responses."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            merged = copy.deepcopy(module.policy).merge_and_unload().eval()
            seq = batch.chosen
            logps = [token_logps(m, seq.input_ids, seq.attention_mask, seq.loss_mask).sum()
                     for m in (module.reference.copy, merged)]
            self.pairs.append((logps[0], logps[1]))


def test_lora_copy_refresh_equals_the_merged_policy(tmp_path):
    module = _module(tmp_path, lora=True)
    check = MergedCheck()
    _, record = _fit(tmp_path, module, num_stages=2, callbacks_extra=[check])
    assert [s["loss"] for s in _stage_firsts(record)] == pytest.approx([math.log(2)] * 2, abs=1e-6)
    assert len(check.pairs) == 2
    for ref, merged in check.pairs:
        torch.testing.assert_close(ref, merged, rtol=0, atol=1e-5)
    assert (check.pairs[1][0] - check.pairs[0][0]).abs().max() > 1e-3  # the second stage's reference moved
    assert module.policy.peft_config and not any(getattr(m, "merged", False) for m in module.policy.modules())


def test_precomputed_refresh_matches_copy_refresh(tmp_path):
    _, copy_run = _fit(tmp_path / "copy", _module(tmp_path / "copy", reference="copy"))
    module = _module(tmp_path / "pre", reference="precomputed")
    _, pre_run = _fit(tmp_path / "pre", module)
    assert [s["loss"] for s in pre_run.steps] == pytest.approx([s["loss"] for s in copy_run.steps], abs=1e-5)
    firsts = _stage_firsts(pre_run)
    assert [s["ref"] for s in firsts[1:]] == pre_run.stage_ends[:-1]  # the tables' key: the refreshing policy
    assert sorted(module.reference.tables) == ["train@stage2", "val@stage2"]  # finished stages' tables dropped


@pytest.mark.parametrize("reference, stop", [("copy", 1), ("copy", 3), ("precomputed", 3), ("precomputed", 2)],
                         ids=["copy-mid-stage-1", "copy-mid-stage-2", "precomputed-mid-stage-2", "precomputed-stage-end"])
def test_resume_mid_stage_is_exact(reference, stop, tmp_path):
    _, straight = _fit(tmp_path / "a", _module(tmp_path / "a", reference=reference))
    _fit(tmp_path / "b", _module(tmp_path / "b", reference=reference), max_steps=stop, checkpoints=True)
    ckpt = tmp_path / "b" / "ckpt" / f"step={stop}.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved_stage, mid_stage = (stop - 1) // 2, stop % 2 == 1  # two steps per stage
    assert saved["stages"]["stage"] == saved_stage and saved["stages"]["reference_stage"] == saved_stage
    has_copy = any(k.startswith("reference.copy.") for k in saved["state_dict"])
    assert has_copy == (reference == "copy")  # a copy refreshed per stage is saved from stage 0 on (FSDP2 needs it)
    resumed_module = _module(tmp_path / "c", reference=reference)
    starts = []
    resumed_module.on_stage_start = lambda stage: starts.append((stage, resumed_module.stage_resumed))
    _, resumed = _fit(tmp_path / "c", resumed_module, ckpt_path=str(ckpt))
    # a mid-stage resume restores the stage (on_stage_start says so); a resume at a stage's end starts the next
    assert starts == [(k, mid_stage and k == saved_stage) for k in range(stop // 2, STAGES)]
    assert [s["loss"] for s in resumed.steps] == pytest.approx([s["loss"] for s in straight.steps[stop:]], abs=1e-6)
    assert [s["ref"] for s in resumed.steps] == [s["ref"] for s in straight.steps[stop:]]  # no second refresh


@pytest.mark.parametrize("refresh", ["previous_stage", "never"])
def test_a_fresh_module_saves_and_loads_a_refreshed_copy(refresh, tmp_path):
    """Whether checkpoints hold the reference copy is decided from the config, not from the restored stage: under
    FSDP2 the module state is loaded before on_load_checkpoint restores ``reference_stage``, so a module still at
    stage 0 must already keep (and load) the copy, or a resume in stage >= 1 silently references the rebuilt
    starting weights. With ``refresh: never`` the copy is the starting model, rebuilt from the spec, never saved."""
    saved = _module(tmp_path, refresh=refresh)
    saved.configure_model()
    with torch.no_grad():
        for p in saved.reference.copy.parameters():
            p.add_(0.5)  # a refreshed copy: not the starting weights
    state = saved.state_dict()
    copy_keys = {k for k in state if k.startswith("reference.copy.")}
    fresh = _module(tmp_path, refresh=refresh)
    fresh.configure_model()
    assert fresh.reference_stage == 0
    start = model_fingerprint(fresh.reference.copy)
    fresh.load_state_dict(state)
    if refresh == "never":
        assert not copy_keys and model_fingerprint(fresh.reference.copy) == start
    else:
        assert copy_keys == {f"reference.copy.{k}" for k in saved.reference.copy.state_dict()}
        assert model_fingerprint(fresh.reference.copy) == model_fingerprint(saved.reference.copy) != start


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_is_reset_per_stage(reset, tmp_path):
    _, record = _fit(tmp_path, _module(tmp_path, reset_optimizer=reset), num_stages=2)
    assert [(s["stage"], s["batch"]) for s in record.steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [s["opt_state"] > 0 for s in record.steps] == [False, True, True, not reset, True, True]


def test_stage_lrs_restart_a_warmup_cosine_schedule_per_stage(tmp_path):
    lrs = [1e-3, 5e-4, 2e-4]
    _, record = _fit(tmp_path, _module(tmp_path, stage_lrs=lrs, warmup_ratio=0.0))
    # two steps per stage: the peak, then the cosine at half-way (the end of the stage is lr 0)
    expected = [lr * f for lr in lrs for f in (1.0, 0.5)]
    assert [s["lr"] for s in record.steps] == pytest.approx(expected)


@pytest.mark.parametrize("args, trainer_args, match", [
    ({"reference": "adapter", "lora": True}, {}, "model.reference"),
    ({"refresh": "sometimes"}, {}, "model.refresh"),
    ({"stage_lrs": [1e-3]}, {}, "model.stage_lrs has 1"),
    ({"stage_lrs": [1e-3, -1.0, 1e-3]}, {}, "model.stage_lrs must be"),
    ({}, {"max_epochs": 2}, "trainer.max_epochs is 2"),
    ({"reference": "precomputed", "refresh": "never"}, {}, "model.reference: 'precomputed' with refresh: never"),
])
def test_bad_stage_configs_name_their_key(args, trainer_args, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        _fit(tmp_path, _module(tmp_path, **args), **trainer_args)


def test_a_datamodule_without_stages_is_refused(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    data = PreferenceDataModule(train=DataSource(path="builtin:preferences"), batch_size=48)
    with pytest.raises(ConfigError, match="num_stages"):
        trainer.fit(_module(tmp_path), datamodule=data)


def _sharded_refresh_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import os

    from conftest import gloo_group
    from torch.distributed.device_mesh import init_device_mesh

    from lit_align.models.fsdp import fsdp2_parallelize

    with gloo_group(rank, world, init):
        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for name, (policy, target) in _refresh_pairs().items():
            fsdp2_parallelize(policy, mesh)
            fsdp2_parallelize(target, mesh, trainable=False)
            load_policy_weights(target, policy)  # DTensor to DTensor, each rank its shard
            out[name] = {n: p.full_tensor() for n, p in target.named_parameters()}
        if rank == 0:
            torch.save(out, os.path.join(out_dir, "out.pt"))


def _refresh_pairs() -> dict:
    """(policy, frozen target of the base architecture): a LoRA policy with non-zero adapters, and a full one."""
    from conftest import tiny_lm
    from peft import LoraConfig, get_peft_model

    from lit_align.models.causal_lm import frozen_copy

    base = tiny_lm(vocab_size=64, hidden_size=32, seed=0)
    lora_target = frozen_copy(tiny_lm(vocab_size=64, hidden_size=32, seed=1))
    torch.manual_seed(3)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    full_target = frozen_copy(tiny_lm(vocab_size=64, hidden_size=32, seed=2))
    return {"lora": (lora, lora_target), "full": (tiny_lm(vocab_size=64, hidden_size=32, seed=4), full_target)}


@pytest.mark.slow  # two spawned processes: about 7 s
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # raised inside peft
def test_fsdp2_refresh_copies_shard_by_shard(tmp_path):
    """Two FSDP2 ranks (gloo) refresh a sharded copy from a sharded policy: the gathered copy equals peft's own
    merge of the LoRA policy (and the full policy's weights) in one process."""
    import torch.multiprocessing as mp

    mp.start_processes(_sharded_refresh_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2,
                       start_method="spawn")
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    pairs = _refresh_pairs()
    expected = {"lora": copy.deepcopy(pairs["lora"][0]).merge_and_unload(), "full": pairs["full"][0]}
    for name, model in expected.items():
        want = dict(model.named_parameters())
        assert sorted(out[name]) == sorted(want)
        for key, value in want.items():
            torch.testing.assert_close(out[name][key], value.detach(), rtol=0, atol=1e-6, msg=f"{name} {key}")
    assert any((out["lora"][k] - pairs["lora"][1].state_dict()[k]).abs().max() > 0 for k in out["lora"])
