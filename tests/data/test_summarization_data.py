"""Summarisation data (others.md §10(d)1-2,4 and §10(e)): adapters, subsampling, prompts, truncation,
post-processing and the DataModule. Fast: the bundled tiny tokenizer is the only model-side piece."""

from __future__ import annotations

import copy
import csv
import functools
import gzip
import importlib.util
import json
from pathlib import Path

import datasets
import pytest
from lightning.fabric.utilities.apply_func import move_data_to_device

from lit_align.data.fewshot import FewShotTemplate
from lit_align.data.records import BUILTIN_DIR
from lit_align.data.summarization import (
    CNN_DAILYMAIL_REVISION,
    XSUM_REVISION,
    Article,
    ArticleBatch,
    SummarizationDataModule,
    SummarizationTask,
    SummaryPromptConfig,
    articles_from_rows,
    build_summary_prompts,
    hf_source,
    length_stats,
    load_articles,
    postprocess_summary,
    render_prompt,
    subsample,
    truncation_rates,
)
from lit_align.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
TINY = SummarizationTask(name="tiny_news", source="builtin:tiny_news")


@pytest.fixture(scope="module")
def tiny():
    return load_articles(TINY, "test"), load_articles(TINY, "train")


@functools.cache
def _script(name: str):
    """A module of ``scripts/`` (imported in-process: no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- built-in tiny news


def test_tiny_news_is_honest_toy_news(tiny):
    test, train = tiny
    assert (len(train), len(test)) == (24, 24)
    for a in train + test:
        sentences = a.article.count(". ") + 1  # every sentence ends with "." (a quote closes with ', said X.')
        assert 3 <= sentences <= 6 and a.article.endswith("."), a
        lines = a.reference.split("\n")
        assert 1 <= len(lines) <= 3 and all(line.strip() for line in lines)
        towns = [t for t in _script("build_tiny_news").TOWNS if t in a.article]
        assert len(towns) == 1 and towns[0] in lines[0], a  # the first summary line names the lead's town
    train_texts = {a.article for a in train}
    assert not any(a.article in train_texts for a in test)
    assert len({a.id for a in train + test}) == 48


def test_tiny_news_script_reproduces_the_shipped_files(tmp_path):
    _script("build_tiny_news").main(["--out", str(tmp_path)])
    for split in ("train", "test"):
        name = f"tiny_news_{split}.json"
        assert (tmp_path / name).read_bytes() == (Path(str(BUILTIN_DIR)) / name).read_bytes(), name


def test_tokenizer_script_does_not_read_tiny_news():
    assert not any("tiny_news" in name for name in _script("build_tokenizer").TRAINING_FILES)


# --------------------------------------------------------------------------- adapters


def test_cnn_dailymail_and_xsum_are_pinned_hub_sources():
    cnn = SummarizationTask(name="cnn", source="cnn_dailymail", train_limit=50)
    source = hf_source(cnn, "test")
    assert (source.path, source.subset, source.revision, source.limit) == (
        "abisee/cnn_dailymail", "3.0.0", CNN_DAILYMAIL_REVISION, None)
    assert hf_source(cnn, "train").limit == 50  # the demonstration pool is streamed, not downloaded whole
    xsum = SummarizationTask(name="xsum", source="EdinburghNLP/xsum")
    assert (hf_source(xsum, "test").path, hf_source(xsum, "test").revision) == ("EdinburghNLP/xsum", XSUM_REVISION)
    assert "one sentence" in xsum.instruction and xsum.max_new_tokens < cnn.max_new_tokens


def test_hub_rows_map_with_each_dataset_columns():
    """The mapping the hub adapters apply, on in-memory datasets with CNN/DM's and XSum's columns."""
    cnn = datasets.Dataset.from_dict({"article": ["A storm hit the town. Trees fell."], "highlights": ["Storm.\nTrees"],
                                      "id": ["abc"]})
    assert articles_from_rows(cnn, SummarizationTask(name="c", source="cnn_dailymail"), "test") == [
        Article("abc", "A storm hit the town. Trees fell.", "Storm.\nTrees")]
    xsum = datasets.Dataset.from_dict({"document": ["Doc text."], "summary": ["One line."], "id": ["7"]})
    assert articles_from_rows(xsum, SummarizationTask(name="x", source="xsum"), "test") == [
        Article("7", "Doc text.", "One line.")]


def test_newsroom_directory_plain_and_gzip(tmp_path):
    rows = [{"text": "Rain fell on Dunmere.", "summary": "It rained.", "url": "http://n/1"},
            {"text": "A fair opened.", "summary": "Fair.", "url": "http://n/2"}]
    _write_jsonl(tmp_path / "test.jsonl", rows)
    with gzip.open(tmp_path / "dev.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[1]) + "\n")
    task = SummarizationTask(name="nr", source=f"newsroom:{tmp_path}")
    assert load_articles(task, "test") == [Article("http://n/1", "Rain fell on Dunmere.", "It rained."),
                                           Article("http://n/2", "A fair opened.", "Fair.")]
    assert load_articles(task, "validation") == [Article("http://n/2", "A fair opened.", "Fair.")]
    with pytest.raises(FileNotFoundError, match=r"train\.jsonl"):
        load_articles(task, "train")
    from lit_align.data.records import read_jsonl  # the one JSONL reader, gzip included

    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(rows[0]) + "\n{broken\n")
    assert read_jsonl(tmp_path / "dev.jsonl.gz") == [rows[1]]
    with pytest.raises(DataError, match=r"train\.jsonl\.gz:2: invalid JSON"):
        load_articles(task, "train")


def test_local_files_with_keys_and_split_placeholder(tmp_path):
    _write_jsonl(tmp_path / "news_test.jsonl", [{"body": "Body one.", "abstract": "One."}, {"body": "Two.", "abstract": "2"}])
    task = SummarizationTask(name="mine", source=str(tmp_path / "news_{split}.jsonl"), article_key="body",
                             reference_key="abstract")
    assert load_articles(task, "test") == [Article("test-0", "Body one.", "One."), Article("test-1", "Two.", "2")]
    with open(tmp_path / "n.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "article", "reference"], ["x1", "Csv article.", "Csv ref."]])
    (tmp_path / "n.json").write_text(json.dumps([{"id": 3, "article": "Json article.", "reference": "Ref."}]))
    assert load_articles(SummarizationTask(name="c", source=str(tmp_path / "n.csv")), "test") == [
        Article("x1", "Csv article.", "Csv ref.")]
    assert load_articles(SummarizationTask(name="j", source=str(tmp_path / "n.json")), "train") == [
        Article("3", "Json article.", "Ref.")]


@pytest.mark.parametrize(("row", "key"), [({"reference": "r"}, "article"), ({"article": "a"}, "reference"),
                                          ({"article": "  ", "reference": "r"}, "article"),
                                          ({"article": "a", "reference": 3}, "reference")])
def test_record_without_article_or_reference_names_file_record_and_key(tmp_path, row, key):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"article": "fine", "reference": "fine"}, row])
    with pytest.raises(ValueError, match=rf"bad\.jsonl', record 2 \(line 2\).*no {key}: column '{key}'.*{key}_key"):
        load_articles(SummarizationTask(name="bad", source=str(path)), "test")


def test_duplicate_ids_and_unknown_split_are_errors(tmp_path):
    path = _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "article": "a", "reference": "r"},
                                                 {"id": 1, "article": "b", "reference": "s"}])
    with pytest.raises(DataError, match="share the id '1'"):
        load_articles(SummarizationTask(name="d", source=str(path)), "test")
    with pytest.raises(DataError, match="tiny_news/validation"):
        load_articles(TINY, "validation")


def test_task_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"task 'x': n must be an int >= 1"):
        SummarizationTask(name="x", source="builtin:tiny_news", n=0)
    with pytest.raises(ConfigError, match="stop must be a list of non-empty strings"):
        SummarizationTask(name="x", source="builtin:tiny_news", stop=[""])
    with pytest.raises(ConfigError, match="task names must be unique"):
        SummarizationDataModule([TINY, TINY])


# --------------------------------------------------------------------------- subsample and statistics


def test_stratified_subsample_is_seeded_and_covers_every_length_bin(tiny):
    test, _ = tiny
    first = subsample(test, 8, seed=0)
    assert first == subsample(test, 8, seed=0) and len(first) == 8
    assert first != subsample(test, 8, seed=1)
    assert [test.index(a) for a in first] == sorted(test.index(a) for a in first)  # original order kept
    ranked = sorted(test, key=lambda a: (len(a.article.split()), a.id))
    for b in range(4):  # two of each quarter of the length ranking
        assert len(set(ranked[6 * b: 6 * b + 6]) & set(first)) == 2
    assert subsample(test, None, seed=0) == test and subsample(test, 100, seed=0) == test


def test_length_stats_by_hand():
    arts = [Article("a", "one two three four", "one two"), Article("b", "w " * 8, "x\ny")]
    stats = length_stats(arts)
    assert stats["article_words_mean"] == 6 and stats["article_words_median"] == 6
    assert stats["reference_words_mean"] == 2 and stats["reference_sentences_mean"] == 1.5
    assert stats["compression_ratio"] == pytest.approx((4 / 2 + 8 / 2) / 2)


# --------------------------------------------------------------------------- prompts (§10(e))


def test_three_shot_prompt_has_three_demos_never_the_test_item_and_is_seeded(tiny):
    test, train = tiny
    # the test article also sits in the train pool, under another id: excluded by its text too
    pool = train + [Article("copy-of-test", test[0].article, "x"), test[1]]
    config = SummaryPromptConfig(shots=3, seed=0)
    prompts = build_summary_prompts(TINY, test, pool, config)
    for article, prompt in zip(test, prompts):
        assert len(prompt.demo_ids) == 3 and len(set(prompt.demo_ids)) == 3
        assert prompt.text.count("Article: ") == 4 and prompt.text.count("Summary:") == 4
        assert article.id not in prompt.demo_ids
        assert prompt.text.count(article.article) == 1 and prompt.text.endswith(f"{article.article}\nSummary:")
    assert not any("copy-of-test" in p.demo_ids for p in prompts[:1])
    assert build_summary_prompts(TINY, test, pool, config) == prompts
    other = build_summary_prompts(TINY, test, pool, SummaryPromptConfig(shots=3, seed=1))
    assert [p.demo_ids for p in other] != [p.demo_ids for p in prompts]
    zero = build_summary_prompts(TINY, test[:1], [], SummaryPromptConfig())[0]
    assert zero.demo_ids == () and zero.text == f"{TINY.instruction}\n\nArticle: {test[0].article}\nSummary:"


def test_custom_template_and_chat_prompt(tiny, tokenizer):
    test, train = tiny
    template = FewShotTemplate(example="Text: {question}\nTL;DR: {answer}\n\n", query="Text: {question}\nTL;DR:")
    raw = build_summary_prompts(TINY, test[:1], train, SummaryPromptConfig(shots=1, template=template))[0]
    assert raw.text.count("TL;DR:") == 2
    chat = build_summary_prompts(TINY, test[:1], train, SummaryPromptConfig(shots=2, chat_template=True),
                                 tokenizer)[0]
    assert [m["role"] for m in chat.text] == ["user", "assistant", "user", "assistant", "user"]
    assert chat.text[0]["content"].startswith(TINY.instruction) and test[0].article in chat.text[-1]["content"]
    rendered = render_prompt(chat, tokenizer)
    assert rendered.endswith("<|assistant|>\n") and chat.prompt_tokens == len(tokenizer(rendered)["input_ids"])


def test_chat_without_a_chat_template_names_the_key(tiny, tokenizer):
    test, train = tiny
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="prompts.chat_template is true but the tokenizer .* has no chat template"):
        build_summary_prompts(TINY, test[:1], train, SummaryPromptConfig(chat_template=True), bare)


def test_too_few_train_articles_for_k_shot_names_shots_and_task(tiny):
    test, train = tiny
    with pytest.raises(ValueError, match=r"prompts.shots=3 but task 'tiny_news' has only 2 train articles"):
        build_summary_prompts(TINY, test, train[:2], SummaryPromptConfig(shots=3))
    # enough articles in all, but one of the three is the test article itself
    with pytest.raises(ValueError, match=r"shots=3 but task 'tiny_news' has only 2 train articles .* not test"):
        build_summary_prompts(TINY, test[:1], train[:2] + [test[0]], SummaryPromptConfig(shots=3))


def test_no_test_article_is_a_demonstration(tiny):
    """One file for train and test (no ``{split}``): the pool holds the test articles too; none of them (by id or
    by text) is shown as a demonstration, only the other rows."""
    test, train = tiny
    everything = test + train
    evaluated = test[:4]
    prompts = build_summary_prompts(TINY, evaluated, everything + [Article("dup", test[2].article, "r")],
                                    SummaryPromptConfig(shots=3, seed=0))
    shown = {d for p in prompts for d in p.demo_ids}
    assert shown and not shown & ({a.id for a in evaluated} | {"dup"})


def test_prompt_tokens_are_counted_through_the_generator_renderer(tiny, tokenizer):
    """The harness passes its generator's renderer (LoadedModel.render): truncation counts that string."""
    test, train = tiny
    config = SummaryPromptConfig(shots=1, chat_template=True)
    plain = build_summary_prompts(TINY, test[:1], train, config, tokenizer)[0]
    marked = build_summary_prompts(TINY, test[:1], train, config, tokenizer,
                                   render=lambda text: "BOS BOS " + render_prompt(text, tokenizer))[0]
    extra = len(tokenizer("BOS BOS " + render_prompt(plain, tokenizer))["input_ids"]) - plain.prompt_tokens
    assert extra > 0 and marked.prompt_tokens == plain.prompt_tokens + extra


