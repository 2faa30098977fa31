"""WeightMask: clip-then-mask order, strict vs reference weight decay, attribution from the datamodule,
resume without re-scoring, and the refusals (LoRA, no attribution data)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import tiny_lm
from torch import nn
from torch.utils.data import DataLoader

from lit_align.callbacks.weight_mask import WeightMask
from lit_align.data.batches import SequenceBatch
from lit_align.rollout.logps import token_logps
from lit_align.unlearning import ParameterMask, accumulate_gradients, attribution_scores

VOCAB = 50


def batches(n: int, rows: int = 2, length: int = 8, seed: int = 0) -> list[SequenceBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n):
        ids = torch.randint(1, VOCAB, (rows, length), generator=g)
        loss = torch.zeros(rows, length, dtype=torch.long)
        loss[:, length // 2:] = 1
        out.append(SequenceBatch(ids, torch.ones_like(ids), loss, torch.arange(b * rows, (b + 1) * rows)))
    return out


class ForgetTerm:
    def __init__(self, target: str) -> None:
        self.target = target


class GradientAscent(L.LightningModule):
    """Tiny unlearning module: maximise the forget NLL (minimise the mean log-prob)."""

    def __init__(self, policy: nn.Module, target: str = "forget", lr: float = 1e-2, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.policy, self.forget_term = policy, ForgetTerm(target)
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch: SequenceBatch, batch_idx: int):
        return token_logps(self.policy, batch.input_ids, batch.attention_mask, batch.loss_mask).mean().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.policy.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class ForgetRetainData(L.LightningDataModule):
    """Train batches plus attribution loaders over fixed forget / retain / refusal sets; counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.sets = {"forget": batches(2, seed=1), "retain": batches(2, seed=2), "refusal": batches(2, seed=3)}
        self.attribution_calls = 0

    def train_dataloader(self):
        return DataLoader(batches(4, seed=1), batch_size=None, collate_fn=lambda b: b)

    def attribution_loaders(self, num_replicas: int, rank: int, batch_size: int):
        self.attribution_calls += 1
        return {k: [(b, torch.ones(len(b))) for b in v[rank::num_replicas]] for k, v in self.sets.items()}


class PlainData(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(batches(4, seed=1), batch_size=None, collate_fn=lambda b: b)


def trainer(tmp_path, callbacks, max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), callbacks=callbacks, **kwargs)


# -- order of clipping and masking -----------------------------------------------------------------
class LinearLoss(L.LightningModule):
    """loss = c . w, so every step's gradient is exactly c; SGD with lr 1 moves w by -(processed gradient)."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.policy = nn.Linear(len(c), 1, bias=False)
        nn.init.zeros_(self.policy.weight)
        self.register_buffer("c", c[None])

    def training_step(self, batch, batch_idx):
        return (self.c * self.policy.weight).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=1.0)


def test_gradients_are_clipped_with_the_full_norm_then_masked(tmp_path):
    """The masked-out entries carry almost all of the gradient norm (|c| ~ 14.1). Clip-then-mask
    moves a kept entry by c_i / (|c| + 1e-6); mask-then-clip would move it by c_i (the kept norm,
    0.5, is under the clip value 1)."""
    c = torch.tensor([10.0, 10.0, 0.3, 0.4])
    module = LinearLoss(c)
    path = tmp_path / "mask.pt"
    ParameterMask({"weight": torch.tensor([[False, False, True, True]])}).save(path)
    t = trainer(tmp_path, [WeightMask(path=str(path))], max_steps=1, gradient_clip_val=1.0)
    t.fit(module, train_dataloaders=DataLoader(range(4), batch_size=1))
    w = module.policy.weight.detach()[0]
    coef = 1.0 / (torch.linalg.vector_norm(c) + 1e-6)
    assert w[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(w[2:], -c[2:] * coef, rtol=1e-6, atol=0)
    assert t.gradient_clip_val == 1.0  # the trainer's setting is given back after fit


def test_why_lightning_may_not_clip_a_second_time():
    """After one clip the norm is max * n / (n + 1e-6): a second clip still scales by slightly less than 1."""
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([30.0, 40.0, 0.0])
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    once = p.grad.clone()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert not torch.equal(once, p.grad)


# -- weight decay: strict freezing vs the reference behaviour ------------------------------------------
@pytest.mark.parametrize("strict", [True, False])
def test_strict_keeps_masked_weights_bit_identical_under_adamw_decay(tmp_path, strict):
    policy = tiny_lm(vocab_size=VOCAB, hidden_size=32)
    start = {n: p.detach().clone() for n, p in policy.named_parameters()}
    module = GradientAscent(policy, lr=1e-2, weight_decay=0.1)
    callback = WeightMask(method="random", ratio=0.5, strict=strict)
    t = trainer(tmp_path, [callback], max_steps=30, gradient_clip_val=1.0)
    t.fit(module, datamodule=PlainData())
    assert t.global_step == 30
    mask = callback.mask
    frozen_same = all(torch.equal(p.detach()[~mask[n]], start[n][~mask[n]]) for n, p in policy.named_parameters())
    kept_moved = max(float((p.detach() - start[n])[mask[n]].abs().max()) for n, p in policy.named_parameters()
                     if mask[n].any())
    assert kept_moved > 1e-3
    if strict:
        assert frozen_same
    else:  # AdamW's decoupled decay alone: (1 - lr * wd) ** 30 on every masked-out weight
        assert not frozen_same
        for n, p in policy.named_parameters():
            torch.testing.assert_close(p.detach()[~mask[n]], start[n][~mask[n]] * (1 - 1e-3) ** 30, rtol=1e-4, atol=0)
    assert t.callback_metrics["train/mask_density"] == pytest.approx(int(mask.numel * 0.5) / mask.numel)


# -- attribution from the datamodule, saving and resuming ---------------------------------------------
def test_wagle_mask_uses_the_refusal_target_is_saved_and_reloaded_on_resume(tmp_path):
    policy = tiny_lm(vocab_size=VOCAB, hidden_size=32)
    start = copy.deepcopy(policy)
    data = ForgetRetainData()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    callback = WeightMask(method="wagle", ratio=0.5, gamma=1e-3)
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback, checkpoint])
    t.fit(GradientAscent(policy, target="refusal"), datamodule=data)

    # the mask is WAGLE's on the refusal (PO) target, at the starting weights
    ones = lambda bs: [(b, torch.ones(len(b))) for b in bs]  # noqa: E731
    g_f = accumulate_gradients(start, ones(data.sets["refusal"]))
    g_r = accumulate_gradients(start, ones(data.sets["retain"]))
    expected = ParameterMask.select_top(attribution_scores(start, g_f, g_r, method="wagle", gamma=1e-3), 0.5)
    assert all(torch.equal(callback.mask[n], expected[n]) for n in expected)
    saved = tmp_path / "weight_mask" / "wagle_0.5.pt"
    assert saved.is_file() and all(torch.equal(ParameterMask.load(saved, start)[n], expected[n]) for n in expected)
    assert data.attribution_calls == 1

    # resuming reloads that mask (never re-scores the trained weights)
    resumed = WeightMask(method="wagle", ratio=0.5, gamma=1e-3)
    t2 = L.Trainer(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[resumed])
    t2.fit(GradientAscent(tiny_lm(vocab_size=VOCAB, hidden_size=32), target="refusal"), datamodule=data,
           ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert t2.global_step == 4 and data.attribution_calls == 1
    assert all(torch.equal(resumed.mask[n], expected[n]) for n in expected)


# -- refusals -----------------------------------------------------------------------------------------
def test_lora_policies_and_missing_attribution_data_are_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_lm(vocab_size=VOCAB, hidden_size=32), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="peft/LoRA model"):
        trainer(tmp_path, [WeightMask(method="random")], max_steps=1).fit(GradientAscent(lora), datamodule=PlainData())
    with pytest.raises(TypeError, match="has no such method"):
        trainer(tmp_path, [WeightMask(method="wagle")], max_steps=1).fit(
            GradientAscent(tiny_lm(vocab_size=VOCAB, hidden_size=32)), datamodule=PlainData())
    with pytest.raises(ValueError, match="must be one of"):
        WeightMask(method="wanda")


# -- FSDP2: the callback on DTensor shards (two gloo processes) ---------------------------------------
FSDP2_SCRIPT = """
import sys
sys.path[:0] = [{tests!r}, {here!r}]
import torch
import lightning as L
from lightning.pytorch.strategies import ModelParallelStrategy
from conftest import tiny_lm
from test_weight_mask import VOCAB, ForgetRetainData, GradientAscent
from lit_align.callbacks.weight_mask import WeightMask
from lit_align.models.fsdp import fsdp2_parallelize

