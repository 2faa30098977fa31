"""UnlearningModule end to end: every tiny configuration forgets forget10 and keeps retain90.

All runs start from ``builtin:tiny-tofu-full`` (a tiny Llama that memorised the 200 built-in
fictitious facts: forget and retain NLL ~0.01 nats per token) through the real CLI and Trainer.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import REPO
from unlearning_helpers import set_nll, unlearn

from lit_align.cli import cli_main

CONFIGS = [
    "configs/unlearning/ga/tiny.yaml",
    "configs/unlearning/graddiff/tiny.yaml",
    "configs/unlearning/npo/tiny.yaml",
    "configs/unlearning/llmu/tiny.yaml",
    "configs/unlearning/ugradsl/tiny.yaml",
    "configs/wagle/graddiff_tiny.yaml",
    "configs/wagle/npo_tiny.yaml",
]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.split("configs/")[1].removesuffix(".yaml") for c in CONFIGS])
def test_tiny_configuration_forgets_and_keeps(config, tmp_path):
    """Forget NLL rises by more than 3 nats per token, retain NLL by less than a third of that."""
    r = unlearn(str(REPO / config), tmp_path)
    assert r["forget_before"] < 0.5 and r["retain_before"] < 0.5  # the starting model knows both sets
    assert r["d_forget"] > 3.0, r
    assert r["d_retain"] < r["d_forget"] / 3, r


def test_po_learns_to_refuse(tmp_path):
    """PO trains toward refusals: refusal NLL falls, the true answers become less likely, retain stays."""
    cli = cli_main(["--config", str(REPO / "configs/unlearning/po/tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.logger=false", "--trainer.enable_progress_bar=false"], run=False)
    data, module = cli.datamodule, cli.model
    data.tokenizer = module.tokenizer
    data.setup("fit")
    module.configure_model()
    batch = next(iter(data.train_dataloader()))
    refusal_before = set_nll_rows(module, batch.refusal)
    forget_before, retain_before = set_nll(module, data.forget_dataset), set_nll(module, data.retain_dataset)
    cli.trainer.fit(module, datamodule=data)
    assert set_nll_rows(module, batch.refusal) < refusal_before / 4
    d_forget = set_nll(module, data.forget_dataset) - forget_before
    assert d_forget > 1.0
    assert set_nll(module, data.retain_dataset) - retain_before < d_forget / 3
    # val/forget/nll is the NLL of the true forget answers, not of the refusals the forget term reads
    logged = cli.trainer.validate(module, datamodule=data, verbose=False)[0]
    forget_nll = set_nll(module, data.forget_dataset)
    assert logged["val/forget/nll"] == pytest.approx(forget_nll, rel=0.25)
    assert logged["val/refusal/nll"] < forget_nll


@torch.no_grad()
def set_nll_rows(module, part) -> float:
    from lit_align.rollout.logps import token_logps

    module.policy.eval()
    out = token_logps(module.policy, part.input_ids, part.attention_mask, part.loss_mask)
    module.policy.train()
    return float(-(out.logps * out.mask).sum() / out.mask.sum())


def _first_step_loss(tmp_path, *extra) -> float:
    cli = cli_main(["fit", "--config", str(REPO / "configs/unlearning/npo/tiny.yaml"),
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.max_steps=1",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                    "--trainer.callbacks=[]", "--model.init_args.retain_loss=null", *extra])
    return float(cli.trainer.callback_metrics["train/forget_loss"])


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_npo_starts_at_two_over_beta_log_two(reference, tmp_path):
    """At the starting weights the policy equals its reference: the forget term is (2/beta) log 2,
    whether the reference log-probs were precomputed or come from a frozen copy."""
    loss = _first_step_loss(tmp_path, f"--model.init_args.reference={reference}")
    assert loss == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)


def test_npo_with_lora_uses_the_adapter_free_policy_as_reference(tmp_path):
    loss = _first_step_loss(tmp_path, "--model.init_args.model.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}")
    assert loss == pytest.approx(2 / 0.1 * math.log(2), abs=1e-4)


def test_stop_rule_stops_after_the_extra_steps(tmp_path):
    """LLMU's intended rule: once the training forget NLL passes the threshold at step s, run
    factor * s more steps, then stop (long before max_steps)."""
    cli = cli_main(["fit", "--config", str(REPO / "configs/unlearning/ga/tiny.yaml"),
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.max_steps=200",
                    "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--model.init_args.stop_forget_nll=2.0", "--model.init_args.stop_extra_steps_factor=1.0"])
    crossed = cli.model._crossed_at
    assert crossed is not None and 1 <= crossed < 100
    assert cli.trainer.global_step == 2 * crossed + 1  # the step that reaches 2 s runs, then the loop stops


def _checkpoint_every_step(config: str, tmp_path) -> str:
    """The config with a ModelCheckpoint after every step (and no evaluation callback)."""
    cfg = yaml.safe_load((REPO / config).read_text())
    callbacks = [c for c in cfg["trainer"]["callbacks"] if "ModelCheckpoint" not in c["class_path"]
                 and "UnlearningEvaluation" not in c["class_path"]]
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"save_top_k": -1, "every_n_train_steps": 1}})
    cfg["trainer"]["callbacks"] = callbacks
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("config", ["configs/unlearning/llmu/tiny.yaml", "configs/wagle/npo_tiny.yaml"],
                         ids=["llmu", "wagle-npo"])
def test_resume_is_exact(config, tmp_path):
    """7 steps straight == 3 steps, resume, 4 more: the forget stream, the random retain/mismatch
    pairing, the optimiser, the precomputed reference and the weight mask all come back."""
    path = _checkpoint_every_step(config, tmp_path)
    common = ["fit", "--config", path, "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--trainer.val_check_interval=3"]
    straight = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'a'}", "--trainer.max_steps=7"])
    cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'b'}", "--trainer.max_steps=3"])
    ckpt = next((tmp_path / "b").rglob("*step=3.ckpt"))
    resumed = cli_main([*common, f"--trainer.default_root_dir={tmp_path / 'c'}", "--trainer.max_steps=7",
                        "--ckpt_path", str(ckpt)])
    a, c = straight.model.policy.state_dict(), resumed.model.policy.state_dict()
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=0, atol=0, msg=name)


def test_kl_term_refuses_precomputed_reference_without_lora():
    from lit_align.losses import RetainKL
    from lit_align.methods import UnlearningModule
    from lit_align.models import ModelSpec

    with pytest.raises(ValueError, match="reference to copy"):
        UnlearningModule(ModelSpec(name_or_path="builtin:tiny-tofu-full"), retain_loss=RetainKL(),
                         reference="precomputed")
    with pytest.raises(ValueError, match="model.retain_weight"):
        UnlearningModule(ModelSpec(name_or_path="builtin:tiny-tofu-full"), retain_loss=RetainKL(), retain_weight=-1.0)


def test_mismatch_term_without_pool_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="data.mismatch_pool"):
        cli_main(["fit", "--config", str(REPO / "configs/unlearning/llmu/tiny.yaml"),
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.callbacks=[]",
                  "--trainer.enable_checkpointing=false", "--data.init_args.mismatch_pool=null"])


def test_unknown_builtin_model_names_the_known_ones():
    from lit_align.models import ModelSpec, build_tokenizer

    with pytest.raises(FileNotFoundError, match="builtin:tiny-tofu-full"):
        build_tokenizer(ModelSpec(name_or_path="builtin:tiny-tofu-fulll"))