def test_truncation_policies_and_rates(tiny, tokenizer):
    test, train = tiny
    articles = test[:6]
    full = build_summary_prompts(TINY, articles, train, SummaryPromptConfig(shots=3), tokenizer)
    limit = sorted(p.prompt_tokens for p in full)[2]  # half of the six prompts are longer
    too_long = sum(p.prompt_tokens > limit for p in full)
    tail = build_summary_prompts(TINY, articles, train, SummaryPromptConfig(shots=3, max_prompt_tokens=limit),
                                 tokenizer)
    drop = build_summary_prompts(TINY, articles, train, SummaryPromptConfig(
        shots=3, max_prompt_tokens=limit, truncation="drop_demonstrations"), tokenizer)
    for prompts in (tail, drop):
        assert all(p.prompt_tokens <= limit for p in prompts)
    assert truncation_rates(tail) == {"article_truncated_rate": too_long / 6, "demos_dropped_rate": 0.0,
                                      "mean_demos": 3.0}
    for p, f, a in zip(tail, full, articles):
        assert p.demo_ids == f.demo_ids
        if p.article_truncated:  # a word prefix of the article, the longest that fits
            kept = " ".join(a.article.split()[: p.article_words_kept])
            assert p.text.endswith(f"{kept}\nSummary:") and p.article_words_kept < len(a.article.split())
            longer = " ".join(a.article.split()[: p.article_words_kept + 1])
            assert len(tokenizer(p.text[: -len(f"{kept}\nSummary:")] + f"{longer}\nSummary:")["input_ids"]) > limit
    rates = truncation_rates(drop)
    assert rates["demos_dropped_rate"] == too_long / 6 and rates["article_truncated_rate"] == 0.0
    for p, f in zip(drop, full):
        assert p.demo_ids == f.demo_ids[: len(p.demo_ids)] and p.demos_dropped == 3 - len(p.demo_ids)
    # too small even for no demonstrations and one word: a config error naming the key
    with pytest.raises(ConfigError, match="prompts.max_prompt_tokens=5 is too small"):
        build_summary_prompts(TINY, articles[:1], train, SummaryPromptConfig(max_prompt_tokens=5), tokenizer)


