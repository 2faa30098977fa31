"""The unlearning assessment (others.md §11.1, §11.3) end to end through ``lit-align test`` on the built-in tiny models.

One module-scoped run of ``configs/eval/unlearning_assessment/tiny.yaml`` with the "unlearned" models set to the
original itself, twice (two seeds): every delta (efficacy, attacks, relearning) must be exactly 0, the interval
over seeds collapses onto the mean, and no weight changed.
"""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
import wandb
from conftest import CSV_LOGGER, REPO
from scipy import stats
from torch.utils.data import DataLoader

from lit_align.callbacks import RunCost
from lit_align.cli import cli_main
from lit_align.data.tokenize import SequenceCollator, SequenceExample, encode_prompt, encode_response
from lit_align.errors import ConfigError
from lit_align.methods import SFTModule
from lit_align.methods.unlearning_assessment import (
    UnlearningAssessmentModule,
    embedding_accuracy,
    parameter_changes,
    seed_interval,
)
from lit_align.models import ModelSpec, TinyArch, build_causal_lm, build_tokenizer
from lit_align.retrieval import HashEncoder
from lit_align.unlearning.scoring import ModelScorer, ScoreSettings, encode_record, score_splits

CONFIG = str(REPO / "configs" / "eval" / "unlearning_assessment" / "tiny.yaml")
FULL = '{"name_or_path": "builtin:tiny-tofu-full"}'
GCG = '{"num_steps": 1, "suffix_length": 2, "search_width": 4, "topk": 4}'


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    """The tiny config with unlearned = [original, original] (seeds 3 and 7), 3 records a split, GCG on, logged
    by the CLI's default logger (W&B, offline)."""
    root = tmp_path_factory.mktemp("assessment")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(root / "wandb_root"))
        cli = cli_main(["test", "-c", CONFIG, "--trainer.default_root_dir", str(root),
                        f"--model.init_args.unlearned=[{FULL}, {FULL}]", "--model.init_args.seeds=[3, 7]",
                        "--data.init_args.max_records=3", "--model.init_args.attacks.icl_shots=1",
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
                      "delta", "retrain", "gap_to_retrain", "unlearned[3]", "unlearned[7]"]
    table = {r[0]: dict(zip(header, r)) for r in rows}
    for split in ("in_scope", "hard_in_scope", "out_of_scope", "hard_out_of_scope", "real_authors", "world_facts"):
        assert f"{split}_rouge" in table and f"{split}_nll" in table, split
    expected = {"in_scope_truth_ratio", "mia_auc", "mia_auc_open_unlearning", "forget_quality", "wagle_fa",
                "wagle_ue", "wagle_ut", "jailbreak.rephrase.in_scope_rouge", "jailbreak.role_play.in_scope_rouge",
                "icl_relearn.in_scope_rouge", "gcg.in_scope_rouge", "gcg_success", "relearned.in_scope_rouge",
                "relearn_delta_in_scope_nll", "changed_parameters"}
    assert expected <= set(table), expected - set(table)
    assert any(m.startswith("hard_in_scope.") for m in table)  # per kind of hard in-scope question
    for metric, row in table.items():
        if metric.startswith("changed_"):
            assert row["original"] is None and row["unlearned"] == 0.0, metric
            continue
        assert row["unlearned[3]"] == row["unlearned[7]"] == row["original"], metric
        assert row["delta"] == 0.0, metric
        assert row["unlearned_std"] == 0.0 and row["unlearned_ci_low"] == row["unlearned_ci_high"] == row["unlearned"]
    assert module.hygiene["unlearned[3]"]["changed_tensors"] == 0
    assert module.results["original"]["relearn_delta_in_scope_nll"] != 0.0  # the attack did train (on a copy)
    # retain90 never saw forget10: forget quality against itself is 1, the original's is lower
    assert table["forget_quality"]["retrain"] == 1.0 > table["forget_quality"]["original"]
    assert table["mia_auc_open_unlearning"]["original"] == pytest.approx(1 - table["mia_auc"]["original"])


def test_report_files_name_the_conventions(identity_run):
    module, report, wandb_root = identity_run
    text = report.files["csv"].read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("truth ratio" in c.lower() for c in comments) and any("mia" in c.lower() for c in comments)
    assert any("wagle_ue = mean(1 - wagle_fa, 1 - in_scope_rouge, forget_quality, mia_auc)" in c for c in comments)
    header, *rows = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
    assert header[:3] == ["metric", "original", "unlearned"] and "unlearned_ci_low" in header
    assert len(rows) == len(module.table()[1])
    data = json.loads(report.files["json"].read_text(encoding="utf-8"))
    assert data["conventions"] == module.conventions()
    assert data["efficiency"]["unlearning_runs"]["unlearned[3]"] == "not recorded"
    assert data["efficiency"]["assessment"]["wall_seconds"] > 0 and data["efficiency"]["access"] == "white_box"
    assert data["hygiene"]["unlearned[7]"]["lora_only"] is False
    assert data["splits"]["in_scope"] == 3 and data["models"]["seeds"] == [3, 7]
    (run_dir,) = (wandb_root / "wandb").glob("offline-run-*")  # the same table went to W&B
    (table,) = (run_dir / "files" / "media" / "table").glob("unlearning_assessment_*.table.json")
    logged = json.loads(table.read_text(encoding="utf-8"))
    assert logged["columns"] == header and [r[0] for r in logged["data"]] == [r[0] for r in rows]


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


def test_parameter_changes_counts_one_edited_tensor():
    spec = ModelSpec(tiny=TinyArch(family="llama", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32))
    model = build_causal_lm(spec, build_tokenizer(spec))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        model.state_dict()[name].view(-1)[:3] += 1.0
    changes = parameter_changes(before, model.state_dict())
    total = sum(v.numel() for v in before.values())
    assert changes["changed_tensors"] == 1 and changes["changed_parameters"] == 3
    assert changes["changed_share"] == pytest.approx(3 / total)
    assert changes["modules_touched"] == ["model.layers.0.mlp.down_proj"] and changes["lora_only"] is False
    adapter = {**before, "model.layers.0.mlp.down_proj.lora_A.weight": torch.ones(2, 2)}
    lora = parameter_changes(before, adapter)
    assert lora["lora_only"] is True and lora["changed_tensors"] == 0 and lora["added"] == [
        "model.layers.0.mlp.down_proj.lora_A.weight"]


def test_seed_interval_is_the_student_t_interval():
    values = [0.2, 0.5, 0.4, 0.9]
    mean, low, high, std = seed_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=stats.sem(values))
    assert mean == pytest.approx(0.5) and (low, high) == pytest.approx(ref) and std == pytest.approx(stats.tstd(values))
    one = seed_interval([0.3])
    assert one[0] == 0.3 and all(math.isnan(v) for v in one[1:])


