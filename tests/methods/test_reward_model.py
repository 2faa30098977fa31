"""RewardModelModule: it learns the built-in preference pairs, its export is an HF sequence classifier that
plain transformers and lit_align's reward builder read with the same scores, its loss is TRL's
RewardTrainer loss on the same batch (with per-record margins too), scoring each prompt once for both responses
changes no score or gradient, and 2 DDP or FSDP2 processes (full or LoRA) end where 1 process does."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import REPO, tiny_lm
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from lit_align.cli import cli_main
from lit_align.data import PreferenceDataModule
from lit_align.data.records import DataSource
from lit_align.errors import ConfigError, DataError
from lit_align.losses import bradley_terry_loss
from lit_align.methods import RewardModelModule
from lit_align.models import ModelSpec, RewardModel, RewardModelSpec, TinyArch, build_causal_lm, build_reward_model

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
    pairs = [{"chosen": "the sky is blue", "rejected": "the sky is green", "margin": 1.5},
             {"chosen": "yes", "rejected": "no it is not the case", "margin": 0.25}]
    args = RewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, center_rewards_coefficient=0.01,
                        per_device_eval_batch_size=2, disable_tqdm=True, max_length=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=classifier, args=args, train_dataset=Dataset.from_list(pairs),
                                eval_dataset=Dataset.from_list(pairs), processing_class=tok)
    inputs = next(iter(trainer.get_eval_dataloader()))
    assert inputs["margin"].tolist() == [1.5, 0.25]  # TRL reads the margin column
    classifier.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(classifier, dict(inputs))
        # lit_align's scorer (last real token from the attention mask) on TRL's batch: [chosen rows; rejected rows]
        rewards = RewardModel(classifier, None, "sequence_classification").score(inputs["input_ids"],
                                                                                 inputs["attention_mask"])
    loss, _ = bradley_terry_loss(*rewards.chunk(2), margin=inputs["margin"], center_coef=0.01)
    for partial in (dict(margin=inputs["margin"]), dict(center_coef=0.01)):  # the margin and the centring count
        assert trl_loss.item() != pytest.approx(bradley_terry_loss(*rewards.chunk(2), **partial)[0].item())
    torch.testing.assert_close(loss, trl_loss)


def _margin_data(tmp_path, margins, batch_size=4) -> PreferenceDataModule:
    rows = [{"prompt": f"question {i}", "chosen": f"a good answer {i}", "rejected": f"bad {i}"}
            for i in range(len(margins))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({**r, **({} if m is None else {"margin": m})}) + "\n"
                            for r, m in zip(rows, margins)))
    return PreferenceDataModule(train=DataSource(path=str(path)), val_fraction=0.0, batch_size=batch_size,
                                shuffle=False, chat_template=False)


def _module(**kwargs) -> RewardModelModule:
    spec = RewardModelSpec(model=ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1)), head_init_std=0.5)
    module = RewardModelModule(spec, **kwargs)
    module.configure_model()
    return module


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_per_record_margins_reach_the_loss(tmp_path):
    """Records' ``margin`` fields travel in the batch; ``margin: per_record`` puts each in its pair's loss term."""
    module = _module(margin="per_record")
    data = _margin_data(tmp_path, [2.0, 0, -1.0, 0.5])
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.margin.tolist() == [2.0, 0.0, -1.0, 0.5]
    with torch.no_grad():
        chosen, rejected = module.scores(batch)
        loss = module._step(batch, "train")
        with pytest.warns(UserWarning, match="carry a 'margin' field, which model.margin=0.75 ignores"):
            constant = _module(margin=0.75)._step(batch, "train")
        with pytest.warns(UserWarning, match="model.margin='none' ignores"):
            plain = _module()._step(batch, "train")
    # by hand: -log sigmoid(x) = log(1 + exp(-x)), per pair, then the mean
    by_hand = sum(torch.log1p(torch.exp(-(c - r - m))) for c, r, m in zip(chosen, rejected, [2.0, 0.0, -1.0, 0.5])) / 4
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(constant, torch.log1p(torch.exp(-(chosen - rejected - 0.75))).mean())
    torch.testing.assert_close(plain, torch.log1p(torch.exp(-(chosen - rejected))).mean())
    assert abs(loss.item() - plain.item()) > 1e-3


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_margin_errors_name_the_key_and_record(tmp_path):
    module = _module(margin="per_record")
    data = _margin_data(tmp_path, [None, None])
    data.tokenizer = module.tokenizer
    data.setup("fit")
    with pytest.raises(ConfigError, match="model.margin is 'per_record'.*no 'margin' field"):
        module._step(next(iter(data.train_dataloader())), "train")
    for margins, message in (([1.0, None], r"record 2 .*missing field 'margin'"),
                             ([1.0, "big"], r"record 2 .*'margin' must be a finite number, got 'big'")):
        data = _margin_data(tmp_path, margins)
        data.tokenizer = module.tokenizer
        with pytest.raises(DataError, match=message):
            data.setup("fit")
    with pytest.raises(ConfigError, match="model.margin must be"):
        RewardModelModule(RewardModelSpec(model=ModelSpec(tiny=TinyArch())), margin="graded")


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_scores_equal_whole_sequences(tmp_path, lora):
    """Running each prompt once and both responses on its cache gives the scores and gradients of whole
    sequences, with prompts and responses of different lengths (left- and right-padding inside the batch)."""
    from lit_align.models import LoRASpec

    rows = [{"prompt": "why is the sky blue", "chosen": "light scatters", "rejected": "no idea at all, sorry"},
            {"prompt": "hi", "chosen": "hello there friend", "rejected": "go"},
            {"prompt": "name a colour of the sea please", "chosen": "blue", "rejected": "the sea has no colour"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=2), lora=LoRASpec(r=4) if lora else None)
    grads, scores = [], []
    for share in (True, False):
        module = RewardModelModule(RewardModelSpec(model=spec, head_init_std=0.5), share_prompt=share)
        module.configure_model()
        data = PreferenceDataModule(train=DataSource(path=str(path)), val_fraction=0.0, batch_size=3, shuffle=False,
                                    chat_template=False)
        data.tokenizer = module.tokenizer
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        chosen, rejected = module.scores(batch)
        (chosen - 2 * rejected).sum().backward()
        scores.append(torch.cat([chosen, rejected]).detach())
        grads.append({n: p.grad for n, p in module.reward_model.named_parameters() if p.grad is not None})
    prompt_lengths = (batch.chosen.attention_mask.bool() & ~batch.chosen.loss_mask.bool()).sum(1)
    assert len(set(prompt_lengths.tolist())) == 3 and not batch.rejected.attention_mask.bool().all()
    torch.testing.assert_close(scores[0], scores[1], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 3
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_shared_prompt_last_layer_at_the_scored_tokens_only_is_exact(tmp_path, family):
    """The prompt-sharing forward with the last layer run at each response's scored token only (its keys and
    values from the prompt's and the response's inputs to it) gives the full forward's scores and gradients
    (float64), for prompts and responses of different lengths."""
    rows = [{"prompt": "why is the sky blue", "chosen": "light scatters", "rejected": "no idea at all, sorry"},
            {"prompt": "hi", "chosen": "hello there friend", "rejected": "go"},
            {"prompt": "name a colour of the sea please", "chosen": "blue", "rejected": "the sea has no colour"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = ModelSpec(tiny=TinyArch(family=family, hidden_size=32, num_layers=2))
    module = RewardModelModule(RewardModelSpec(model=spec, head_init_std=0.5))
    module.configure_model()
    module.reward_model.double().train()
    data = PreferenceDataModule(train=DataSource(path=str(path)), val_fraction=0.0, batch_size=3, shuffle=False,
                                chat_template=False)
    data.tokenizer = module.tokenizer
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    mlp = module.reward_model.backbone.get_decoder().layers[-1].mlp
    results = []
    for separable in (True, False):
        module.reward_model.zero_grad()
        module.reward_model.last_layer_at_score_only = separable
        seen = []
        handle = mlp.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0].dim()))
        chosen, rejected = module.scores(batch)
        handle.remove()
        (chosen - 2 * rejected).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.reward_model.named_parameters() if p.grad is not None}
        results.append((torch.cat([chosen, rejected]).detach(), grads, seen))
    (fast, fast_grads, fast_seen), (full, full_grads, full_seen) = results
    assert fast_seen == [2] and full_seen == [3, 3]  # prompt and response passes, or the scored tokens only
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
    assert fast_grads.keys() == full_grads.keys() and len(fast_grads) > 3
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_bad_input_names_the_key():
    with pytest.raises(ConfigError, match="model.center_coef"):
        RewardModelModule(RewardModelSpec(model=ModelSpec(tiny=TinyArch())), center_coef=-1.0)


ARCH = TinyArch(family="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
LORA = ["--model.init_args.model.model.lora", "{r: 8, alpha: 16}"]


def _fit_args(root, batch: str, extra: list[str]) -> list[str]:
    return ["fit", "--config", str(REPO / "configs/rm/tiny.yaml"), *extra, "--trainer.max_steps", "4",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--data.init_args.batch_size", batch]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The exports of 1-process runs with batch 16, full and LoRA (in this process)."""
    from safetensors.torch import load_file

    out = {}
    for name, extra in (("full", []), ("lora", LORA)):
        root = tmp_path_factory.mktemp(f"rm_one_{name}")
        cli_main(_fit_args(root, "16", extra))
        out[name] = load_file(root / "hf_export" / "model.safetensors")
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "mode"), [("ddp_cpu", "lora"), ("fsdp2_cpu", "full"), ("fsdp2_cpu", "lora")])
def test_two_processes_match_one(one_process, tmp_path, strategy, mode):
    """1 process with batch 16 and 2 processes (DDP or FSDP2 over gloo) with batch 8 each see the same pairs per
    step and end with the same exported classifier (gathered from the shards under FSDP2, LoRA merged). Full
    training under DDP is LoRA's case less the frozen weights; it is left out to keep the suite short."""
    from conftest import run_cli
    from safetensors.torch import load_file

    extra = ["--config", str(REPO / f"callbacks/{strategy}.yaml"), *(LORA if mode == "lora" else [])]
    run_cli(_fit_args(tmp_path, "8", extra))
    one, two = one_process[mode], load_file(tmp_path / "hf_export" / "model.safetensors")
    assert sorted(one) == sorted(two)
    moved = max((one[k] - two[k]).abs().max().item() for k in one)
    trained = (one["score.weight"]).abs().max().item()  # the head starts at zero
    assert trained > 1e-3 and moved < 2e-4, (trained, moved)
    start = build_causal_lm(ModelSpec(tiny=ARCH), RewardModelModule(RewardModelSpec(model=ModelSpec(tiny=ARCH))).tokenizer)
    key = "model.layers.0.self_attn.q_proj.weight"  # the backbone trained too (LoRA: merged into the export)
    assert (two[key] - start.state_dict()[key]).abs().max().item() > 1e-4