@pytest.mark.parametrize("policy", ["article_tail", "drop_demonstrations"])
def test_no_room_for_demonstrations_drops_them_and_cuts_the_tail(tiny, tokenizer, policy):
    """Shorter than the zero-shot prompt: drop_demonstrations runs out of demos and cuts the tail; article_tail
    cannot fit one article word after the demos, so it drops them as a last resort (both recorded)."""
    test, train = tiny
    zero = build_summary_prompts(TINY, test[:1], train, SummaryPromptConfig(), tokenizer)[0]
    p = build_summary_prompts(TINY, test[:1], train, SummaryPromptConfig(
        shots=2, max_prompt_tokens=zero.prompt_tokens - 10, truncation=policy), tokenizer)[0]
    assert (p.demo_ids, p.demos_dropped, p.article_truncated) == ((), 2, True)
    assert p.prompt_tokens <= zero.prompt_tokens - 10


# --------------------------------------------------------------------------- post-processing (§10(d)4, §10(e))

ARTICLE = ("The old stone bridge in Dunmere reopened on Monday after eight months of repairs. Gwen Vale, the town "
           "engineer, cut a ribbon. \"It will last a century,\" said Vale.")
PROMPT = f"Summarize the news article in one sentence.\n\nArticle: {ARTICLE}\nSummary:"
STOP = ["\n\n", "Article:"]


