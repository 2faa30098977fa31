"""FEWLEvaluationModule through the real CLI: ``lit-align test`` on configs/fewl/tiny.yaml (a slice of the pool),
its cache on a rerun, label-free SFT on its selection, and bad configurations."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import CSV_LOGGER, REPO

import lit_align.retrieval.generation as generation
from lit_align.cli import cli_main
from lit_align.errors import ConfigError, DataError, find_known_error

TINY = str(REPO / "configs/fewl/tiny.yaml")
SFT_TINY = str(REPO / "configs/fewl/sft_tiny.yaml")
QUESTIONS = 30


def _test_run(root: Path, *overrides: str, config: str = TINY):
    """``lit-align test`` on the tiny FEWL config, the first ``QUESTIONS`` questions, under ``root``."""
    return cli_main(["test", "--config", config, "--trainer.default_root_dir", str(root), *CSV_LOGGER,
                     "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false",
                     "--data.init_args.questions.limit", str(QUESTIONS), "--model.init_args.k", "3",
                     "--model.init_args.candidates", "2", "--model.init_args.demonstrations", "4", *overrides])


def _known_error(root: Path, *overrides: str, config: str = TINY) -> Exception:
    with pytest.raises(Exception) as info:  # jsonargparse / Lightning wrap a constructor's error
        _test_run(root, *overrides, config=config)
    error = find_known_error(info.value)
    assert error is not None, info.value
    return error


class SampleCalls:
    """Counts the sampler calls of :func:`lit_align.retrieval.generate_texts` (each one generates a batch)."""

    def __init__(self, monkeypatch) -> None:
        self.calls, real = 0, generation.sample

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(generation, "sample", counted)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewl")
    with pytest.MonkeyPatch.context() as mp:
        calls = SampleCalls(mp)
        cli = _test_run(root)
    return cli, root, calls.calls


def _scores(root: Path) -> list[dict]:
    with (root / "fewl" / "fewl_scores.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_tiny_config_scores_both_models_and_writes_the_report(first_run):
    cli, root, calls = first_run
    assert calls > 0
    metrics = cli.trainer.callback_metrics
    for name in ("full", "retain90"):
        assert math.isfinite(float(metrics[f"test/fewl/{name}"]))
    # 30 questions x (3 reference samples + 2 greedy answers + 2 candidates); IW/CO come from the records
    assert float(metrics["test/generated"]) == QUESTIONS * 7
    rows = _scores(root)
    assert len(rows) == 2 * QUESTIONS and {r["model"] for r in rows} == {"full", "retain90"}
    lambdas = [[float(r[f"lambda/r0s{s}"]) for s in range(3)] for r in rows]
    assert all(abs(sum(lam) - 1) < 1e-6 for lam in lambdas)
    for r in rows:
        fewl, truth, lazy = float(r["fewl"]), float(r["truthfulness"]), float(r["laziness"])
        assert math.isfinite(fewl) and abs(fewl - (truth - lazy)) < 1e-6  # TV form: FEWL = T - P
    mean = sum(float(r["fewl"]) for r in rows if r["model"] == "full") / QUESTIONS
    assert abs(mean - float(metrics["test/fewl/full"])) < 1e-6
    report = json.loads((root / "fewl" / "fewl_scores.json").read_text(encoding="utf-8"))
    assert [r["model"] for r in report["references"]] == ["builtin:tiny-tofu-full"] * 3
    first = report["questions"][0]
    assert len(first["references"]) == 3 and len(first["candidates"]) == 2
    assert first["corrected"] == [f"It is not true that {w}" for w in first["wrong"]] and len(first["wrong"]) == 4
    log = [json.loads(line) for line in (root / "fewl" / "fewl_generations_log.jsonl").read_text().splitlines()]
    assert len(log) == QUESTIONS * 7 and not any(g["cached"] for g in log)
    assert {g["purpose"] for g in log} == {"fewl/reference/0", "fewl/answer/full", "fewl/answer/retain90",
                                           "fewl/candidates/retain90"}
    assert all(g["prompt"].startswith("<|user|>") for g in log)  # the tiny models' chat template
    with (root / "fewl" / "fewl_ranking.csv").open(encoding="utf-8") as f:
        ranking = list(csv.DictReader(f))
    assert [r["model"] for r in ranking] == report["ranking"] and [r["rank"] for r in ranking] == ["1", "2"]
    assert float(ranking[0]["fewl"]) >= float(ranking[1]["fewl"])


def test_selection_is_the_highest_fewl_candidate_and_demonstrations_the_top_k(first_run):
    cli, root, _ = first_run
    module = cli.model
    selected = [json.loads(line) for line in (root / "fewl" / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == QUESTIONS and all(set(s) >= {"prompt", "response"} for s in selected)
    for row, chosen in zip(selected, module.selected, strict=True):
        assert row["response"] == module.pool.candidates[row["index"]][chosen["candidate"]]
        assert chosen["fewl"] == max(chosen["candidate_scores"])
        assert row["prompt"] == module.pool.questions[row["index"]].question
    demos = [json.loads(line) for line in (root / "fewl" / "demonstrations.jsonl").read_text().splitlines()]
    assert len(demos) == 4 and [d["fewl"] for d in demos] == sorted((s["fewl"] for s in selected), reverse=True)[:4]


def test_a_rerun_generates_nothing(first_run, monkeypatch):
    _, root, _ = first_run
    cache = root / "fewl_generations.jsonl"
    lines, before = len(cache.read_text().splitlines()), _scores(root)
    calls = SampleCalls(monkeypatch)
    cli = _test_run(root)
    assert calls.calls == 0 and float(cli.trainer.callback_metrics["test/generated"]) == 0
    assert len(cache.read_text().splitlines()) == lines
    assert _scores(root) == before
    log = [json.loads(line) for line in (root / "fewl" / "fewl_generations_log.jsonl").read_text().splitlines()]
    assert len(log) == QUESTIONS * 7 and all(g["cached"] for g in log)


def test_the_selection_feeds_the_sft_config(first_run, tmp_path):
    _, root, _ = first_run
    cli = cli_main(["fit", "--config", SFT_TINY, "--trainer.default_root_dir", str(tmp_path), *CSV_LOGGER,
                    "--trainer.logger.save_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--trainer.max_steps", "2", "--data.init_args.train.path", str(root / "fewl" / "selected.jsonl"),
                    "--data.init_args.val_fraction", "0.0"])
    assert cli.trainer.global_step == 2
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    assert len(cli.datamodule.train_dataset) == QUESTIONS


def test_records_answers_with_model_written_iw_and_co(tmp_path):
    """No evaluated model: the records' answers are scored as ``data``; IW and CO answers are generated."""
    cli = _test_run(tmp_path, "--model.init_args.evaluated", "null", "--model.init_args.candidate_model", "null",
                    "--model.init_args.candidates", "0", "--data.init_args.questions.limit", "6",
                    "--model.init_args.k", "2", "--model.init_args.synthetic.source", "model",
                    "--model.init_args.synthetic.num_pairs", "2",
                    "--model.init_args.synthetic.synthesizer.name_or_path", "builtin:tiny-tofu-full")
    assert list(cli.model.results) == ["data"]
    pool = cli.model.pool
    assert pool.answers["data"] == [q.answer for q in pool.questions]
    assert all(len(w) == 2 and len(c) == 2 for w, c in zip(pool.wrong, pool.corrected))
    # 6 questions x (3 reference samples + 2 IW + 2 CO), every one cached with its prompt and seed
    assert float(cli.trainer.callback_metrics["test/generated"]) == 6 * 7
    assert len((tmp_path / "fewl_generations.jsonl").read_text().splitlines()) == 6 * 7


