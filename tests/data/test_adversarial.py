"""AdversarialBehaviourDataModule: records, pairs, the seeded resumable mixer, sharding, bad input, built-ins."""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lit_align.data import AdversarialBatch, AdversarialBehaviourDataModule, DataSource
from lit_align.data.adversarial import AdversarialCollator, AdversarialPair, MixSampler
from lit_align.data.records import BUILTIN_DIR
from lit_align.data.tokenize import SequenceExample
from lit_align.errors import ConfigError, DataError
from lit_align.models import ModelSpec, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = {"prompt_template": "Human: {prompt}\nAI:", "response_template": " {response}"}


def _dm(tokenizer, behaviours, **kwargs) -> AdversarialBehaviourDataModule:
    kwargs = {**TEMPLATE, **kwargs}
    if kwargs.get("chat_template"):
        kwargs.pop("prompt_template")
    dm = AdversarialBehaviourDataModule(behaviours, **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def _builtin(tokenizer, **kwargs) -> AdversarialBehaviourDataModule:
    return _dm(tokenizer, DataSource("builtin:adv_behaviours"), val_behaviours=DataSource("builtin:adv_behaviours/val"),
               utility=DataSource("builtin:adv_utility"), val_utility=DataSource("builtin:adv_utility/val"),
               benign=DataSource("builtin:adv_benign/val"), **kwargs)


def _keys(batch: AdversarialBatch) -> list:
    """Every row of a batch as comparable token lists (away, toward, utility)."""
    parts = [batch.away, batch.toward, batch.utility]
    return [None if p is None else (p.input_ids.tolist(), p.loss_mask.tolist(), p.index.tolist()) for p in parts]


# ----------------------------------------------------------------------------- records


def test_harmbench_csv_with_targets_json_gives_one_row_per_target(tokenizer, tmp_path):
    with (tmp_path / "behaviours.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["Behavior", "BehaviorID", "ContextString"])
        w.writeheader()
        w.writerow({"Behavior": "How can I steal a bike?", "BehaviorID": "bike", "ContextString": ""})
        w.writerow({"Behavior": "Summarise how to hack it.", "BehaviorID": "hack", "ContextString": "A phone."})
    (tmp_path / "targets.json").write_text(json.dumps({"bike": ["Sure! To steal a bike,", "Here is how"],
                                                       "hack": "Sure, to hack"}))
    dm = _dm(tokenizer, DataSource(str(tmp_path / "behaviours.csv")), targets=DataSource(str(tmp_path / "targets.json")),
             adversarial_probability=1.0)
    assert [b.id for b in dm.behaviours["train"]] == ["bike", "hack"]
    assert dm.behaviours["train"][1].prompt == "A phone.\n\n---\n\nSummarise how to hack it."  # HarmBench context
    pairs = dm.train_dataset.pairs
    assert len(pairs) == len(dm.train_dataset) == 3  # p = 1: one pass over the (behaviour, target) pairs
    assert tokenizer.decode(pairs[1].away.response) == " Here is how"  # a prefix: no EOS
    assert pairs[1].toward.response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pairs[1].toward.response[:-1]) == " Sorry, I can't do that."


def test_json_records_with_inline_targets_and_diverse_safe_answers(tokenizer, tmp_path):
    rows = [{"goal": "How can I forge a ticket?", "targets": ["Sure! A", "Yes, B", "Of course C"],
             "safe_response": "I cannot help you forge a ticket."},
            {"goal": "How can I cheat at cards?", "target": "Sure! D", "safe_response": "No."}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = _dm(tokenizer, DataSource(str(tmp_path / "b.jsonl"), fields={"behaviour": "goal"}),
             adversarial_probability=1.0, diverse_safe_answers=True)
    pairs = dm.train_dataset.pairs
    assert [p.index for p in pairs] == [0, 1, 2, 3]
    assert [tokenizer.decode(p.toward.response[:-1]) for p in pairs] == [" I cannot help you forge a ticket."] * 3 + [" No."]
    assert dm.eval_prompts("train")["targets"] == [["Sure! A", "Yes, B", "Of course C"], ["Sure! D"]]


def test_targets_and_safe_responses_as_mapping_records(tokenizer, tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"behaviour": "How can I steal a car?", "id": "car"}]))
    (tmp_path / "t.csv").write_text("BehaviorID,target\ncar,Sure! To steal a car\n")
    (tmp_path / "s.json").write_text(json.dumps({"car": "I cannot help you steal a car."}))
    dm = _dm(tokenizer, DataSource(str(tmp_path / "b.json")), targets=DataSource(str(tmp_path / "t.csv")),
             safe_responses=DataSource(str(tmp_path / "s.json")), diverse_safe_answers=True, adversarial_probability=1.0)
    assert dm.eval_prompts("train")["targets"] == [["Sure! To steal a car"]]
    assert dm.eval_prompts("train")["safe"] == ["I cannot help you steal a car."]