def _post(output: str, **kw):
    return postprocess_summary(output, prompt_text=PROMPT, article=ARTICLE, stop=STOP, **kw)


def test_strips_an_echoed_prompt_and_summary_prefix():
    out = _post(PROMPT + " Dunmere's bridge is open again.\n\nArticle: next story")
    assert (out.summary, out.echoed, out.empty, out.copied) == ("Dunmere's bridge is open again.", True, False, False)
    out = _post(" Summary: Dunmere's bridge is open again after repairs.")
    assert (out.summary, out.echoed) == ("Dunmere's bridge is open again after repairs.", False)
    out = _post("**TL;DR:** Dunmere's bridge reopened.")
    assert out.summary == "Dunmere's bridge reopened."
    # the article's first sentence echoed, then a summary label
    out = _post("The old stone bridge in Dunmere reopened on Monday after eight months of repairs. Gwen Vale...\n"
                "Summary: The bridge is open.")
    assert (out.summary, out.echoed) == ("The bridge is open.", True)


def test_summary_label_counts_only_at_a_line_start():
    """"summary -" inside a repeated lead is text, not a label: only a label that starts a line ends an echo."""
    output = ("The old stone bridge in Dunmere reopened on Monday after eight months of repairs. A summary - the "
              "town engineer said - of the works was published.")
    out = _post(output)
    assert out.summary == output and not out.echoed


