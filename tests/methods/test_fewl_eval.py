"""FEWLEvaluationModule through the real CLI: ``lit-align test`` on configs/fewl/tiny.yaml (a slice of the pool),
its cache on a rerun, label-free SFT on its selection, in-context demonstrations, limited runs, and bad
configurations. The later runs share the first run's generation cache, so they generate only what they change."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import CSV_LOGGER, REPO, SampleCalls

from lit_align.callbacks.reporting import write_jsonl
from lit_align.cli import cli_main
from lit_align.data import DataSource
from lit_align.data.fewl import load_fewl_questions
from lit_align.errors import ConfigError, DataError, find_known_error
from lit_align.methods.fewl_eval import answer_text

TINY = str(REPO / "configs/fewl/tiny.yaml")
SFT_TINY = str(REPO / "configs/fewl/sft_tiny.yaml")
QUESTIONS = 30
#: unit tests find neighbours with hashed words (no model to load); tiny.yaml uses the real all-MiniLM-L6-v2
HASH_ENCODER = ("--model.init_args.retriever.init_args.encoder",
                '{"class_path": "lit_align.retrieval.HashEncoder", "init_args": {"dim": 512}}')


def _test_run(root: Path, *overrides: str, config: str = TINY):
    """``lit-align test`` on the tiny FEWL config, the first ``QUESTIONS`` questions, under ``root``."""
    return cli_main(["test", "--config", config, "--trainer.default_root_dir", str(root), *CSV_LOGGER,
                     "--trainer.logger.save_dir", str(root), "--trainer.enable_progress_bar", "false",
                     "--data.init_args.questions.limit", str(QUESTIONS), "--model.init_args.k", "3",
                     "--model.init_args.candidates", "2", "--model.init_args.demonstrations", "4",
                     *(HASH_ENCODER if config == TINY else ()), *overrides])


def _known_error(root: Path, *overrides: str, config: str = TINY) -> Exception:
    with pytest.raises(Exception) as info:  # jsonargparse / Lightning wrap a constructor's error
        _test_run(root, *overrides, config=config)
    error = find_known_error(info.value)
    assert error is not None, info.value
    return error


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


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _cached(first_root: Path) -> list[str]:
    """Overrides that read and extend the first run's generation cache."""
    return ["--model.init_args.cache", str(first_root / "fewl_generations.jsonl")]


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
    # the reference is sampled hot enough (tiny.yaml: temperature 1.5) that its samples differ, so the expertise
    # weights are not uniform on some questions
    assert sum(max(lam) - min(lam) > 1e-3 for lam in lambdas) >= 5
    # the intended effect: the slice holds forget10 questions (5-9) that retain90 never saw and makes up answers to
    assert float(metrics["test/fewl/full"]) > float(metrics["test/fewl/retain90"]) + 0.02
    assert float(metrics["test/empty/full"]) == 0 and float(metrics["test/empty/retain90"]) == 0
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
    # the candidates differ (sampled at temperature 1.5) and on some questions a later one wins
    assert sum(len(set(module.pool.candidates[s["index"]])) > 1 for s in selected) >= 5
    assert any(chosen["candidate"] > 0 for chosen in module.selected)
    manifest = json.loads((root / "fewl" / "selection.json").read_text())
    assert manifest["limited"] is False and manifest["questions_scored"] == QUESTIONS == manifest["selected"]
    assert manifest["candidate_model"] == "retain90" and manifest["chat_template"] is True
    assert manifest["pool_sha256"] == cli.datamodule.fingerprint() and len(manifest["config_sha256"]) == 64


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