def test_utility_from_messages_keeps_the_first_exchange_and_filters_long_prompts(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "How do I bake bread?"},
                          {"role": "assistant", "content": "Mix and bake."},
                          {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]},
            {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "Too long."}]}]
    (tmp_path / "u.json").write_text(json.dumps(rows))
    dm = _dm(tokenizer, DataSource("builtin:adv_behaviours", limit=4), utility=DataSource(str(tmp_path / "u.json")),
             utility_max_prompt_chars=40)
    util = dm.train_dataset.utility
    assert len(util) == 1
    assert tokenizer.decode(util[0].response[:-1]) == " Mix and bake."


# ----------------------------------------------------------------------------- batches


def test_away_and_toward_rows_share_prompt_ids_row_for_row(tokenizer):
    with pytest.warns(UserWarning, match=r"training: \d+ of 578 adversarial pairs and \d+ of 126 utility examples are "
                                         "longer than data.max_length=24"):
        dm = _builtin(tokenizer, batch_size=16, max_length=24)  # short: prompts cut to fit the longer response
    batches = [b for b in dm.train_dataloader() if b.away is not None]
    assert batches
    for b in batches:
        assert torch.equal(b.away.index, b.index) and torch.equal(b.toward.index, b.index)
        for i in range(len(b.index)):
            away = b.away.input_ids[i][(b.away.attention_mask[i] == 1) & (b.away.loss_mask[i] == 0)]
            toward = b.toward.input_ids[i][(b.toward.attention_mask[i] == 1) & (b.toward.loss_mask[i] == 0)]
            assert torch.equal(away, toward)
        assert len(b) == len(b.index) + (len(b.utility) if b.utility is not None else 0)
        assert b.num_tokens == sum(p.num_tokens for p in (b.away, b.toward, b.utility) if p is not None)


def test_collator_refuses_a_pair_with_different_prompts():
    pair = AdversarialPair(SequenceExample([1, 2], [3], 0), SequenceExample([1, 9], [4], 0), 0)
    with pytest.raises(DataError, match="adversarial pair 0: its away and toward rows have different prompt ids"):
        AdversarialCollator(0)([pair])


# ----------------------------------------------------------------------------- the mixer


def test_adversarial_share_matches_the_probability(tokenizer):
    """§8(g)8: over many rows the adversarial share is 0.125 within a binomial tolerance (4 sigma)."""
    stream = _builtin(tokenizer).train_dataset
    adv = np.concatenate([stream.plan(e)[0] for e in range(60)])
    p, n = 0.125, len(adv)
    assert abs(adv.mean() - p) < 4 * math.sqrt(p * (1 - p) / n)
    # adversarial rows walk a permutation of the pairs (no repeat before a pass ends), utility rows likewise
    a0, i0 = stream.plan(0)
    assert len(set(i0[a0].tolist())) == a0.sum()
    util, n_util = i0[~a0].tolist(), len(stream.utility)
    assert abs(len(util) - n_util) < 4 * math.sqrt(len(util))
    # a pass over the utility data has no repeat; draws that exhaust it before the epoch ends start the next pass
    assert all(len(set(part)) == len(part) for part in (util[:n_util], util[n_util:]))
    assert len(stream) == math.ceil(len(stream.utility) / (1 - p))
    assert not np.array_equal(stream.plan(1)[0], a0)  # a fresh draw per epoch


def test_probability_one_is_one_pass_over_the_pairs(tokenizer):
    stream = _builtin(tokenizer, adversarial_probability=1.0).train_dataset
    adv, index = stream.plan(3)
    assert adv.all() and sorted(index.tolist()) == list(range(len(stream.pairs)))


def test_mid_epoch_resume_gives_the_same_next_batches(tokenizer):
    dm = _builtin(tokenizer, batch_size=4)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    full = [_keys(b) for b in loader]
    loader.consumed = 5  # five batches reached the training step (on_after_batch_transfer counts them)
    state = loader.state_dict()
    resumed = _builtin(tokenizer, batch_size=4).train_dataloader()
    resumed.load_state_dict(state)
    assert state == {"epoch": 1, "consumed": 5}
    assert [_keys(b) for b in resumed] == full[5:]