def test_partial_article_echo_and_a_new_article():
    out = _post("Article: The old stone bridge in Dunmere")  # echo cut short by the token budget
    assert (out.summary, out.echoed, out.empty) == ("", True, True)
    out = _post("Article: Rain fell on Tessby.\nSummary: Rain.")  # the model started another article
    assert (out.summary, out.echoed, out.empty) == ("", False, True)


def test_detects_empty_outputs():
    for output in ("", "   \n", "Summary:", "\n\nArticle: another article", PROMPT):
        out = _post(output)
        assert out.empty and out.summary == "" and not out.early_termination and not out.copied, output


def test_detects_copied_outputs_and_keeps_lead_summaries():
    out = _post(ARTICLE.split(". ")[0] + ".")  # the lead sentence, verbatim: kept, flagged copied
    assert out.copied and not out.echoed and out.copy_precision == 1.0 and out.summary.startswith("The old")
    out = _post("A storm flooded the school in another town last year.")
    assert not out.copied and out.copy_precision < 0.5
    assert not _post(ARTICLE.split(". ")[0] + ".", copy_threshold=1.01).copied


def test_early_termination_and_hit_max_tokens():
    assert _post("Dunmere's bridge is open again after").early_termination  # no final punctuation
    assert _post("Bridge open.").early_termination  # fewer than min_words
    assert not _post("Dunmere's bridge is open again.").early_termination
    cut = _post("Dunmere's bridge is open again after", hit_max_tokens=True)
    assert cut.hit_max_tokens and not cut.early_termination
    assert _post("Dunmere's bridge \"reopened.\"").early_termination is False  # closing quote after the full stop
    assert _post("The bridge reopened.\nDrivers crossed it in the first").early_termination  # last line cut
    assert not _post("- Bridge reopens in Dunmere\n- Drivers return").early_termination  # unpunctuated highlights


# --------------------------------------------------------------------------- DataModule


def test_tasks_and_prompt_config_parse_from_yaml():
    """What a `lit-align test` config gives: a task list and a prompt config, through jsonargparse."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SummarizationDataModule, "data")
    parser.add_dataclass_arguments(SummaryPromptConfig, "prompts")
    cfg = parser.parse_string("""
data: {batch_size: 2, tasks: [{name: tiny, source: "builtin:tiny_news", n: 4}, {name: x, source: xsum}]}
prompts: {shots: 3, truncation: drop_demonstrations, template: {example: "A: {question}\\nS: {answer}\\n\\n",
          query: "A: {question}\\nS:"}}
""")
    init = parser.instantiate_classes(cfg)
    assert [t.name for t in init.data.tasks] == ["tiny", "x"] and init.data.tasks[1].revision == XSUM_REVISION
    assert init.prompts.shots == 3 and init.prompts.template.query == "A: {question}\nS:"
    with pytest.raises(ConfigError, match="prompts.truncation must be one of"):
        SummaryPromptConfig(truncation="middle")


def test_datamodule_serves_python_objects_per_task(tmp_path):
    path = _write_jsonl(tmp_path / "local.jsonl", [{"article": f"Article {i}.", "reference": "R."} for i in range(5)])
    dm = SummarizationDataModule([SummarizationTask(name="tiny_news", source="builtin:tiny_news", n=6, seed=3),
                                  SummarizationTask(name="local", source=str(path))], batch_size=4)
    dm.setup("test")
    assert len(dm.test_articles("tiny_news")) == 6 and len(dm.train_articles("tiny_news")) == 24
    assert dm.test_articles("tiny_news") == subsample(load_articles(TINY, "test"), 6, 3)
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [4, 4, 3]
    items = [item for b in batches for item in b]
    assert [i["task"] for i in items] == ["tiny_news"] * 6 + ["local"] * 5
    assert all(isinstance(i["article"], Article) for i in items)
    moved = move_data_to_device(batches[0], "cpu")  # Lightning's transfer leaves the frozen articles alone
    assert isinstance(moved, ArticleBatch) and moved[0]["article"] is batches[0][0]["article"]
    assert dm.stats("local")["articles"] == 5
