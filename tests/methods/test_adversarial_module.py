"""ContinuousAdversarialModule (C-AdvUL, C-AdvIPO) end to end on builtin:tiny-game-base through the real CLI.

Covers §8(g)4 (delta detached when the outer loss is built), §8(g)5 through the module (the SAME delta on the
away and toward rows, by mask order), §8(g)7 through the module (IPO at the starting weights with delta ~ 0:
h = 0, loss = 4), §8(h)7 (steps without adversarial rows), parameter .grad clean after the attack, resume
equality and the tiny configs' training runs.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO

from lit_align.cli import cli_main
from lit_align.containers import AdversarialBatch

UL, IPO = str(REPO / "configs/adv_training/ul_tiny.yaml"), str(REPO / "configs/adv_training/ipo_tiny.yaml")
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _cli(config: str, root, *extra: str):
    """The CLI with ``config``, not run: module built, data set up (so a test can wrap parts before fitting)."""
    cli = cli_main(["--config", config, f"--trainer.default_root_dir={root}", *QUIET, *extra], run=False)
    cli.datamodule.tokenizer = cli.model.tokenizer
    cli.model.configure_model()
    return cli


def _lora(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.named_parameters() if "lora_" in k}


@pytest.mark.parametrize("config", [UL, IPO], ids=["ul", "ipo"])
def test_tiny_config_trains_the_adapter(config, tmp_path):
    """A few steps of each objective: finite loss, LoRA weights changed, the attack lowered the harmful CE
    (ce_end < ce_start), HF export written."""
    cli = _cli(config, tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=4")
    before = _lora(cli.model)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])
    after = _lora(cli.model)
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-4
    assert "val/loss" in metrics and "val/attack/ce_end" in metrics
    key = "away_loss" if config == UL else "ipo_loss"
    assert f"val/{key}" in metrics
    # the 2 validation batches hold pairs only (UL's utility rows come after its 86 pairs): no utility_loss key,
    # not a NaN mean over no rows
    assert "val/utility_loss" not in metrics
    assert all(torch.isfinite(v) for k, v in metrics.items() if k.startswith("val/")), metrics
    assert float(metrics["val/attack/ce_end"]) < float(metrics["val/attack/ce_start"])
    assert (tmp_path / "hf_export" / "adapter_model.safetensors").is_file()  # LoRA: the adapter is exported


def test_same_detached_delta_on_away_and_toward_and_clean_grads(tmp_path):
    """§8(g)4-5 through the module: the outer forwards get a delta with requires_grad False; the toward
    rows' delta is the away rows' delta copied position for position (mask order) onto their prompts; every
    parameter's .grad is the same before and after the attack (gradients w.r.t. delta only)."""
    cli = _cli(UL, tmp_path, "--trainer.max_steps=2", "--data.init_args.adversarial_probability=1.0",
               "--trainer.limit_val_batches=0")
    module = cli.model
    seen, grads_changed = [], []
    attack, perturbed = module.attack, module._perturbed_logps

    def grads(model):
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    def spy_attack(model, batch, **kwargs):
        before = grads(model)
        result = attack(model, batch, **kwargs)
        after = grads(model)
        grads_changed.append([n for n in before if not (before[n] is after[n] is None or (
            before[n] is not None and after[n] is not None and torch.equal(before[n], after[n])))])
        return result

    def spy_perturbed(part, delta):
        seen.append((part, delta))
        return perturbed(part, delta)

    module.attack, module._perturbed_logps = spy_attack, spy_perturbed
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert grads_changed == [[], []]  # the second attack runs with the first step's .grad still set
    from lit_align.attacks.embedding import perturbation_mask

    (away, away_delta), (toward, toward_delta) = seen[:2]
    assert not away_delta.requires_grad and not toward_delta.requires_grad
    assert away_delta.abs().sum() > 0
    away_mask = perturbation_mask(away.attention_mask, away.loss_mask)
    toward_mask = perturbation_mask(toward.attention_mask, toward.loss_mask)
    assert torch.equal(away_delta[away_mask], toward_delta[toward_mask])
    assert toward_delta[~toward_mask].abs().sum() == 0


@pytest.mark.parametrize("reference", [
    ["--model.init_args.objective.init_args.away_cutoff=-1000"],  # precomputed, no token windowed out
    ["--model.init_args.objective.init_args.reference_cutoffs=true", "--model.init_args.reference=adapter"],
], ids=["precomputed-no-window", "adapter-windowed-reference"])
def test_ipo_at_the_starting_weights_is_four(reference, tmp_path):
    """§8(g)7 through the module: LoRA starts as the identity (B = 0), the reference is scored from the same
    weights on clean inputs, and a vanishing radius makes delta ~ 0: h = 0, loss = (1/(2*0.25))^2 = 4.
    (With the released asymmetry, §8(h)9, h != 0 at the start as soon as a harmful token has log p < -5: the
    policy side zeroes it, the reference does not; so either no token is windowed or both sides are.)"""
    cli = cli_main(["fit", "--config", IPO, f"--trainer.default_root_dir={tmp_path}", *QUIET, "--trainer.max_steps=1",
                    "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--model.init_args.attack.epsilon_rel=1e-9", *reference,
                    f"--model.init_args.reference_cache_dir={tmp_path / 'cache'}"])
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/h"]) == pytest.approx(0.0, abs=1e-5)
    assert float(metrics["train/ipo_loss"]) == pytest.approx(4.0, abs=1e-4)