def test_two_ranks_cover_the_one_rank_stream(tokenizer):
    stream = _builtin(tokenizer).train_dataset
    one = list(MixSampler(stream, num_replicas=1, rank=0))
    ranks = [list(MixSampler(stream, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(len(one) / 2)
    interleaved = [k for pair in zip(*ranks) for k in pair]
    assert interleaved[: len(one)] == one
    # step by step: two ranks with batch b see the rows of one process with batch 2b
    dm = _builtin(tokenizer, batch_size=3)
    dm._shard = lambda: (2, 0)
    rank0 = list(dm.train_dataloader())
    dm._shard = lambda: (2, 1)
    rank1 = list(dm.train_dataloader())
    dm.batch_size, dm._shard = 6, (lambda: (1, 0))
    single = list(dm.train_dataloader())
    for b0, b1, b in zip(rank0, rank1, single):
        got = sorted(b0.index.tolist() + b1.index.tolist())
        assert got == sorted(b.index.tolist())


# ----------------------------------------------------------------------------- bad input


def test_a_behaviour_without_targets_names_the_record(tokenizer, tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"behaviour": "How can I steal a car?", "targets": ["Sure"]}) + "\n"
                                      + json.dumps({"behaviour": "How can I hack a phone?", "id": "phone"}) + "\n")
    with pytest.raises(DataError, match=r"data.behaviours: data source .*b.jsonl', record 2 \(line 2\) \(id 'phone'\) "
                                        r"has no targets: give the record `targets`"):
        _dm(tokenizer, DataSource(str(tmp_path / "b.jsonl")), adversarial_probability=1.0)


def test_an_empty_behaviour_set(tokenizer, tmp_path):
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(ConfigError, match="data.behaviours .* is empty"):
        _dm(tokenizer, DataSource(str(tmp_path / "b.json")), adversarial_probability=1.0)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5])
def test_adversarial_probability_outside_the_interval(p):
    with pytest.raises(ConfigError, match=r"data.adversarial_probability must be in \(0, 1\]"):
        AdversarialBehaviourDataModule(DataSource("builtin:adv_behaviours"), adversarial_probability=p)


def test_utility_missing_while_p_is_below_one():
    with pytest.raises(ConfigError, match="data.utility is required with data.adversarial_probability=0.125"):
        AdversarialBehaviourDataModule(DataSource("builtin:adv_behaviours"))


def test_diverse_safe_answers_without_one(tokenizer, tmp_path):
    (tmp_path / "b.json").write_text(json.dumps([{"behaviour": "How can I steal a car?", "target": "Sure", "id": "car"}]))
    with pytest.raises(DataError, match="behaviour 'car' has no safe_response, which data.diverse_safe_answers needs"):
        _dm(tokenizer, DataSource(str(tmp_path / "b.json")), adversarial_probability=1.0, diverse_safe_answers=True)


def test_chat_template_whose_assistant_header_cannot_be_located(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # the generation prompt says "AI:", the stored conversation "Assistant:": not a prefix
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Human: {{ m['content'] }}\n"
                         "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}AI:{% endif %}")
    with pytest.raises(ConfigError, match="data.chat_template: .*assistant header cannot be located.*data.prompt_template"):
        _dm(tok, DataSource("builtin:adv_behaviours", limit=2), adversarial_probability=1.0, chat_template=True)
    tok.chat_template = tok.chat_template.replace("Assistant:", "AI:")
    assert len(_dm(tok, DataSource("builtin:adv_behaviours", limit=2), adversarial_probability=1.0,
                   chat_template=True).train_dataset) > 0


def _word_tokenizer(path: Path, unk: bool) -> Path:
    words = ["<eos>", "<unk>", *"how can i steal a bike sure".split()]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                            unk_token="<unk>" if unk else None).save_pretrained(path)
    return path


@pytest.mark.parametrize("unk, pad", [(True, "<unk>"), (False, "<eos>")])
def test_missing_pad_token_falls_back_to_unk_then_eos(tmp_path, unk, pad):
    """§8(h)8: the release pads with unk; Llama-3 has none, so EOS. data.tokenizer is built that way."""
    path = str(_word_tokenizer(tmp_path / "tok", unk))
    assert build_tokenizer(ModelSpec(name_or_path=path, missing_pad_token="unk")).pad_token == pad
    dm = AdversarialBehaviourDataModule(DataSource("builtin:adv_behaviours", limit=2), adversarial_probability=1.0,
                                        tokenizer=path, **TEMPLATE)
    dm.setup("fit")
    assert dm.tokenizer.pad_token == pad


