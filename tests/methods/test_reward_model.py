"""RewardModelModule: it learns the built-in preference pairs, its export is an HF sequence classifier that
plain transformers and lit_align's reward builder read with the same scores, and its loss is TRL's
RewardTrainer loss on the same batch."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import REPO, tiny_lm
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from lit_align.cli import cli_main
from lit_align.data import PreferenceDataModule
from lit_align.errors import ConfigError
from lit_align.losses import bradley_terry_loss
from lit_align.methods import RewardModelModule
from lit_align.models import ModelSpec, RewardModel, RewardModelSpec, TinyArch, build_reward_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    cli = cli_main(["fit", "--config", str(REPO / "configs/rm/tiny.yaml"), "--trainer.default_root_dir", str(root),
                    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root),
                    "--trainer.enable_progress_bar", "false",
                    "--trainer.max_steps", "200", "--trainer.val_check_interval", "100"])
    return cli, root


def _accuracy(module: RewardModelModule, loader) -> float:
    wins = total = 0
    with torch.no_grad():
        for batch in loader:
            chosen, rejected = module.scores(batch)
            wins += int((chosen > rejected).sum())
            total += len(batch)
    return wins / total


def test_it_learns_the_preference_pairs(trained):
    cli, _ = trained
    module, data = cli.model.eval(), cli.datamodule
    train, val = _accuracy(module, data.train_dataloader()), _accuracy(module, data.val_dataloader())
    assert train > 0.9, f"training accuracy {train:.2f}"
    assert val >= 0.65, f"held-out accuracy {val:.2f} (chance is 0.5)"  # 30 held-out pairs: 0.65 is > 1.6 sd


def test_export_is_an_hf_sequence_classifier_with_the_same_scores(trained):
    cli, root = trained
    module = cli.model.eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    chosen, _ = module.scores(batch)
    plain = AutoModelForSequenceClassification.from_pretrained(root / "hf_export").eval()
    ids, mask = batch.chosen.input_ids, batch.chosen.attention_mask  # right-padded, pad 0 != any real token
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, attention_mask=mask).logits[:, 0], chosen, atol=1e-4, rtol=1e-4)
        built = build_reward_model(RewardModelSpec(model=ModelSpec(name_or_path=str(root / "hf_export")),
                                                   kind="sequence_classification")).eval()
        torch.testing.assert_close(built.score(ids, mask), chosen, atol=1e-4, rtol=1e-4)


def test_loss_equals_trl_reward_trainer(tmp_path):
    from trl import RewardConfig, RewardTrainer

    tok = RewardModelModule(RewardModelSpec(model=ModelSpec(tiny=TinyArch()))).tokenizer
    config = tiny_lm("qwen2", vocab_size=len(tok), hidden_size=32, pad_token_id=tok.pad_token_id).config
    config.num_labels = 1
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        classifier.score.weight.normal_(0, 0.5)
    pairs = [{"chosen": "the sky is blue", "rejected": "the sky is green"},
             {"chosen": "yes", "rejected": "no it is not the case"}]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, center_rewards_coefficient=0.01,
                        per_device_eval_batch_size=2, disable_tqdm=True, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=classifier, args=args, train_dataset=Dataset.from_list(pairs),
                                eval_dataset=Dataset.from_list(pairs), processing_class=tok)
    inputs = next(iter(trainer.get_eval_dataloader()))
    classifier.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(classifier, dict(inputs))
        # lit_align's scorer (last real token from the attention mask) on TRL's batch: [chosen rows; rejected rows]
        rewards = RewardModel(classifier, None, "sequence_classification").score(inputs["input_ids"],
                                                                                 inputs["attention_mask"])
    loss, _ = bradley_terry_loss(*rewards.chunk(2), center_coef=0.01)
    assert trl_loss.item() != pytest.approx(bradley_terry_loss(*rewards.chunk(2))[0].item())  # the centring counts
    torch.testing.assert_close(loss, trl_loss)


def test_bad_input_names_the_key():
    with pytest.raises(ConfigError, match="model.center_coef"):
        RewardModelModule(RewardModelSpec(model=ModelSpec(tiny=TinyArch())), center_coef=-1.0)
    assert PreferenceDataModule  # the data module the configs pair it with


@pytest.mark.slow
def test_two_ddp_processes_match_one(tmp_path):
    """1 process with batch 16 and 2 DDP processes with batch 8 each see the same pairs per step."""
    from conftest import run_cli
    from safetensors.torch import load_file

    out = []
    for name, extra, batch in (("one", [], "16"), ("two", ["--config", str(REPO / "callbacks/ddp_cpu.yaml")], "8")):
        root = tmp_path / name
        run_cli(["fit", "--config", str(REPO / "configs/rm/tiny.yaml"), *extra, "--trainer.max_steps", "4",
                 "--trainer.default_root_dir", str(root), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false",
                 "--data.init_args.batch_size", batch])
        out.append(load_file(root / "hf_export" / "model.safetensors"))
    one, two = out
    start = RewardModelModule(RewardModelSpec(model=ModelSpec(tiny=TinyArch(
        family="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128))))
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    trained = (one["score.weight"]).abs().max().item()  # the head starts at zero
    assert trained > 1e-3 and moved < 2e-4, (trained, moved)
    assert start.reward_spec.head_bias is False
