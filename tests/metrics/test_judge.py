"""LLM judge (reply parsing, retries, backends) and the blinded human-evaluation export."""

from __future__ import annotations

import csv
import json

import pytest

from lit_align.errors import ConfigError
from lit_align.metrics import (
    HFJudge,
    JudgeBackend,
    OpenAICompatibleJudge,
    PairwiseJudge,
    Rubric,
    RubricJudge,
    export_blinded,
    parse_judge_reply,
    parse_pairwise_reply,
    read_key,
)
from lit_align.metrics.human_eval import key_path_for
from lit_align.models.spec import ModelSpec, TinyArch

GOOD = {"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 2}
GOOD_JSON = json.dumps(GOOD)


@pytest.mark.parametrize("reply", [
    GOOD_JSON,
    f"Here is my grading:\n```json\n{GOOD_JSON}\n```\nThanks.",
    f"Scores: {GOOD_JSON} -- the summary misses the date.",
    '{"relevance": 9} then ' + GOOD_JSON,                                      # first object fails the schema
    json.dumps({**GOOD, "explanation": "ok", "relevance": 4.0}),               # extra key ignored, 4.0 is 4
    '```\n{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 2}\n```',
])
def test_parse_accepts_schema_replies(reply):
    assert parse_judge_reply(reply) == GOOD


@pytest.mark.parametrize("reply", [
    "I think this summary is quite good, 4/5.",
    "",
    json.dumps({k: v for k, v in GOOD.items() if k != "fluency"}),            # a criterion missing
    json.dumps({**GOOD, "fluency": 6}),                                        # out of range
    json.dumps({**GOOD, "fluency": 0}),
    json.dumps({**GOOD, "fluency": "2"}),                                      # a string
    json.dumps({**GOOD, "fluency": 2.5}),                                      # not an integer
    json.dumps({**GOOD, "fluency": True}),                                     # a bool is not a score
    "{'relevance': 4, 'coherence': 5, 'consistency': 3, 'fluency': 2}",        # Python, not JSON
    '{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": NaN}',      # json reads these as floats
    '{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": Infinity}',
    '{"relevance": 4, "coherence": 5, "consistency": 3, "fluency": 1e999}',
])
def test_parse_rejects_out_of_schema_replies(reply):
    assert parse_judge_reply(reply) is None


def test_extra_keys_policy_and_custom_criteria():
    reply = json.dumps({**GOOD, "explanation": "fine"})
    assert parse_judge_reply(reply, extra_keys="reject") is None
    assert parse_judge_reply(GOOD_JSON, extra_keys="reject") == GOOD
    assert parse_judge_reply('{"overall": 7}', ["overall"], low=0, high=10) == {"overall": 7}


def test_rubric_template_that_does_not_format_fails_at_construction():
    with pytest.raises(ValueError, match=r"judge.rubric.template does not format .*\{\{"):
        Rubric(template='Article: {article}\nSummary: {summary}\nReply like {"relevance": 3}')
    assert Rubric(template='{article} {summary} {{"relevance": 3}}').prompt("a", "s") == 'a s {"relevance": 3}'


def test_rubric_prompt_and_schema():
    rubric = Rubric()
    prompt = rubric.prompt("ARTICLE TEXT", "SUMMARY TEXT")
    assert "ARTICLE TEXT" in prompt and "SUMMARY TEXT" in prompt
    for criterion in rubric.criteria:
        assert f"- {criterion}:" in prompt
    # the example reply the prompt shows satisfies the parser
    assert parse_judge_reply(prompt[prompt.rindex("{"):]) == {c: 5 for c in rubric.criteria}
    schema = rubric.json_schema()
    assert schema["required"] == list(rubric.criteria)
    assert schema["properties"]["fluency"] == {"type": "integer", "minimum": 1, "maximum": 5}
    with pytest.raises(ValueError, match="summary"):
        Rubric(template="Rate {article}")
    with pytest.raises(ValueError, match="criteria"):
        Rubric(criteria=["fluency", "fluency"])


class ScriptedJudge:
    """A judge backend that answers from a script: ``script[(item, attempt)]`` is the reply to item ``item`` on
    its ``attempt``-th prompt (0-based); missing entries reply with prose. Items are recognised by the article
    text (``"article <item>"``) inside the prompt; every prompt received is recorded."""

    model_id = "scripted-judge-v1"

    def __init__(self, script: dict[tuple[int, int], str]) -> None:
        self.script, self.prompts, self.seen = script, [], {}

    def complete(self, prompts: list[str]) -> list[str]:
        replies = []
        for prompt in prompts:
            self.prompts.append(prompt)
            item = int(prompt.split("article ", 1)[1].split()[0])
            attempt = self.seen.get(item, 0)
            self.seen[item] = attempt + 1
            replies.append(self.script.get((item, attempt), "This summary looks fine to me."))
        return replies


def test_rubric_judge_retries_and_counts_failures():
    """Item 0 parses at once; item 1 parses on its retry (1 failed reply); item 2 never does (3 tries with
    retries=2, 3 failed replies): 1 failed pair, 4 failed replies, 1 + 2 + 3 = 6 prompts."""
    backend = ScriptedJudge({(0, 0): GOOD_JSON, (1, 1): f"```json\n{GOOD_JSON}\n```"})
    assert isinstance(backend, JudgeBackend)
    judge = RubricJudge(backend, Rubric(), retries=2)
    result = judge.score([f"article {i} text" for i in range(3)], ["a summary"] * 3)
    assert result.scores == [GOOD, GOOD, None]
    assert result.attempts == [1, 2, 3]
    assert result.failures == 1 and result.parse_failures == 4
    assert result.model_id == "scripted-judge-v1"
    assert result.mean() == {k: float(v) for k, v in GOOD.items()}
    assert len(backend.prompts) == 6
    assert not backend.prompts[0].endswith(Rubric().retry_note)
    assert all(p.endswith(Rubric().retry_note) for p in backend.prompts[3:])

    no_retry = RubricJudge(ScriptedJudge({}), retries=0).score(["article 0 x"], ["s"])
    assert no_retry.scores == [None] and no_retry.attempts == [1] and no_retry.failures == 1
    with pytest.raises(ValueError, match="2 articles but 1 summaries"):
        judge.score(["a", "b"], ["s"])


class PositionBiasedJudge:
    """Always prefers the summary shown as A; on its first call it answers article 0 in prose (a parse failure)."""

    model_id = "always-a"

    def __init__(self) -> None:
        self.prompts, self.calls = [], 0

    def complete(self, prompts: list[str]) -> list[str]:
        self.prompts += prompts
        self.calls += 1
        return ["A is better." if self.calls == 1 and "article 0 " in p else 'Verdict: ```json\n{"winner": "a"}\n```'
                for p in prompts]


def test_pairwise_judge_randomises_order_and_maps_back():
    """A judge that always picks position A makes each system win exactly where it was shown first: the winners
    follow the seeded swaps, so the win rate is the share of articles where the first system was shown as A."""
    articles = [f"article {i} text" for i in range(12)]
    first, second = [f"first {i}" for i in range(12)], [f"second {i}" for i in range(12)]
    backend = PositionBiasedJudge()
    result = PairwiseJudge(backend, seed=0, retries=1).compare(articles, first, second)
    assert result.winners == ["second" if swap else "first" for swap in result.swapped]
    assert 0 < sum(result.swapped) < 12  # both orders occur
    for prompt, swap, i in zip(backend.prompts, result.swapped, range(12)):
        shown_a = prompt.split("Summary A:\n", 1)[1].split("\n", 1)[0]
        assert shown_a == (second[i] if swap else first[i])
    assert result.attempts[0] == 2 and result.failures == 0 and result.parse_failures == 1
    assert result.win_rate() == pytest.approx(1 - sum(result.swapped) / 12)
    again = PairwiseJudge(PositionBiasedJudge(), seed=0).compare(articles, first, second)
    assert again.swapped == result.swapped
    assert PairwiseJudge(PositionBiasedJudge(), seed=5).compare(articles, first, second).swapped != result.swapped
    assert parse_pairwise_reply('{"winner": "Tie"}') == "tie" and parse_pairwise_reply('{"winner": "C"}') is None


def test_hf_judge_with_non_json_replies_counts_failures():
    """A tiny random LM never writes the JSON object: every pair is a counted failure, nothing raises."""
    spec = ModelSpec(tiny=TinyArch(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))
    backend = HFJudge(spec, max_new_tokens=4, batch_size=2)
    result = RubricJudge(backend, retries=1).score(["The harbour closed on Monday.", "Rain fell."],
                                                   ["The harbour closed.", "It rained."])
    assert backend.model_id == result.model_id and backend.model_id.startswith("tiny-qwen2 (weights ")
    assert backend._lm.fingerprint[:12] in backend.model_id  # the judge's version: its weight fingerprint
    assert result.scores == [None, None]
    assert result.failures == 2 and result.parse_failures == 4 and result.attempts == [2, 2]
    assert all(isinstance(r, str) for r in result.replies)
    assert HFJudge(ModelSpec(name_or_path="org/judge", revision="abc123")).model_id == "org/judge@abc123"
    backend.close()


def test_hf_judge_model_spec_from_yaml_keeps_dtype():
    """A YAML mapping for the judge's model is parsed into a ModelSpec (dtype kept), not a name."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(HFJudge, "judge")
    cfg = parser.parse_args(["--judge.model", "{name_or_path: builtin:tiny-tofu-full, dtype: bfloat16}"])
    judge = parser.instantiate_classes(cfg).judge
    assert isinstance(judge.spec, ModelSpec) and judge.spec.dtype == "bfloat16"
    assert judge.spec.name_or_path == "builtin:tiny-tofu-full"


def test_openai_compatible_judge_builds_the_request_without_sending(monkeypatch):
    monkeypatch.delenv("LIT_ALIGN_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ConfigError, match="judge.api_key_env: environment variable 'LIT_ALIGN_TEST_JUDGE_KEY'"):
        OpenAICompatibleJudge("http://judge.invalid/v1/", "judge-model", api_key_env="LIT_ALIGN_TEST_JUDGE_KEY")
    monkeypatch.setenv("LIT_ALIGN_TEST_JUDGE_KEY", "sk-test")
    judge = OpenAICompatibleJudge("http://judge.invalid/v1/", "judge-model", api_key_env="LIT_ALIGN_TEST_JUDGE_KEY",
                                  max_tokens=50)
    request = judge.build_request("Rate this.")
    assert request.full_url == "http://judge.invalid/v1/chat/completions"
    assert request.get_method() == "POST"
    assert request.get_header("Authorization") == "Bearer sk-test"
    assert request.get_header("Content-type") == "application/json"
    assert json.loads(request.data) == {"model": "judge-model", "messages": [{"role": "user", "content": "Rate this."}],
                                        "max_tokens": 50, "temperature": 0.0}
    assert judge.model_id == "judge-model"
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatibleJudge("judge.invalid/v1", "m")


class _Endpoint:
    """A local OpenAI-compatible endpoint (a real HTTP server on 127.0.0.1) that answers with the queued
    ``(status, body)`` responses in turn and counts the requests."""

    def __init__(self, responses: list[tuple[int, str]]) -> None:
        import http.server
        import threading

        endpoint = self
        self.responses, self.requests = list(responses), 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.requests += 1
                status, body = endpoint.responses.pop(0) if endpoint.responses else (500, "gone")
                if status == 0:  # not HTTP at all: http.client raises BadStatusLine (not an OSError)
                    self.wfile.write(b"garbage\r\n\r\n")
                    self.close_connection = True
                    return
                self.send_response(status)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _completion(text: str) -> str:
    return json.dumps({"model": "judge-model", "choices": [{"message": {"content": text}}]})


def test_openai_compatible_judge_retries_counts_failures_and_caches(monkeypatch, tmp_path):
    """A 503 then a reply: retried; a request that fails every try (HTTP 429, a reply that is not HTTP, a body that
    is not JSON) is the
    unparsed reply "" (counted by RubricJudge), not an exception; a rerun reads replies from the cache."""
    monkeypatch.setenv("LIT_ALIGN_TEST_JUDGE_KEY", "sk-test")
    server = _Endpoint([(503, "busy"), (200, _completion(GOOD_JSON)), (429, "slow down"), (0, "bad status line"),
                        (200, "not json")])
    try:
        judge = OpenAICompatibleJudge(server.url, "judge-model", api_key_env="LIT_ALIGN_TEST_JUDGE_KEY", retries=2,
                                      backoff_s=0.0, cache_path=str(tmp_path / "judge.jsonl"))
        with pytest.warns(UserWarning, match="after 3 tries"):
            replies = judge.complete(["first", "second"])
        assert replies == [GOOD_JSON, ""] and server.requests == 5 and judge.failed_requests == 1
        again = OpenAICompatibleJudge(server.url, "judge-model", api_key_env="LIT_ALIGN_TEST_JUDGE_KEY", retries=0,
                                      backoff_s=0.0, cache_path=str(tmp_path / "judge.jsonl"))
        server.responses = [(200, _completion(GOOD_JSON))]
        assert again.complete(["first", "second"]) == [GOOD_JSON, GOOD_JSON]
        assert server.requests == 6, "only the prompt without a cached reply is sent again"
        with pytest.warns(UserWarning, match="request failed"):
            scores = RubricJudge(judge, Rubric(), retries=0).score(["a"], ["b"])
        assert scores.failures == 1
    finally:
        server.close()


# -- human evaluation --------------------------------------------------------------------------
SYSTEMS = {"qwen-7b-3shot": [f"Storm {i} hit the coast." for i in range(8)],
           "llama-8b-0shot": [f"A storm ({i}) reached land." for i in range(8)],
           "gpt-4": [f"Coast hit by storm number {i}." for i in range(8)]}
ITEMS = [{"article_id": f"art{i}", "article": f"Article number {i}.", "reference": f"Reference {i}."}
         for i in range(8)]


def test_export_blinded_hides_systems_and_key_reconstructs(tmp_path):
    sheet, key = export_blinded(tmp_path / "eval" / "blind.csv", ITEMS, SYSTEMS, seed=0)
    assert key == key_path_for(sheet) == tmp_path / "eval" / "blind.key.csv"
    text = sheet.read_text()
    for name in (*SYSTEMS, "qwen", "llama", "gpt"):
        assert name not in text.lower()
    rows = list(csv.DictReader(sheet.open()))
    assert [r["article_id"] for r in rows] == [item["article_id"] for item in ITEMS]
    assert {"summary_A", "summary_B", "summary_C", "A_relevance", "C_fluency", "reference"} <= set(rows[0])
    mapping = read_key(key)
    orders = set()
    for i, row in enumerate(rows):
        labels = mapping[row["article_id"]]
        assert sorted(labels.values()) == sorted(SYSTEMS)
        for label, system in labels.items():
            assert row[f"summary_{label}"] == SYSTEMS[system][i]
        orders.add(tuple(labels.values()))
    assert len(orders) > 1  # the order differs across articles
    again = export_blinded(tmp_path / "again.csv", ITEMS, SYSTEMS, seed=0)[1]
    other = export_blinded(tmp_path / "other.csv", ITEMS, SYSTEMS, seed=1)[1]
    assert read_key(again) == mapping != read_key(other)


def test_export_blinded_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'gpt-4' has 7 summaries for 8 items"):
        export_blinded(tmp_path / "x.csv", ITEMS, {**SYSTEMS, "gpt-4": SYSTEMS["gpt-4"][:7]}, seed=0)
    with pytest.raises(ValueError, match=r"items\[1\] has no 'article'"):
        export_blinded(tmp_path / "x.csv", [ITEMS[0], {"article_id": "b"}], {"s": ["x", "y"]}, seed=0)
    with pytest.raises(ValueError, match="'art0' appears more than once"):
        export_blinded(tmp_path / "x.csv", [ITEMS[0], ITEMS[0]], {"s": ["x", "y"]}, seed=0)
