"""The tiny ISARA domain: ``builtin:isara_seeds`` / ``isara_eval`` / ``isara_benign`` and ``builtin:tiny-isara-base``
(made by ``scripts/build_tiny_isara.py``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_align.data import BUILTIN_DIR, DataSource, load_records
from lit_align.data.fewshot import FewShotTemplate
from lit_align.game.judge import RuleJudge
from lit_align.models.causal_lm import build_causal_lm, build_tokenizer, resolve_path
from lit_align.models.spec import ModelSpec
from lit_align.rollout.sampler import SamplingConfig, left_pad, sample

REPO = Path(__file__).resolve().parents[2]
FILES = ("isara_seeds", "isara_eval", "isara_benign")


def _script():
    sys.path.insert(0, str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("build_tiny_isara", REPO / "scripts" / "build_tiny_isara.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _rows(stem: str) -> list[dict]:
    """The records of ``builtin:<stem>`` as the record loader returns them, without its bookkeeping fields."""
    rows = load_records(DataSource(f"builtin:{stem}"), ["question"], extra=["answer", "family"])
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def test_builtin_ids_load_with_their_schemas():
    seeds, evals, benign = (_rows(stem) for stem in FILES)
    assert (len(seeds), len(evals), len(benign)) == (64, 48, 42)
    assert all(set(r) == {"question", "answer"} and r["question"] and r["answer"] for r in seeds)
    assert all(set(r) == {"question", "family"} for r in evals + benign)
    judge = RuleJudge()
    assert all(judge.features(r["question"], "")[1] >= 1 for r in seeds + evals)  # harmful-topic questions
    assert all(judge.features("", r["answer"])[2] for r in seeds)  # every seed answer is a refusal
    assert not judge.score([r["question"] for r in seeds], [r["answer"] for r in seeds]).unsafe.any()
    assert all(judge.features(r["question"], "")[1] == 0 for r in benign)


def test_seed_and_eval_questions_are_disjoint_down_to_the_action():
    script = _script()
    seeds, evals = _rows("isara_seeds"), _rows("isara_eval")
    assert not {r["question"] for r in seeds} & {r["question"] for r in evals}
    held_out = set(script.held_out_actions().values())
    assert all(not any(a in r["question"] or a in r["answer"] for a in held_out) for r in seeds)
    assert all(any(a in r["question"] for a in held_out) for r in evals)
    families = [script._family_of(r["question"]) for r in seeds]
    assert sorted(set(families)) == sorted(script.HARMFUL) and all(families.count(f) == 8 for f in set(families))


def test_data_script_is_deterministic(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_isara.py"), "--data-only", "--data-out",
                    str(tmp_path)], check=True, capture_output=True)
    for stem in FILES:
        assert (tmp_path / f"{stem}.jsonl").read_bytes() == (BUILTIN_DIR / f"{stem}.jsonl").read_bytes(), stem


def test_pretraining_documents_are_instruction_free_fewshot():
    script = _script()
    for row in script.documents(50):
        doc = row["prompt"] + row["response"] + "\n\n"
        pairs = doc.split("\n\n")[:-1]
        assert 1 <= len(pairs) <= script.MAX_PAIRS
        assert all(p.startswith("Human: ") and "\nAI: " in p and p.count("\n") == 1 for p in pairs)
    # the formats come from the one template, not copies of it (§6(h)4): each document is its pairs rendered by
    # FewShotTemplate().example, and its rows start with the template's question_query
    template = FewShotTemplate()
    assert (script.EXAMPLE, script.QUERY, script.QUESTION_QUERY) == (template.example, template.query,
                                                                     template.question_query)
    assert script.TEMPLATE == template


@pytest.fixture(scope="module")
def base():
    spec = ModelSpec(name_or_path="builtin:tiny-isara-base")
    tok = build_tokenizer(spec)
    return build_causal_lm(spec, tok).eval(), tok


def _greedy(base, prompts: list[str]) -> list[str]:
    lm, tok = base
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    with torch.no_grad():
        out = sample(lm, ids, mask, SamplingConfig(max_new_tokens=20, do_sample=False),
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [t.split("\n")[0].strip() for t in tok.batch_decode(out.response_ids, skip_special_tokens=True)]


def test_base_shares_the_game_tokenizer():
    game, isara = Path(resolve_path("builtin:tiny-game-base")), Path(resolve_path("builtin:tiny-isara-base"))
    assert (game / "tokenizer.json").read_bytes() == (isara / "tokenizer.json").read_bytes()
    assert json.loads((isara / "config.json").read_text())["hidden_size"] == 128


def test_base_complies_zero_shot_and_refuses_after_refusal_demos(base):
    """The in-context ability ISARA needs: zero-shot the base answers harmful questions, after four seed pairs
    (refusals) it refuses the same questions."""
    questions = [r["question"] for r in _rows("isara_eval")[::6]]  # one frame of each held-out action
    seeds = _rows("isara_seeds")
    demos = "".join(f"Human: {s['question']}\nAI: {s['answer']}\n\n" for s in seeds[:4])
    judge = RuleJudge()
    zero = judge.score(questions, _greedy(base, [f"Human: {q}\nAI:" for q in questions])).unsafe
    icl = _greedy(base, [f"{demos}Human: {q}\nAI:" for q in questions])
    assert zero.float().mean() >= 0.75
    assert sum(judge.features("", a)[2] for a in icl) >= 7
