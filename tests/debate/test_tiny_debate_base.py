"""builtin:tiny-debate-base (scripts/build_tiny_debate.py): loads offline and plays a short debate."""

from __future__ import annotations

import torch

from lit_align.data.qa import load_qa
from lit_align.data.records import DataSource
from lit_align.debate.protocol import extract_answer, run_debate
from lit_align.models.causal_lm import build_causal_lm, build_tokenizer
from lit_align.models.spec import ModelSpec
from lit_align.rollout.sampler import SamplingConfig


def test_tiny_debate_base_loads_and_debates() -> None:
    spec = ModelSpec(name_or_path="builtin:tiny-debate-base")
    tok = build_tokenizer(spec)
    lm = build_causal_lm(spec, tok).eval()
    examples = load_qa(DataSource(path="builtin:tiny_qa/val"))[:3]
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.7, top_p=0.9)
    with torch.no_grad():
        transcripts = run_debate(lm, lm, tok, examples, 2, sampling, generator=torch.Generator().manual_seed(0),
                                 max_tries=0, chat_template=False)
    turns = [(tr.example, t) for tr in transcripts for t in tr.turns]
    assert len(turns) == 6
    parsed = [extract_answer(t.actor_response, ex) is not None for ex, t in turns]
    assert sum(parsed) / len(parsed) > 0.5, [t.actor_response for _, t in turns]
    assert all(t.critic_response for _, t in turns)