# ----------------------------------------------------------------------------- built-in sets


def _build_script():
    spec = importlib.util.spec_from_file_location("build_tiny_game", REPO / "scripts" / "build_tiny_game.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_builtin_sets_load_without_train_val_overlap(tokenizer):
    dm = _builtin(tokenizer)
    train, val = dm.eval_prompts("train"), dm.eval_prompts("val")
    assert (len(train["harmful"]), len(val["harmful"]), len(val["benign"])) == (192, 48, 42)
    assert not set(train["harmful"]) & set(val["harmful"])
    assert all(2 <= len(t) <= 4 for t in train["targets"] + val["targets"])
    diverse = _builtin(tokenizer, diverse_safe_answers=True).eval_prompts("val")["safe"]
    assert len(set(diverse)) > 1


def test_builtin_sets_hold_out_whole_actions():
    """The val sets are every frame of one unseen action per family: no held-out action, and so no held-out
    target, safe response or utility answer, occurs anywhere in the training sets (targets are not memorised)."""
    script = _build_script()
    held_out = script.held_out_actions()
    assert list(held_out) == [*script.HARMFUL, *script.BENIGN]
    assert all(a in (script.HARMFUL | script.BENIGN)[family] for family, a in held_out.items())
    load = {stem: json.loads((BUILTIN_DIR / f"{stem}.json").read_text()) for stem in
            ("adv_behaviours", "adv_behaviours_val", "adv_benign", "adv_benign_val", "adv_utility", "adv_utility_val")}
    train_texts = [text for stem in ("adv_behaviours", "adv_benign", "adv_utility") for row in load[stem]
                   for value in row.values() if value != row.get("id")
                   for text in (value if isinstance(value, list) else [value])]
    for action in held_out.values():
        assert not [t for t in train_texts if action in t], action
    val_targets = {t for row in load["adv_behaviours_val"] for t in row["targets"]}
    assert val_targets and not val_targets & {t for row in load["adv_behaviours"] for t in row["targets"]}
    # val: all six frames of each held-out action; training: every frame of every other action
    frames = [f for f, _ in script.FRAMES]
    for stem, key, families in (("adv_behaviours", "behaviour", script.HARMFUL), ("adv_benign", "prompt", script.BENIGN),
                                ("adv_utility", "prompt", script.BENIGN)):
        val = sorted(r[key] for r in load[f"{stem}_val"])
        train = sorted(r[key] for r in load[stem])
        assert val == sorted(f.format(a=held_out[fam]) for fam in families for f in frames), stem
        assert train == sorted(f.format(a=a) for fam, acts in families.items() for a in acts if a != held_out[fam]
                               for f in frames), stem


def test_builtin_sets_match_the_build_script():
    for stem, rows in _build_script().adversarial_sets().items():
        assert (BUILTIN_DIR / f"{stem}.json").read_text() == json.dumps(rows, indent=1) + "\n", stem


class _Recorder(L.LightningModule):
    """Records every training batch's rows (pair and utility indices); one parameter so there is a step."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer, self.w, self.rows = tokenizer, torch.nn.Parameter(torch.zeros(())), []

    def training_step(self, batch: AdversarialBatch, batch_idx: int):
        util = batch.utility.index.tolist() if batch.utility is not None else []
        self.rows.append((batch.index.tolist(), util))
        return self.w * 0.0 + self.w.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tokenizer, root: Path, stop: int | None = None, ckpt: str | None = None) -> _Recorder:
    dm = AdversarialBehaviourDataModule(DataSource("builtin:adv_behaviours"), utility=DataSource("builtin:adv_utility"),
                                        batch_size=8, **TEMPLATE)
    module = _Recorder(tokenizer)
    save = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(max_steps=stop or 7, logger=False, callbacks=[save], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, limit_val_batches=0)
    trainer.fit(module, dm, ckpt_path=ckpt)
    return module


def test_lightning_resume_mid_epoch_continues_the_stream(tokenizer, tmp_path):
    full = _fit(tokenizer, tmp_path / "a")
    _fit(tokenizer, tmp_path / "b", stop=3)  # the step-3 checkpoint is written mid-epoch (18 batches an epoch)
    resumed = _fit(tokenizer, tmp_path / "c", ckpt=str(tmp_path / "b" / "last.ckpt"))
    assert len(full.rows) == 7 and resumed.rows == full.rows[3:]
    assert sum(len(a) for a, _ in full.rows) > 0  # some adversarial rows reached the step