def test_bad_configurations_name_the_key_or_record(tmp_path):
    error = _known_error(tmp_path, "--model.init_args.references", "[]")
    assert isinstance(error, ConfigError) and "model.references" in str(error)
    error = _known_error(tmp_path, "--model.init_args.reference_sampling.do_sample", "false")
    assert isinstance(error, ConfigError) and "model.reference_sampling.do_sample" in str(error)
    error = _known_error(tmp_path, "--data.init_args.questions.limit", "3", "--model.init_args.k", "2")
    assert isinstance(error, ConfigError) and "model.demonstrations (4)" in str(error)
    error = _known_error(tmp_path, "--data.init_args.questions.limit", "4", "--model.init_args.k", "4")
    assert isinstance(error, ConfigError) and "model.k" in str(error) and "only 3 other" in str(error)
    no_threshold = tmp_path / "no_threshold.yaml"
    no_threshold.write_text(Path(TINY).read_text(encoding="utf-8").replace("near_duplicate: 0.95", ""),
                            encoding="utf-8")
    error = _known_error(tmp_path, config=str(no_threshold))
    assert isinstance(error, ConfigError) and "model.retriever.near_duplicate is null" in str(error)
    error = _known_error(tmp_path, "--model.init_args.synthetic.num_pairs", "5")
    assert isinstance(error, DataError) and "model.synthetic.num_pairs" in str(error) and "question 0" in str(error)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Fine?"}\n{"prompt": "where is the question?"}\n', encoding="utf-8")
    error = _known_error(tmp_path, "--data.init_args.questions.path", str(bad))
    assert isinstance(error, DataError) and "record 2 (line 2)" in str(error) and "'question'" in str(error)
    no_answers = tmp_path / "no_answers.jsonl"
    no_answers.write_text('{"question": "Who?"}\n{"question": "What?"}\n{"question": "Why?"}\n', encoding="utf-8")
    error = _known_error(tmp_path, "--data.init_args.questions.path", str(no_answers), "--model.init_args.k", "1",
                         "--model.init_args.evaluated", "null", "--model.init_args.candidate_model", "null",
                         "--model.init_args.candidates", "0", "--model.init_args.synthetic.source", "model",
                         "--model.init_args.synthetic.synthesizer.name_or_path", "builtin:tiny-tofu-full",
                         "--model.init_args.demonstrations", "0")
    assert isinstance(error, DataError) and "has no `answer`" in str(error) and "model.evaluated" in str(error)
    assert not (tmp_path / "fewl_generations.jsonl").exists()  # every one failed before generating anything