torch.set_num_threads(1)


class Sharded(GradientAscent):
    def configure_model(self):
        if self.device_mesh is not None and not hasattr(self.policy, "reshard"):
            fsdp2_parallelize(self.policy, self.device_mesh["data_parallel"])


callback = WeightMask(method="wagle", ratio=0.5, gamma=1e-3, strict=True)
module = Sharded(tiny_lm(vocab_size=VOCAB, hidden_size=32), weight_decay=0.1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                    max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, use_distributed_sampler=False, gradient_clip_val=1.0, callbacks=[callback],
                    default_root_dir={root!r})
trainer.fit(module, datamodule=ForgetRetainData())
weights = {{n: p.full_tensor() for n, p in module.policy.named_parameters()}}
density = trainer.callback_metrics["train/mask_density"].item()
if trainer.is_global_zero:
    torch.save({{"weights": weights, "density": density}}, {root!r} + "/out.pt")
"""


@pytest.mark.slow
def test_fsdp2_two_processes_compute_the_one_process_mask_and_keep_frozen_weights(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    script = tmp_path / "fsdp2_mask.py"
    script.write_text(FSDP2_SCRIPT.format(tests=str(here.parent), here=str(here), root=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)

    start = tiny_lm(vocab_size=VOCAB, hidden_size=32)
    data = ForgetRetainData()
    ones = lambda bs: [(b, torch.ones(len(b))) for b in bs]  # noqa: E731
    g_f = accumulate_gradients(start, ones(data.sets["forget"]))
    g_r = accumulate_gradients(start, ones(data.sets["retain"]))
    one = ParameterMask.select_top(attribution_scores(start, g_f, g_r, method="wagle", gamma=1e-3), 0.5)
    two = ParameterMask.load(tmp_path / "weight_mask" / "wagle_0.5.pt", start)
    assert two.num_selected() == one.num_selected() == int(one.numel * 0.5)
    # gradients summed in another order may swap weights sitting exactly at the threshold, nothing more
    differ = sum(int((one[n] != two[n]).sum()) for n in one)
    assert differ <= one.numel * 1e-3, differ
    assert out["density"] == pytest.approx(0.5, abs=1e-4)
    moved = 0.0
    for n, p in start.named_parameters():  # strict: masked-out shards bit-identical; kept weights trained
        w, m = out["weights"][n], two[n]
        assert torch.equal(w[~m], p.detach()[~m]), n
        if m.any():
            moved = max(moved, float((w - p.detach())[m].abs().max()))
    assert moved > 1e-3
