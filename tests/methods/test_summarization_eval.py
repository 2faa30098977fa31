"""SummarizationEvaluationModule through the real CLI: ``lit-align test`` on configs/eval/summarization/tiny.yaml
writes the model x task x {0, 3}-shot table; a rerun reads every summary from the generation cache; an HF judge
whose replies are not JSON is counted, not fatal; bad input (a record without a reference or an article, k-shot with
too few train articles) is a clear error before any model is loaded."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import CSV_LOGGER, REPO, SampleCalls
from tiny_bert import save_tiny_bert

import lit_align.retrieval.generation as generation
from lit_align.cli import cli_main
from lit_align.errors import find_known_error
from lit_align.methods.summarization_eval import SummarizationEvaluationModule, SummaryMetricsConfig, model_names
from lit_align.models import ModelSpec

TINY = str(REPO / "configs/eval/summarization/tiny.yaml")
MODELS = ("tofu-full", "tofu-retain90")


def _test_run(root: Path, *overrides: str, logger: bool = True):
    """``lit-align test`` of the tiny config under ``root``; with ``logger`` false, the default (offline W&B) one."""
    logging = [*CSV_LOGGER, "--trainer.logger.save_dir", str(root)] if logger else []
    return cli_main(["test", "--config", TINY, "--trainer.default_root_dir", str(root), *logging,
                     "--trainer.enable_progress_bar", "false", *overrides])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("summ")
    with pytest.MonkeyPatch.context() as mp:
        calls = SampleCalls(mp)
        cli = _test_run(root)
    return cli, root, calls.calls


def _table(root: Path) -> list[dict]:
    with (root / "summarization" / "summarization_table.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_tiny_config_writes_the_table_for_both_shot_settings(first_run):
    cli, root, calls = first_run
    rows = _table(root)
    assert {(r["model"], r["task"], r["shots"]) for r in rows} == {(m, "tiny_news", k) for m in MODELS
                                                                   for k in ("0", "3")}
    for r in rows:
        assert r["articles"] == "8"
        for metric in ("rouge1", "rouge2", "rougeL", "rougeLsum", "length_ratio"):
            low, mean, high = float(r[f"{metric}_low"]), float(r[metric]), float(r[f"{metric}_high"])
            assert math.isfinite(mean) and low <= mean <= high, (metric, r)
        for mode in ("empty", "early_termination", "hit_max_tokens", "copied", "echoed"):
            assert 0 <= int(r[mode]) <= 8
        # review20c #5: hit_max_tokens counts exactly the rows whose cached finish reason is "length"
        outputs = list(cli.model.outputs[(r["model"], r["task"], int(r["shots"]))].values())
        assert {row.finish for row in outputs} <= {"eos", "stop", "length"}
        assert int(r["hit_max_tokens"]) == sum(row.finish == "length" for row in outputs)
        assert all(row.post.hit_max_tokens == (row.finish == "length") for row in outputs)
        assert float(r["mean_demos"]) == float(r["shots"])  # 1,024 prompt tokens: nothing dropped
    assert calls > 0 and cli.model.generated == 2 * 2 * 8
    report = json.loads((root / "summarization" / "summarization_table.json").read_text())
    assert report["header"]["models"] == {"tofu-full": "builtin:tiny-tofu-full",
                                          "tofu-retain90": "builtin:tiny-tofu-retain90"}
    lengths = report["header"]["tasks"]["tiny_news"]["lengths"]
    assert lengths["articles"] == 8 and lengths["article_words_mean"] > lengths["reference_words_mean"] > 0
    metrics = report["header"]["metrics"]
    assert "meteor_score, alpha 0.9" in metrics["meteor"]  # described whether or not WordNet is installed
    from lit_align.metrics.summarization import punkt_available

    assert metrics["sentence_splitter"].startswith("punkt" if punkt_available() else "regex (fallback")
    assert {(f["model"], f["shots"]) for f in report["fewshot_effect"]} == {(m, 3) for m in MODELS}
    articles = [json.loads(line) for line in
                (root / "summarization" / "summarization_articles.jsonl").read_text().splitlines()]
    assert len(articles) == 2 * 2 * 8
    three = [a for a in articles if a["shots"] == 3]
    assert all(len(a["demo_ids"]) == 3 and a["article_id"] not in a["demo_ids"] for a in three)
    assert {"prompt_id", "output", "summary", "empty", "copied", "scores"} <= set(articles[0])
    assert (root / "summarization" / "summarization_rougeL.png").stat().st_size > 0
    blinded = (root / "summarization" / "human_eval_blinded.csv").read_text()
    assert not any(m in blinded for m in MODELS)  # systems are anonymous in the raters' file
    logged = cli.trainer.callback_metrics
    assert math.isfinite(float(logged["test/summ/tofu-full/tiny_news/3shot/rougeL"]))


def test_rerun_reads_every_summary_from_the_cache_and_logs_to_wandb(first_run, tmp_path, monkeypatch,
                                                                      finish_wandb):
    first, root, _ = first_run
    calls = SampleCalls(monkeypatch)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = _test_run(root, "--trainer.callbacks.init_args.dirpath", str(tmp_path / "report"), logger=False)
    assert calls.calls == 0 and cli.model.generated == 0
    assert [r.summary for r in cli.model.rows] == [r.summary for r in first.model.rows]
    assert all(r.cached for r in cli.model.rows)
    assert [r.finish for r in cli.model.rows] == [r.finish for r in first.model.rows]  # stored with the text
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run_dir / "files" / "media" / "table").glob("summarization_table_*.table.json")
    table = json.loads(table.read_text())
    assert len(table["data"]) == 4 and "rougeL_high" in table["columns"]
    assert list((run_dir / "files" / "media" / "images").glob("summarization_table_plot_*.png"))


def test_hf_judge_replies_that_are_not_json_are_counted(first_run, tmp_path):
    """With a tiny HF judge (and BERTScore on a tiny local BERT encoder, layer 1), the evaluated models and the
    judge prompted through their chat templates (the chat path end to end)."""
    _, root, _ = first_run
    judge = ('{"class_path": "lit_align.metrics.judge.HFJudge", "init_args": {"model": "builtin:tiny-tofu-full", '
             '"max_new_tokens": 6, "batch_size": 16, "chat_template": true}}')
    bert = save_tiny_bert(tmp_path / "tiny-bert")
    cli = _test_run(root, "--trainer.logger.save_dir", str(tmp_path), "--model.init_args.judge", judge,
                    "--model.init_args.judge_retries", "1", "--model.init_args.shots", "[0]",
                    "--model.init_args.metrics.bertscore_model", bert, "--model.init_args.metrics.bertscore_layer",
                    "1", "--model.init_args.metrics.bertscore_max_length", "128",
                    "--model.init_args.prompts.chat_template", "true")
    table = cli.model.table
    assert {r["shots"] for r in table} == {0} and len(table) == 2
    for entry in table:  # a tiny Llama trained on Q&A writes no JSON: every summary is a counted failure
        assert entry["judge_failures"] == 8  # summaries never scored
        assert entry["judge_parse_failures"] == entry["judge_attempts"] == 16  # every reply of 2 tries failed
        assert math.isnan(entry["judge_relevance"]) and math.isnan(entry["judge_relevance_low"])
        assert math.isfinite(entry["rougeL"])
        assert entry["bertscore_f1_low"] <= entry["bertscore_f1"] <= entry["bertscore_f1_high"]
    assert all(r.judge is None and r.judge_attempts == 2 for r in cli.model.rows)
    assert cli.model.report_header()["chat_template"] is True
    assert all(r.cached is False for r in cli.model.rows)  # chat prompts differ from the first run's raw ones
    assert cli.model.report_header()["judge"]["model_id"].startswith("builtin:tiny-tofu-full (weights ")


def _known_error(root: Path, *overrides: str) -> Exception:
    with pytest.raises(Exception) as info:  # jsonargparse / Lightning wrap a constructor's error
        _test_run(root, *overrides)
    error = find_known_error(info.value)
    return error if error is not None else info.value


def _task(path: Path, **extra) -> str:
    return json.dumps([{"name": "local", "source": str(path), "n": 2, **extra}])


def test_a_record_without_a_reference_is_a_clear_error(tmp_path):
    """(The loader's own tests cover a missing article; here the error comes through ``lit-align test``.)"""
    path = tmp_path / "news.jsonl"
    records = [{"id": "a", "article": "The mill reopened on Monday.", "reference": "The mill reopened."},
               {"id": "b", "article": "A fair opened."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    error = _known_error(tmp_path, "--data.init_args.tasks", _task(path), "--model.init_args.shots", "[0]")
    assert "reference" in str(error) and "news.jsonl" in str(error), error


def test_k_shot_with_fewer_train_articles_than_k_fails_before_any_model(tmp_path, monkeypatch):
    for split, n in (("test", 2), ("train", 2)):
        (tmp_path / f"news_{split}.jsonl").write_text("".join(
            json.dumps({"id": f"{split}{i}", "article": f"Story {split} {i} happened today.",
                        "reference": f"Story {i}."}) + "\n" for i in range(n)))
    calls = SampleCalls(monkeypatch)
    error = _known_error(tmp_path, "--data.init_args.tasks", _task(tmp_path / "news_{split}.jsonl"))
    assert "model.shots" in str(error) and "local" in str(error), error
    assert calls.calls == 0


def test_an_unavailable_metric_is_skipped_with_its_reason(tmp_path):
    module = SummarizationEvaluationModule(
        {"a": ModelSpec(name_or_path="builtin:tiny-tofu-full")},
        metrics=SummaryMetricsConfig(bertscore_model=str(tmp_path / "no-encoder"), bertscore_layer=1))
    with pytest.warns(UserWarning, match="bertscore is skipped"):
        module._set_up_metrics()
    assert "no-encoder" in module.skipped["bertscore"] and module._bertscore is None


def test_a_model_list_is_named_after_each_source():
    specs = [ModelSpec(name_or_path="builtin:tiny-tofu-full"), ModelSpec(name_or_path="builtin:tiny-tofu-full"),
             ModelSpec(name_or_path="outputs/sft/version_0/checkpoints/last.ckpt"),
             ModelSpec(name_or_path="outputs/dpo/version_0/checkpoints/last.ckpt"),
             ModelSpec(name_or_path="Qwen/Qwen2.5-0.5B-Instruct")]
    assert list(model_names(specs)) == ["tiny-tofu-full", "tiny-tofu-full-2", "sft-version_0-last",
                                      "dpo-version_0-last", "Qwen2.5-0.5B-Instruct"]
    with pytest.raises(ValueError, match="model.models: model name"):
        model_names({"a b": specs[0]})


def test_hit_max_tokens_only_when_no_stop_string_was_reached(tokenizer):
    """A base model writes past the summary into the next "Article:": generation stops at the stop string, so the
    text holds it and did not run out of tokens, even though it is longer than the budget; the summary cut at "\\n\\n"
    mid-sentence is then an early termination. A text with no stop string that fills the budget ran out."""
    from lit_align.data.summarization_postprocess import postprocess_summary
    from lit_align.methods.summarization_eval import ran_out_of_tokens

    stop = ("\n\n", "Article:")
    output = " The mayor said that the harbour\n\nArticle: Prices rose again in the town on Monday"
    assert len(tokenizer(output, add_special_tokens=False)["input_ids"]) > 8
    hit = ran_out_of_tokens(output, stop, tokenizer, max_new_tokens=8)
    assert hit is False
    post = postprocess_summary(output, prompt_text="Article: x\n\nSummary:", article="x", stop=stop,
                               hit_max_tokens=hit)
    assert post.summary == "The mayor said that the harbour" and post.early_termination and not post.hit_max_tokens
    assert ran_out_of_tokens("\n\n The mayor said that the harbour of the town", stop, tokenizer, 8)
    assert not ran_out_of_tokens(" The mayor left.", stop, tokenizer, 30)


def test_sentence_splitter_option_is_checked():
    from lit_align.errors import ConfigError

    assert SummaryMetricsConfig().sentence_splitter == "auto"
    with pytest.raises(ConfigError, match="model.metrics.sentence_splitter"):
        SummaryMetricsConfig(sentence_splitter="spacy")


def test_summary_row_reuses_the_postprocessed_flags(first_run):
    """The row holds post-processing's result (no copy of its fields) and still reads like one flat record."""
    import dataclasses

    from lit_align.data.summarization_postprocess import Postprocessed
    from lit_align.methods.summarization_eval import SummaryRow

    assert not {f.name for f in dataclasses.fields(Postprocessed)} & {f.name for f in dataclasses.fields(SummaryRow)}
    row = first_run[0].model.rows[0]
    assert isinstance(row.post, Postprocessed) and row.summary == row.post.summary and row.empty == row.post.empty
    assert {"summary", "empty", "hit_max_tokens", "copy_precision", "scores"} <= set(row.record())


def test_max_prompt_tokens_beyond_the_model_context_is_a_clear_error(tmp_path, monkeypatch):
    """The tiny models have 2,048 positions: 2,040 prompt tokens leave no room for the summary."""
    calls = SampleCalls(monkeypatch)
    error = _known_error(tmp_path, "--model.init_args.prompts.max_prompt_tokens", "2040", "--model.init_args.shots",
                         "[0]")
    assert "model.prompts.max_prompt_tokens=2040" in str(error) and "2048 positions" in str(error), error
    assert calls.calls == 0


def _stop_point(tokenizer, text: str, prompt_text: str, article: str, stop: tuple[str, ...]) -> str:
    """The text a row has when the sampler's stop test (as generate_texts builds it for the harness) first stops
    it, feeding ``text``'s tokens one step at a time; the whole text when it never stops."""
    import torch

    from lit_align.methods.summarization_eval import summary_stop_view

    view = summary_stop_view([prompt_text], [article])
    stop_when = generation._stop_test(tokenizer, stop, view.content)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in range(1, len(ids) + 1):
        if stop_when(torch.tensor([ids[:n]]), [0]):
            return tokenizer.decode(ids[:n], skip_special_tokens=True)
    return text


def test_generation_stops_only_after_the_summary_behind_a_label_or_an_echo(tokenizer):
    """review20c #1: a "Summary:\\n\\n" preamble or an echoed prompt holds a stop string before the summary; the stop
    test strips them as post-processing does, so the row runs on and the summary is kept (it stopped at the
    preamble, leaving an empty row)."""
    from lit_align.data.summarization_postprocess import postprocess_summary

    stop = ("\n\n", "Article:")
    prompt = "Article: The mayor left the town on Monday.\n\nSummary:"
    article = "The mayor left the town on Monday."
    for output, echoed in (("Summary:\n\nThe mayor left.\n\nArticle: x", False),
                           (prompt + " The mayor left.\n\nArticle: y", True)):
        text = _stop_point(tokenizer, output, prompt, article, stop)
        assert text.rstrip().endswith("The mayor left."), text
        post = postprocess_summary(text, prompt_text=prompt, article=article, stop=stop)
        assert (post.summary, post.empty, post.echoed) == ("The mayor left.", False, echoed)


def test_generate_texts_does_not_stop_while_the_output_repeats_the_prompt(tokenizer):
    """Through generate_texts: a tiny model's own greedy text, given as the prompt the view compares with, holds a
    stop string; the plain test stops there, the summary view (an echo in progress) does not."""
    from conftest import tiny_lm

    from lit_align.methods.summarization_eval import summary_stop_view
    from lit_align.retrieval import GenerationReport, generate_texts
    from lit_align.rollout import SamplingConfig

    model = tiny_lm("qwen2", vocab_size=len(tokenizer), hidden_size=32, seed=0)
    greedy = SamplingConfig(max_new_tokens=12, do_sample=False)
    prompts = ["Human: what is a harbour?\nAI:"]
    full = generate_texts(model, tokenizer, prompts, greedy, seeds=None)[0]
    words = full.split()
    assert len(words) >= 4, full
    stop = (" " + words[1],)
    plain = generate_texts(model, tokenizer, prompts, greedy, seeds=None, stop=stop, stop_generation=True, cut=False)
    report = GenerationReport()
    viewed = generate_texts(model, tokenizer, prompts, greedy, seeds=None, stop=stop, stop_generation=True,
                            cut=False, stop_view=summary_stop_view([full], ["unrelated article"]), report=report)
    assert len(plain[0]) < len(full) and viewed[0] == full
    assert report.cached == [False] and report.generated == 1