def test_fewl_selects_the_right_candidate_over_a_wrong_one(first_run, tmp_path):
    """Records with known candidates ``[wrong, right]`` (the wrong one first, so a tie picks it), scored with no
    evaluated model: the right answer wins on most questions (the references are the first run's, from the cache)."""
    _, root, _ = first_run
    questions = load_fewl_questions(DataSource("builtin:fictitious_facts", limit=QUESTIONS))
    pool = tmp_path / "known.jsonl"
    write_jsonl(pool, [{"question": q.question, "answer": q.answer, "wrong": list(q.wrong),
                        "candidates": [q.wrong[0], q.answer]} for q in questions])
    cli = _test_run(tmp_path, "--data.init_args.questions.path", str(pool), "--model.init_args.evaluated", "null",
                    "--model.init_args.candidate_model", "null", "--model.init_args.candidates", "0", *_cached(root))
    assert float(cli.trainer.callback_metrics["test/generated"]) == 0  # the same reference prompts and seeds
    picks = [row["candidate"] for row in cli.model.selected]
    assert len(picks) == QUESTIONS and picks.count(1) >= 0.8 * QUESTIONS, picks


def test_the_first_runs_demonstrations_as_in_context_examples(first_run, tmp_path):
    """Vanilla against FEWL-selected ICL, by FEWL, in two runs: the second puts the first run's demonstrations.jsonl
    before every evaluated question (never a question's own demonstration); only the answers are generated again."""
    cli0, root, _ = first_run
    demos = _jsonl(root / "fewl" / "demonstrations.jsonl")
    cli = _test_run(tmp_path, "--model.init_args.prompt.demonstrations", str(root / "fewl" / "demonstrations.jsonl"),
                    *_cached(root))
    assert float(cli.trainer.callback_metrics["test/generated"]) == 2 * QUESTIONS  # the evaluated answers only
    log = _jsonl(tmp_path / "fewl" / "fewl_generations_log.jsonl")
    for g in log:
        if not g["purpose"].startswith("fewl/answer/"):  # references and candidates stay zero-shot (cached)
            assert g["cached"] and "\nAI:" not in g["prompt"]
            continue
        question = cli.model.pool.questions[g["row"]].question
        shown = [d for d in demos if f"Human: {d['question']}\nAI: {d['answer']}" in g["prompt"]]
        assert [d["question"] for d in shown] == [d["question"] for d in demos if d["question"] != question]
        query = f"Human: {question}\nAI:"  # the question last, in the demonstrations' layout (in the chat turn)
        assert g["prompt"].count(query) == 1 and g["prompt"].rindex("Human: ") == g["prompt"].index(query)
    before = {n: cli0.model.results[n]["fewl"] for n in ("full", "retain90")}
    after = {n: cli.model.results[n]["fewl"] for n in ("full", "retain90")}
    assert before != after and all(math.isfinite(v) for v in after.values())
    manifest = json.loads((tmp_path / "fewl" / "selection.json").read_text())
    assert manifest["prompt_demonstrations"] == str(root / "fewl" / "demonstrations.jsonl")


def test_a_limited_run_generates_only_for_the_scored_questions(first_run, tmp_path):
    """``limit_test_batches: 1`` with 7 questions a batch: answers and candidates for those 7, references for them
    and their neighbours (seeded by pool position, so the first run's cache serves them); the demonstrations are
    checked against the 7 before anything is generated."""
    _, root, _ = first_run
    limited = ["--trainer.limit_test_batches", "1", "--data.init_args.batch_size", "7"]
    error = _known_error(tmp_path, *limited, "--model.init_args.demonstrations", "8")
    assert isinstance(error, ConfigError) and "model.demonstrations (8)" in str(error) and "limited" in str(error)
    assert not (tmp_path / "fewl_generations.jsonl").exists()
    cli = _test_run(tmp_path, *limited, *_cached(root))
    assert float(cli.trainer.callback_metrics["test/generated"]) == 0
    purposes = [g["purpose"] for g in _jsonl(tmp_path / "fewl" / "fewl_generations_log.jsonl")]
    assert purposes.count("fewl/answer/full") == 7 and purposes.count("fewl/candidates/retain90") == 7 * 2
    assert 3 * 7 <= purposes.count("fewl/reference/0") < 3 * QUESTIONS
    manifest = json.loads((tmp_path / "fewl" / "selection.json").read_text())
    assert manifest["limited"] is True and manifest["questions_scored"] == 7 and manifest["selected"] == 7
    assert len(_jsonl(tmp_path / "fewl" / "selected.jsonl")) == 7