def test_embedding_accuracy_is_closer_to_truth_than_to_every_perturbed_answer():
    enc = HashEncoder(dim=512)
    truths = ["the birthplace is nettleby", "she works as a baker"]
    perturbed = [["the birthplace is fennick", "the birthplace is karnow"], ["she works as a pilot"]]
    assert embedding_accuracy(enc, truths, truths, perturbed) == 1.0
    assert embedding_accuracy(enc, [perturbed[0][0], truths[1]], truths, perturbed) == 0.5
    assert math.isnan(embedding_accuracy(enc, [], [], []))


def test_run_cost_json_is_written_by_a_fit_and_read_by_the_assessment(tmp_path):
    spec = ModelSpec(tiny=TinyArch(family="llama", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=32))
    module = SFTModule(spec)
    cost = RunCost()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[cost])
    tok = build_tokenizer(spec)
    examples = [SequenceExample(encode_prompt(tok, "Where was Mira born?", False), encode_response(tok, "Nettleby."), 0)]
    trainer.fit(module, train_dataloaders=DataLoader(examples, batch_size=1, collate_fn=SequenceCollator(tok.pad_token_id)))
    data = json.loads((tmp_path / "run_cost.json").read_text(encoding="utf-8"))
    assert data["fit_wall_seconds"] > 0 and data["peak_memory_bytes"] > 0 and data["global_step"] == 1
    assert data["peak_memory_source"].startswith("resource.getrusage")
    assessment = UnlearningAssessmentModule(spec, [spec, spec], unlearned_run_cost=[str(tmp_path / "run_cost.json")] * 2)
    assert assessment._read_cost(1) == data
    assert UnlearningAssessmentModule(spec, spec)._read_cost(0) == "not recorded"
    with pytest.raises(ConfigError, match=r"model.unlearned_run_cost\[0\]: no file"):
        UnlearningAssessmentModule(spec, spec, unlearned_run_cost=str(tmp_path / "nope.json"))


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
