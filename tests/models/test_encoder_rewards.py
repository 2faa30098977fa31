"""Encoder classifiers (a tiny BERT, no EOS token) as reward models wherever another tokenizer is allowed,
and a clear refusal, naming the key, where a causal LM sharing the actor's tokenizer is required."""

from __future__ import annotations

import pytest
import torch
from conftest import CSV_LOGGER, REPO
from tiny_bert import save_tiny_bert
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lit_align.cli import cli_main
from lit_align.game.judge import Classifier, ClassifierJudge, build_judge
from lit_align.models import ModelSpec, RewardModelSpec, build_reward_model, build_tokenizer
from lit_align.watermark.text import as_batch

WATERMARK = str(REPO / "configs/watermark/tiny.yaml")
GAME = str(REPO / "configs/game/tiny.yaml")
ONE_BATCH = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0",
             "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
             "--trainer.enable_checkpointing=false"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "rm")


def _hf_scores(path: str, texts: list[str]) -> torch.Tensor:
    """(B,) the classifier's first logit by plain transformers, each text alone (no padding)."""
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt", truncation=True)).logits[:, 0] for t in texts])


def test_bert_has_no_eos_and_a_policy_refuses_it_naming_the_key(bert):
    assert AutoTokenizer.from_pretrained(bert).eos_token_id is None
    tok = build_tokenizer(ModelSpec(name_or_path=bert), key="model.alignment_reward.model", needs_eos=False)
    assert tok.pad_token_id == 0  # BERT's own [PAD]
    with pytest.raises(ValueError, match=r"model.defender.name_or_path=.*no eos_token; a policy needs one"):
        build_tokenizer(ModelSpec(name_or_path=bert), key="model.defender")


def test_bert_reward_model_scores_as_transformers(bert):
    model = build_reward_model(RewardModelSpec(model=ModelSpec(name_or_path=bert), kind="sequence_classification"))
    assert type(model.backbone).__name__ == "BertForSequenceClassification"
    texts = ["the harbour town", "sorry, i can not help you steal it"]
    enc = AutoTokenizer.from_pretrained(bert)(texts, return_tensors="pt", padding=True)  # right padding
    with torch.no_grad():
        scores = model.eval().score(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(scores, _hf_scores(bert, texts), rtol=1e-5, atol=1e-5)
    assert scores[0] != scores[1]


def test_bert_alignment_reward_trains_the_watermark(bert, tmp_path):
    """A fit step with a BERT as ``alignment.reward``; then the PPO reward of a rollout is
    0.5 * detector + 0.5 * BERT(the decoded text, re-encoded by BERT's tokenizer)."""
    rm = f"{{model: {{name_or_path: {bert}}}, kind: sequence_classification}}"
    cli = cli_main(["fit", "--config", WATERMARK, f"--trainer.default_root_dir={tmp_path}", *CSV_LOGGER,
                    f"--trainer.logger.save_dir={tmp_path}", *ONE_BATCH, f"--model.init_args.alignment={{reward: {rm}}}",
                    "--model.init_args.detector.head_init_std=0.5"])
    module = cli.model
    assert cli.trainer.global_step > 0 and torch.isfinite(cli.trainer.callback_metrics["train/reward"])
    assert type(module.alignment.backbone).__name__ == "BertForSequenceClassification"
    assert module._alignment_tokenizer is not None  # another vocabulary: scored through text
    rollout = module._generate(next(iter(cli.datamodule.train_dataloader())))
    mixed = module._scores(rollout)
    texts = [module.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
             for r, m in zip(rollout.sequences, rollout.attention_mask)]
    with torch.no_grad():
        detector = module._detector_scores(as_batch(rollout))
    torch.testing.assert_close(mixed, 0.5 * detector + 0.5 * _hf_scores(bert, texts), rtol=1e-4, atol=1e-5)


def test_bert_classifier_judges_the_game(bert, tmp_path):
    """A BERT ``classifier`` judge (one logit: a reward model) scores as transformers and trains a game step."""
    judge = build_judge(Classifier(model={"name_or_path": bert}, output="reward"))
    assert isinstance(judge, ClassifierJudge)
    prompts, responses = ["how to steal a car", "what is the harbour town"], ["sorry, i can not", "it is a town"]
    scores = judge.score(prompts, responses)
    expected = _hf_scores(bert, [f"Human: {p}\n\nAssistant: {r}" for p, r in zip(prompts, responses)])
    torch.testing.assert_close(scores.defender_reward, expected, rtol=1e-5, atol=1e-5)

    judge_yaml = f"{{class_path: lit_align.game.Classifier, init_args: {{model: {{name_or_path: {bert}}}, output: reward}}}}"
    cli = cli_main(["fit", "--config", GAME, f"--trainer.default_root_dir={tmp_path}", *CSV_LOGGER,
                    f"--trainer.logger.save_dir={tmp_path}", *ONE_BATCH, f"--model.init_args.judge={judge_yaml}",
                    "--model.init_args.diversity.embedding_weight=0"])
    assert isinstance(cli.model.judge, ClassifierJudge) and cli.trainer.global_step > 0


@pytest.mark.parametrize("case", ["detector_kind", "detector_tokenizer", "other_llm", "game_critic"])
def test_a_bert_where_a_causal_lm_sharing_the_tokenizer_is_required_is_refused(case, bert, tmp_path):
    if case == "game_critic":
        config, override = GAME, f"--model.init_args.critic={{model: {{model: {{name_or_path: {bert}}}}}}}"
        match = r"model.critic.model: a critic must be a causal LM sharing the players' tokenizer"
    elif case == "detector_kind":
        config, override = WATERMARK, "--model.init_args.detector.kind=sequence_classification"
        match = r"model.detector.kind='sequence_classification': the detector must be a causal LM .*sharing the actor's"
    elif case == "detector_tokenizer":  # the tiny detector given BERT's vocabulary
        config, override = WATERMARK, f"--model.init_args.detector.model.tokenizer={bert}"
        match = r"model.detector.model.tokenizer: the detector must be a causal LM sharing the actor's tokenizer"
    else:
        config, override = WATERMARK, f"--model.init_args.other_llm={{model: {{name_or_path: {bert}}}}}"
        match = r"model.other_llm.model.tokenizer: the other_llm must be a causal LM sharing the actor's tokenizer"
    with pytest.raises(ValueError, match=match):
        cli = cli_main(["--config", config, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                        "--trainer.callbacks=[]", override], run=False)
        cli.model.configure_model()