def test_released_reference_asymmetry_moves_h_at_the_start(tmp_path):
    """The default (released) reference is NOT windowed: at the starting weights the harmful tokens below -5
    count 0 on the policy side only, so h < 0 (the windowed harmful mean is higher than the plain one). A batch of
    32 pairs: the base predicts most toy targets well, so a smaller first batch may hold no token below -5."""
    cli = cli_main(["fit", "--config", IPO, f"--trainer.default_root_dir={tmp_path}", *QUIET, "--trainer.max_steps=1",
                    "--data.init_args.batch_size=32",
                    "--trainer.limit_val_batches=0", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--model.init_args.attack.epsilon_rel=1e-9",
                    f"--model.init_args.reference_cache_dir={tmp_path / 'cache'}"])
    assert float(cli.trainer.callback_metrics["train/h"]) < -1e-3


def test_step_without_adversarial_rows_logs_no_away_or_toward(tmp_path):
    """§8(h)7: a utility-only batch trains on utility alone (loss = utility_weight x NLL) and its metrics hold no
    away / toward / attack values (absent, not 0)."""
    cli = _cli(UL, tmp_path)
    cli.datamodule.setup("fit")
    batch = next(b for b in cli.datamodule.train_dataloader() if b.utility is not None)
    utility_only = AdversarialBatch(away=None, toward=None, utility=batch.utility, index=batch.index[:0])
    loss, metrics = cli.model._objective(utility_only, "train")
    assert set(metrics) == {"utility_loss"}
    assert loss.item() == pytest.approx(cli.model.utility_weight * metrics["utility_loss"].item())


def test_evaluated_parts_are_those_of_the_batches_run(tmp_path):
    """The parts whose metrics validation logs: those the first ``batches`` batches hold (pairs come first)."""
    cli = _cli(UL, tmp_path)
    cli.datamodule.setup("fit")
    dm = cli.datamodule
    pairs = len(dm.val_dataset.pairs)
    assert dm.evaluated_parts("val", 1) == {"adversarial"}
    assert dm.evaluated_parts("val", pairs // dm.val_batch_size) == {"adversarial"}
    assert dm.evaluated_parts("val", pairs // dm.val_batch_size + 1) == {"adversarial", "utility"}
    assert dm.evaluated_parts("test", float("inf")) == {"adversarial", "utility"}


def _checkpoint_every_step(config: str, tmp_path) -> str:
    cfg = yaml.safe_load(open(config).read())
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"save_top_k": -1, "every_n_train_steps": 1}}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_resume_is_exact(tmp_path):
    """5 steps straight == 2 steps, resume from the step-2 checkpoint, 3 more: the mixed stream, the optimiser,
    the LoRA dropout draws (seeded per step) and the attack come back the same."""
    path = _checkpoint_every_step(UL, tmp_path)
    common = ["fit", "--config", path, *QUIET, "--trainer.limit_val_batches=0"]
    straight = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'a'}", "--trainer.max_steps=5"])
    cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.max_steps=2"])
    ckpt = next((tmp_path / "b").rglob("*step=2.ckpt"))
    resumed = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'c'}", "--trainer.max_steps=5",
                        "--ckpt_path", str(ckpt)])
    a, c = straight.model.policy.state_dict(), resumed.model.policy.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)


def test_reference_cutoffs_need_a_reference_that_scores():
    """Windowing the reference needs its per-token log-probs, which precomputed tables do not keep."""
    from lit_align.errors import ConfigError
    from lit_align.losses import CAdvIPO
    from lit_align.methods import ContinuousAdversarialModule
    from lit_align.models import ModelSpec

    with pytest.raises(ConfigError, match="reference_cutoffs: true .* set model.reference to adapter"):
        ContinuousAdversarialModule(ModelSpec(name_or_path="builtin:tiny-game-base"),
                                    objective=CAdvIPO(reference_cutoffs=True))


@pytest.mark.parametrize("kwargs, match", [
    ({"utility_weight": -1.0}, "model.utility_weight"),
    ({"utility_weight": float("nan")}, "model.utility_weight"),
    ({"objective": "ul"}, "model.objective must be"),
])
def test_bad_module_arguments_name_the_key(kwargs, match):
    from lit_align.errors import ConfigError
    from lit_align.methods import ContinuousAdversarialModule
    from lit_align.models import ModelSpec

    with pytest.raises(ConfigError, match=match):
        ContinuousAdversarialModule(ModelSpec(name_or_path="builtin:tiny-game-base"), **kwargs)