def test_a_run_that_selects_nothing_removes_an_earlier_selection(first_run, tmp_path):
    """No stale ``selected.jsonl`` / ``demonstrations.jsonl`` survives a run that selects nothing; the report is
    written even when the config lists no FEWLReport (``lit-align test`` adds one, under the run directory)."""
    _, root, _ = first_run
    for name in ("selected.jsonl", "demonstrations.jsonl"):
        (tmp_path / "fewl").mkdir(exist_ok=True)
        (tmp_path / "fewl" / name).write_text('{"prompt": "old", "response": "stale"}\n', encoding="utf-8")
    cli = _test_run(tmp_path, "--model.init_args.candidates", "0", "--model.init_args.demonstrations", "0",
                    *_cached(root))
    assert not (tmp_path / "fewl" / "selected.jsonl").exists()
    assert not (tmp_path / "fewl" / "demonstrations.jsonl").exists()
    assert json.loads((tmp_path / "fewl" / "selection.json").read_text())["selected"] == 0
    bare = tmp_path / "bare"
    cli = _test_run(bare, "--trainer.callbacks", "[]", *_cached(root))
    run_dir = Path(cli.trainer.log_dir)
    assert run_dir != bare and len(_scores_at(run_dir)) == 2 * QUESTIONS
    assert len(_jsonl(run_dir / "selected.jsonl")) == QUESTIONS


def _scores_at(directory: Path) -> list[dict]:
    with (directory / "fewl_scores.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_empty_answers_are_counted_and_never_selected(first_run, tmp_path):
    """A stop string that opens some answers ("Mira", the name in questions 0-4) empties them: they are counted
    (``test/empty/<model>``), warned about, and no empty candidate is selected (the cache keeps uncut text, so
    nothing is generated)."""
    _, root, _ = first_run
    with pytest.warns(UserWarning, match="generations are empty"):
        cli = _test_run(tmp_path, "--model.init_args.prompt.stop", '["\\n", "Mira"]', *_cached(root))
    metrics = cli.trainer.callback_metrics
    assert float(metrics["test/generated"]) == 0 and float(metrics["test/empty/full"]) >= 3
    module = cli.model
    assert all(s["answer"] for s in module.selected)
    assert len(module.selected) + len(module.skipped_empty) == QUESTIONS
    assert all(not any(module.pool.candidates[i]) for i in module.skipped_empty)


def test_answer_text_strips_leading_whitespace_before_cutting():
    assert answer_text("\nMira was born in Nettleby.\nQuestion: next", ["\n"]) == "Mira was born in Nettleby."
    assert answer_text("  It rains. ", ["\n"]) == "It rains." and answer_text("\n\n", ["\n"]) == ""


def test_report_files_are_replaced_atomically(tmp_path):
    """A write that fails midway leaves the previous file whole (and no temporary file)."""
    path = tmp_path / "selected.jsonl"
    write_jsonl(path, [{"prompt": "p", "response": "r"}] * 3)
    with pytest.raises(TypeError):
        write_jsonl(path, [{"prompt": "p", "response": "new"}, {"prompt": object()}])
    assert _jsonl(path) == [{"prompt": "p", "response": "r"}] * 3 and [p.name for p in tmp_path.iterdir()] == [
        "selected.jsonl"]


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
    error = _known_error(tmp_path, "--model.init_args.synthetic.source", "model",
                         "--model.init_args.synthetic.synthesizer.name_or_path", "builtin:tiny-tofu-full",
                         "--model.init_args.synthetic.sampling.do_sample", "false")
    assert isinstance(error, ConfigError) and "model.synthetic.sampling.do_sample" in str(error)
    error = _known_error(tmp_path, "--model.init_args.prompt.demonstrations", str(tmp_path / "missing.jsonl"))
    assert isinstance(error, ConfigError) and "model.prompt.demonstrations" in str(error)
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
