"""A model spec that names a lit_align checkpoint (``name_or_path: .../last.ckpt``) rebuilds the trained policy:
a one-step LoRA SFT run's checkpoint gives the trained module's logits and greedy generations (LoRA merged); a
sharded checkpoint directory, a missing file and a checkpoint without a policy are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CSV_LOGGER, REPO

from lit_align.checkpoint import atomic_save
from lit_align.cli import cli_main
from lit_align.errors import ConfigError, MissingPathError
from lit_align.models import ModelSpec, build_causal_lm, build_tokenizer
from lit_align.models.from_checkpoint import base_spec, is_checkpoint, trained_spec
from lit_align.retrieval import generate_texts
from lit_align.rollout.sampler import SamplingConfig

PROMPTS = ["Human: What is the capital of France?\nAI:", "Human: Name a colour.\nAI:"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A one-step LoRA SFT run (a high learning rate, so the adapters move) and its last.ckpt."""
    root = tmp_path_factory.mktemp("sft")
    cli = cli_main(["fit", "--config", str(REPO / "configs/sft/tiny.yaml"), "--trainer.default_root_dir", str(root),
                    "--trainer.enable_progress_bar", "false", *CSV_LOGGER, "--trainer.logger.save_dir", str(root),
                    "--trainer.max_steps", "1", "--model.init_args.model.lora", "{r: 4, alpha: 8}",
                    "--model.init_args.optimizer.init_args.lr", "0.05", "--trainer.callbacks",
                    "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"])
    ckpt = next(root.rglob("last.ckpt"))
    return cli.model, ckpt


def test_checkpoint_spec_gives_the_trained_policy(sft_run):
    module, ckpt = sft_run
    spec = ModelSpec(name_or_path=str(ckpt))
    assert is_checkpoint(spec.name_or_path) and trained_spec(spec).lora is not None
    tokenizer = build_tokenizer(spec)
    model = build_causal_lm(spec, tokenizer).eval()
    assert not hasattr(model, "peft_config"), "LoRA is merged into a plain transformers model"
    trained = module.policy.eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = trained(ids).logits, model(ids).logits
    base = build_causal_lm(ModelSpec(**{**vars(trained_spec(spec)), "lora": None}), tokenizer).eval()
    with torch.no_grad():
        assert (base(ids).logits - expected).abs().max() > 1e-3, "the step moved the adapters"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    greedy = SamplingConfig(max_new_tokens=12, do_sample=False)
    assert (generate_texts(model, tokenizer, PROMPTS, greedy, seeds=None)
            == generate_texts(trained, module.tokenizer, PROMPTS, greedy, seeds=None))


def test_checkpoint_of_a_run_started_from_a_checkpoint_uses_its_own_lora(sft_run, tmp_path):
    """Run 2 starts from run 1's last.ckpt with its own LoRA (same rank, another alpha): its checkpoint rebuilds
    run 1's merged policy, then run 2's adapters (alpha 64, not run 1's 8), and gives run 2's logits."""
    _, first = sft_run
    cli = cli_main(["fit", "--config", str(REPO / "configs/sft/tiny.yaml"), "--trainer.default_root_dir",
                    str(tmp_path), "--trainer.enable_progress_bar", "false", *CSV_LOGGER,
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.max_steps", "1",
                    "--model.init_args.model.name_or_path", str(first), "--model.init_args.model.tiny", "null",
                    "--model.init_args.model.lora", "{r: 4, alpha: 64}",
                    "--model.init_args.optimizer.init_args.lr", "0.05", "--trainer.callbacks",
                    "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"])
    spec = ModelSpec(name_or_path=str(next(tmp_path.rglob("last.ckpt"))))
    saved = trained_spec(spec)
    assert saved.lora.alpha == 64 and saved.name_or_path == str(first)
    tokenizer = build_tokenizer(spec)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    model = build_causal_lm(spec, tokenizer, key="model.evaluated.second").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cli.model.policy.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_errors_name_the_config_key(sft_run, tmp_path):
    """A policy that does not fit the saved spec: the error names the spec's own config key and its LoRA."""
    _, ckpt = sft_run
    from lit_align.checkpoint import load_checkpoint

    broken = load_checkpoint(ckpt)
    broken["state_dict"] = {k: v for k, v in broken["state_dict"].items() if "lora_B" not in k}
    atomic_save(broken, tmp_path / "broken.ckpt")
    spec = ModelSpec(name_or_path=str(tmp_path / "broken.ckpt"))
    tokenizer = build_tokenizer(spec)
    with pytest.raises(ConfigError, match=r"model\.models\.sft\.name_or_path=.*LoRA r=4"):
        build_causal_lm(spec, tokenizer, key="model.models.sft")


def test_sharded_directory_is_refused_with_the_export_fix(tmp_path):
    sharded = tmp_path / "epoch=0-step=1.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(b"")
    with pytest.raises(ConfigError, match="HFExport"):
        build_tokenizer(ModelSpec(name_or_path=str(sharded)), key="model.evaluated.a")
    with pytest.raises(MissingPathError, match="no such checkpoint file"):
        build_tokenizer(ModelSpec(name_or_path=str(tmp_path / "missing.ckpt")))


def test_checkpoint_without_a_policy_spec_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    atomic_save({"hyper_parameters": {"_class_path": "x.RewardModelModule", "model": {"head": "linear"}},
                 "state_dict": {}}, path)
    with pytest.raises(ConfigError, match="no causal-LM `model` spec"):
        build_tokenizer(ModelSpec(name_or_path=str(path)))
    atomic_save({"hyper_parameters": {}, "state_dict": {}}, Path(tmp_path / "bare.ckpt"))
    with pytest.raises(ConfigError, match="no `model`"):
        build_tokenizer(ModelSpec(name_or_path=str(tmp_path / "bare.ckpt")))


def test_chained_relative_path_resolves_beside_the_checkpoint_and_a_cycle_is_refused(tmp_path, monkeypatch):
    """review20c #14: a saved relative checkpoint path resolves against the checkpoint's folder (not only from
    the original working directory); a saved spec naming its own file is a ConfigError, not an endless loop."""
    runs = tmp_path / "runs"
    runs.mkdir()
    atomic_save({"hyper_parameters": {"model": {"name_or_path": "builtin:tiny-tofu-full"}}, "state_dict": {}},
                runs / "first.ckpt")
    atomic_save({"hyper_parameters": {"model": {"name_or_path": "first.ckpt"}}, "state_dict": {}},
                runs / "second.ckpt")
    monkeypatch.chdir(tmp_path)  # not the folder the relative path was saved from
    spec = trained_spec(ModelSpec(name_or_path=str(runs / "second.ckpt")))
    assert spec.name_or_path == str(runs / "first.ckpt")
    assert base_spec(ModelSpec(name_or_path=str(runs / "second.ckpt"))).name_or_path == "builtin:tiny-tofu-full"
    atomic_save({"hyper_parameters": {"model": {"name_or_path": "loop.ckpt"}}, "state_dict": {}}, runs / "loop.ckpt")
    with pytest.raises(ConfigError, match=r"model.name_or_path: the chain of checkpoints .*repeats"):
        base_spec(ModelSpec(name_or_path=str(runs / "loop.ckpt")))
