"""Unlearning data: forget/retain batches, pairing, resumption, sharding, attribution loaders, presets."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import tiny_lm
from lightning.fabric.utilities.apply_func import move_data_to_device

from lit_align.data import (
    DEFAULT_REFUSALS,
    DataSource,
    ForgetRetainBatch,
    ForgetRetainDataModule,
    MUSEDataModule,
    PKUSafeRLHFDataModule,
    TOFUDataModule,
    WMDPDataModule,
    load_records,
)
from lit_align.data.sampling import ResumableDataLoader
from lit_align.errors import DataError
from lit_align.models import TINY_TOKENIZER, ModelSpec, build_tokenizer
from lit_align.models.reference import ReferencePolicy
from lit_align.rollout.logps import token_logps

QA = {"prompt": "question", "response": "answer"}
FORGET = DataSource("builtin:fictitious_facts/forget10", fields=QA)  # 4 people, 20 records
RETAIN = DataSource("builtin:fictitious_facts/retain90", fields=QA)  # 36 people, 180 records
POOL = DataSource("builtin:instructions", limit=30)


def _dm(**kwargs) -> ForgetRetainDataModule:
    kwargs = {"forget": FORGET, "retain": RETAIN, "batch_size": 4, "max_length": 64, "tokenizer": TINY_TOKENIZER,
              **kwargs}
    dm = ForgetRetainDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _answer_start(mask_row: torch.Tensor) -> int:
    return int(mask_row.nonzero()[0])


def _pairs(batch: ForgetRetainBatch, per: int = 1) -> list[tuple[int, tuple[int, ...]]]:
    """(forget index, its retain indices) of each forget row."""
    r = batch.retain.index.view(len(batch), per).tolist()
    return [(f, tuple(x)) for f, x in zip(batch.index.tolist(), r, strict=True)]


def _same(a: ForgetRetainBatch, b: ForgetRetainBatch) -> bool:
    for x, y in ((a.forget, b.forget), (a.retain, b.retain), (a.mismatch, b.mismatch), (a.refusal, b.refusal)):
        if (x is None) != (y is None):
            return False
        if x is not None and not (torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_mask, y.loss_mask)
                                  and torch.equal(x.index, y.index)):
            return False
    return True


# --------------------------------------------------------------------------- built-in split names


def test_builtin_fictitious_splits_select_people():
    splits = json.loads((Path(__file__).parents[2] / "lit_align/data/builtin/fictitious_facts_splits.json").read_text())
    for forget, retain, n in (("forget01", "retain99", 1), ("forget05", "retain95", 2), ("forget10", "retain90", 4)):
        f = load_records(DataSource(f"builtin:fictitious_facts/{forget}", fields=QA), ["prompt", "response"])
        r = load_records(DataSource(f"builtin:fictitious_facts/{retain}", fields=QA), ["prompt", "response"])
        assert (len(f), len(r)) == (5 * n, 200 - 5 * n)
        all_rows = [json.loads(x) for x in (Path(__file__).parents[2] / "lit_align/data/builtin/"
                                            "fictitious_facts.jsonl").read_text().splitlines()]
        forget_people = {row["person_id"] for row in all_rows if row["question"] in {x["prompt"] for x in f}}
        assert forget_people == set(splits[forget])
        assert not {x["prompt"] for x in f} & {x["prompt"] for x in r}
    with pytest.raises(ValueError, match=r"no split 'forget20'.*forget01"):
        load_records(DataSource("builtin:fictitious_facts/forget20"), ["question"])


# --------------------------------------------------------------------------- batches


def test_batch_parts_shapes_and_masks():
    dm = _dm(mismatch_pool=POOL, num_mismatch=3, retain_per_forget=2)
    batch = next(iter(dm.train_dataloader()))
    tok = dm.tokenizer
    assert isinstance(batch, ForgetRetainBatch) and len(batch) == 4
    assert batch.retain.input_ids.shape[0] == 8 and batch.mismatch.input_ids.shape[0] == 12
    assert batch.refusal.input_ids.shape[0] == 4
    assert torch.equal(batch.index, batch.forget.index)
    assert batch.num_tokens == sum(p.num_tokens for p in (batch.forget, batch.retain, batch.mismatch, batch.refusal))
    for part in (batch.forget, batch.retain, batch.mismatch, batch.refusal):
        assert (part.loss_mask <= part.attention_mask).all() and part.input_ids.shape[1] <= 64
    pool = {r["response"] + tok.eos_token for r in load_records(POOL, ["response"])}
    for b in range(4):
        start = _answer_start(batch.forget.loss_mask[b])
        prompt = batch.forget.input_ids[b, :start]
        assert tok.pad_token_id not in prompt.tolist()
        for k in range(3):  # K mismatch rows per forget row: same prompt (no padding), a pool answer only in the loss
            row = b * 3 + k
            assert batch.mismatch.index[row] == batch.index[b]
            assert _answer_start(batch.mismatch.loss_mask[row]) == start
            assert torch.equal(batch.mismatch.input_ids[row, :start], prompt)
            answer = batch.mismatch.input_ids[row][batch.mismatch.loss_mask[row].bool()]
            assert tok.decode(answer) in pool
        assert _answer_start(batch.refusal.loss_mask[b]) == start
        refusal = batch.refusal.input_ids[b][batch.refusal.loss_mask[b].bool()]
        assert tok.decode(refusal).removesuffix(tok.eos_token) in DEFAULT_REFUSALS
    assert len(DEFAULT_REFUSALS) >= 20


def test_parts_can_be_left_out_and_flags_say_so():
    dm = _dm(retain=None, refusals=[])
    assert not dm.has_retain and not dm.has_mismatch_pool and not dm.has_refusals
    batch = next(iter(dm.train_dataloader()))
    assert batch.retain is None and batch.mismatch is None and batch.refusal is None
    assert batch.num_tokens == batch.forget.num_tokens
    assert set(dm.attribution_loaders(1, 0, 4)) == {"forget"}
    moved = move_data_to_device(batch, torch.device("cpu"))  # Lightning moves the dataclass with None parts
    assert moved.retain is None and torch.equal(moved.index, batch.index)
    with_pool = _dm(mismatch_pool=POOL)
    assert with_pool.has_mismatch_pool and with_pool.has_retain and with_pool.has_refusals


# --------------------------------------------------------------------------- pairing


def _retain_over_epochs(dm: ForgetRetainDataModule, epochs: int) -> list[int]:
    loader = dm.train_dataloader()
    seen = []
    for e in range(epochs):
        loader.sampler.set_epoch(e)
        seen += [i for b in loader for i in b.retain.index.tolist()]
    return seen


def test_cycle_uses_every_retain_example_once_per_pass_across_forget_epochs():
    dm = _dm(refusals=[])
    seen = _retain_over_epochs(dm, 9)  # 9 epochs x 20 forget examples = one pass over the 180 retain examples
    assert sorted(seen) == list(range(180))
    again = _retain_over_epochs(_dm(refusals=[]), 9)
    assert again == seen
    assert _retain_over_epochs(_dm(refusals=[], seed=1), 9) != seen
    two = _dm(refusals=[], retain_per_forget=2)
    assert sorted(_retain_over_epochs(two, 9)) == sorted(list(range(180)) * 2)  # two full passes


def test_random_pairing_is_seeded_and_differs_from_cycle():
    a, b = _dm(retain_sampling="random"), _dm(retain_sampling="random")
    first_a, first_b = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert _same(first_a, first_b)
    seen = _retain_over_epochs(a, 9)
    assert seen != _retain_over_epochs(_dm(), 9) and len(set(seen)) < 180  # uniform draws repeat
    assert seen != _retain_over_epochs(_dm(retain_sampling="random", seed=5), 9)
    with pytest.raises(ValueError, match="data.retain_sampling"):
        _dm(retain_sampling="ratio")


def test_resume_mid_epoch_continues_with_the_same_batch_and_pairs():
    dm = _dm(mismatch_pool=POOL, num_mismatch=2)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    for i, _ in enumerate(loader):
        loader.consumed += 1  # what on_after_batch_transfer does when a batch reaches the step
        if i == 1:
            break
    state = loader.state_dict()
    assert state == {"epoch": 3, "consumed": 2}
    expected = [b for i, b in enumerate(loader) if i >= 2]

    fresh = _dm(mismatch_pool=POOL, num_mismatch=2).train_dataloader()
    assert isinstance(fresh, ResumableDataLoader)
    fresh.load_state_dict(state)
    resumed = list(fresh)
    assert len(resumed) == len(expected) == len(fresh) - 2
    assert all(_same(x, y) for x, y in zip(resumed, expected, strict=True))


def test_two_ranks_are_disjoint_and_pair_like_one_process_with_double_batch():
    one = _dm(batch_size=4, mismatch_pool=POOL)
    single = list(one.train_dataloader())
    ranks = []
    for r in (0, 1):
        dm = _dm(batch_size=2, mismatch_pool=POOL)
        dm._shard = lambda r=r: (2, r)  # what a DDP trainer's sampler kwargs give
        ranks.append(list(dm.train_dataloader()))
    f0 = {i for b in ranks[0] for i in b.index.tolist()}
    f1 = {i for b in ranks[1] for i in b.index.tolist()}
    assert not f0 & f1 and f0 | f1 == set(range(20))
    for step, big in enumerate(single):
        together = dict(_pairs(ranks[0][step]) + _pairs(ranks[1][step]))
        assert together == dict(_pairs(big))
        mism = {}
        for part in (ranks[0][step], ranks[1][step]):
            for row, idx in enumerate(part.mismatch.index.tolist()):
                mism.setdefault(idx, []).append(part.mismatch.input_ids[row][part.mismatch.loss_mask[row].bool()].tolist())
        ref = {}
        for row, idx in enumerate(big.mismatch.index.tolist()):
            ref.setdefault(idx, []).append(big.mismatch.input_ids[row][big.mismatch.loss_mask[row].bool()].tolist())
        assert mism == ref


# --------------------------------------------------------------------------- validation, eval, reference, attribution


def test_validation_view_and_eval_records():
    dm = _dm(eval_batch_size=5)
    batches = list(dm.val_dataloader())
    assert [len(b) for b in batches] == [5, 5, 5, 5]
    assert [i for b in batches for i in b.index.tolist()] == list(range(20))
    retain = [i for b in batches for i in b.retain.index.tolist()]
    assert retain == [i * 9 for i in range(20)]  # an even, fixed spread over the 180 retain examples
    assert _same(batches[0], next(iter(dm.val_dataloader())))
    records = dm.eval_records()
    assert set(records) == {"forget", "retain"} and len(records["forget"]) == 20 and len(records["retain"]) == 180
    assert set(records["forget"][0]) >= {"prompt", "response"}
    assert dm.encode_prompt(records["forget"][0]["prompt"]) == dm.forget_dataset[0].prompt
    assert dm.encode_response(records["forget"][0]["response"]) == dm.forget_dataset[0].response
    assert _dm(validate=False).val_dataloader() == []


def test_split_loaders_score_the_forget_sets_for_a_precomputed_reference():
    dm = _dm(mismatch_pool=POOL)
    loaders = dm.split_loaders(shard=True)
    assert list(loaders) == ["train"] and dm.split_of("train") == dm.split_of("val") == "train"
    batch = next(iter(loaders["train"]))
    assert batch.retain is None and batch.mismatch is None and batch.refusal is None
    assert batch.index.tolist() == [0, 1, 2, 3] and len(loaders["train"].dataset) == 20
    assert loaders["train"].dataset.fingerprint() == _dm(mismatch_pool=POOL).split_loaders()["train"].dataset.fingerprint()
    tofu = TOFUDataModule(split="forget05", path="builtin:fictitious_facts", tokenizer=TINY_TOKENIZER, max_length=64)
    tofu.setup()
    assert tofu.val_forget_dataset is tofu.forget_dataset  # same records: scored once
    other = _dm(eval_forget=DataSource("builtin:fictitious_facts/forget05", fields=QA))
    assert list(other.split_loaders()) == ["train", "val"] and other.split_of("test") == "val"
    assert len(other.split_loaders()["val"].dataset) == 10


def test_attribution_loaders_pad_with_zero_weights_and_run_equal_batch_counts():
    dm = _dm()
    per_rank = [dm.attribution_loaders(num_replicas=3, rank=r, batch_size=3) for r in range(3)]
    for loaders in per_rank:
        assert set(loaders) == {"forget", "retain", "refusal"}
        assert {k: len(list(v)) for k, v in loaders.items()} == {"forget": 3, "retain": 3, "refusal": 3}
    counts = torch.zeros(20)
    for loaders in per_rank:
        for (fb, fw), (rb, rw), (pb, pw) in zip(loaders["forget"], loaders["retain"], loaders["refusal"], strict=True):
            assert fw.dtype == torch.float32 and fw.shape == (len(fb),) == (len(rb),)
            assert torch.equal(fw, rw) and torch.equal(fw, pw)
            counts.index_add_(0, fb.index, fw)
            assert torch.equal(pb.index, fb.index)
            for row in range(len(fb)):
                start = _answer_start(fb.loss_mask[row])
                assert torch.equal(pb.input_ids[row, :start], fb.input_ids[row, :start])
    assert torch.equal(counts, torch.ones(20))  # every example counted once, padding (21 - 20 rows) weighs 0
    last_w = list(per_rank[2]["forget"])[-1][1]
    assert last_w.tolist()[-1] == 0.0
    retain_a = [b.index.tolist() for b, _ in dm.attribution_loaders(1, 0, 4)["retain"]]
    assert retain_a == [b.index.tolist() for b, _ in _dm().attribution_loaders(1, 0, 4)["retain"]]
    assert len({i for b in retain_a for i in b}) > 1


# --------------------------------------------------------------------------- bad input


def test_empty_forget_set_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.forget is empty.*limit"):
        _dm(forget=DataSource("builtin:fictitious_facts/forget10", fields=QA, limit=0))
    empty = tmp_path / "pku.jsonl"
    _write_jsonl(empty, [{"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True,
                          "is_response_1_safe": True}])
    tqa = _truthfulqa_csv(tmp_path)
    with pytest.raises(ValueError, match=r"data\.forget is empty"):
        PKUSafeRLHFDataModule(path=str(empty), truthfulqa_path=tqa, tokenizer=TINY_TOKENIZER).setup()


def test_overlap_between_forget_and_retain_warns_with_the_count_and_keeps_both():
    both = [DataSource("builtin:fictitious_facts/retain90", fields=QA, limit=7), RETAIN]
    with pytest.warns(UserWarning, match=r"^7 of 27 forget examples also appear in the retain set"):
        dm = _dm(forget=[FORGET, both[0]])
    assert len(dm.forget_dataset) == 27 and len(dm.retain_dataset) == 180
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _dm()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="data.prompt_template"):
        _dm(prompt_template="Q: {question}")
    with pytest.raises(ValueError, match="data.retain_per_forget"):
        _dm(retain_per_forget=0)
    with pytest.raises(DataError, match="fields: {response: <column>}"):
        _dm(forget=DataSource("builtin:fictitious_facts/forget10"))


# --------------------------------------------------------------------------- presets on local fixtures


def _tofu_dir(tmp_path: Path) -> Path:
    root = tmp_path / "tofu"
    qa = [{"question": f"Who wrote book {i}?", "answer": f"Author {i} wrote it."} for i in range(10)]
    perturbed = [{**r, "paraphrased_question": f"Book {i} was written by whom?",
                  "paraphrased_answer": f"It was Author {i}.",
                  "perturbed_answer": [f"Author {i + 1} wrote it.", f"Author {i + 2} wrote it."]}
                 for i, r in enumerate(qa)]
    root.mkdir()
    (root / "forget01.json").write_text(json.dumps(qa[:2]))
    (root / "retain99.json").write_text(json.dumps(qa[2:]))
    (root / "forget01_perturbed.json").write_text(json.dumps(perturbed[:2]))
    (root / "retain_perturbed.json").write_text(json.dumps(perturbed[2:5]))
    return root


def test_tofu_preset_reads_the_hub_layout_and_the_reference_format(tmp_path):
    root = _tofu_dir(tmp_path)
    dm = TOFUDataModule(split="forget01", path=str(root), tokenizer=TINY_TOKENIZER, batch_size=2, max_length=64)
    dm.setup()
    assert (len(dm.forget_dataset), len(dm.retain_dataset)) == (2, 8)
    records = dm.eval_records()
    assert records["forget"][1] == {
        "prompt": "Who wrote book 1?", "response": "Author 1 wrote it.",
        "paraphrased_prompt": "Book 1 was written by whom?", "paraphrased_response": "It was Author 1.",
        "perturbed_responses": ["Author 2 wrote it.", "Author 3 wrote it."]}
    assert len(records["retain"]) == 3
    quirk = TOFUDataModule(split="forget01", path=str(root), reference_format=True, tokenizer=TINY_TOKENIZER)
    quirk.setup()
    assert quirk.tokenizer.decode(quirk.forget_dataset[0].prompt) == "[INST] Who wrote book 0? [\\INST]"
    tiny = TOFUDataModule(split="forget01", path="builtin:fictitious_facts", tokenizer=TINY_TOKENIZER)
    tiny.setup()
    assert len(tiny.forget_dataset) == 5 and len(tiny.eval_records()["forget"][0]["perturbed_responses"]) == 4
    with pytest.raises(ValueError, match="data.split"):
        TOFUDataModule(split="forget20")


def test_wmdp_preset_corpora_multiple_choice_and_padding_quirk(tmp_path):
    corpora, questions = tmp_path / "corpora", tmp_path / "wmdp"
    _write_jsonl(corpora / "cyber-forget-corpus.jsonl", [{"text": f"Exploit note {i}."} for i in range(6)])
    _write_jsonl(corpora / "cyber-retain-corpus.jsonl", [{"text": f"Networking fact {i}."} for i in range(4)])
    _write_jsonl(corpora / "bio-retain-corpus.jsonl", [{"text": f"Biology fact {i}."} for i in range(3)])
    bio = _write_jsonl(tmp_path / "bio_remove_dataset.jsonl", [{"title": "t", "text": "Pathogen note."}])
    _write_jsonl(questions / "wmdp-cyber" / "test.jsonl",
                 [{"question": "Which port?", "choices": ["21", "22", "80", "443"], "answer": 1}])
    _write_jsonl(questions / "wmdp-bio" / "test.jsonl",
                 [{"question": "Which cell?", "choices": ["a", "b", "c", "d"], "answer": 3}])
    kw = {"corpora_path": str(corpora), "questions_path": str(questions), "tokenizer": TINY_TOKENIZER}
    with pytest.raises(ValueError, match="data.bio_forget_path"):
        WMDPDataModule(**kw)
    dm = WMDPDataModule(bio_forget_path=bio, max_length=32, batch_size=3, **kw)
    dm.setup()
    assert (len(dm.forget_dataset), len(dm.retain_dataset)) == (7, 7)
    assert dm.forget_dataset[0].prompt == [] and dm.tokenizer.decode(dm.forget_dataset[0].response).startswith("Pathogen")
    records = dm.eval_records()["forget"]
    assert [(r["prompt"], r["response"], r["label"], r["group"]) for r in records] == [
        ("Which cell?", "d", 3, "wmdp-bio"), ("Which port?", "22", 1, "wmdp-cyber")]
    assert "forget" in dm.eval_records() and len(dm.eval_records()["retain"]) == 7
    plain = next(iter(dm.train_dataloader()))
    assert (plain.forget.loss_mask == plain.forget.attention_mask).all()  # corpus text: every token scored
    quirk = WMDPDataModule(domains=["cyber"], pad_in_loss=True, max_length=32, batch_size=3, **kw)
    quirk.setup()
    batch = next(iter(quirk.train_dataloader()))
    assert batch.forget.input_ids.shape[1] == 32 and batch.retain.input_ids.shape[1] == 32
    assert batch.forget.loss_mask.all() and batch.forget.attention_mask.all()  # pads count as scored tokens
    assert (batch.forget.input_ids == quirk.tokenizer.pad_token_id).any()
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lit_align.rollout.logps import token_logps

    tiny = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(quirk.tokenizer), hidden_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=64))
    out = token_logps(tiny, batch.forget.input_ids, batch.forget.attention_mask, batch.forget.loss_mask)
    assert (out.mask.sum(-1) == 31).all()  # every position but the first is scored, pads included
    # precomputed reference log-probs and WAGLE attribution see the rows exactly as training does
    reference_rows = next(iter(quirk.split_loaders()["train"])).forget
    attribution_rows, _ = next(iter(quirk.attribution_loaders(1, 0, 3)["forget"]))
    for rows in (reference_rows, attribution_rows):
        assert rows.input_ids.shape[1] == 32 and rows.loss_mask.all() and rows.attention_mask.all()


def test_muse_preset_corpora_knowledge_qa_and_holdout(tmp_path):
    root = tmp_path / "muse"
    _write_jsonl(root / "raw" / "forget.jsonl", [{"text": f"News story {i}."} for i in range(5)])
    _write_jsonl(root / "raw" / "retain1.jsonl", [{"text": f"Other story {i}."} for i in range(4)])
    _write_jsonl(root / "knowmem" / "forget_qa.jsonl", [{"question": "Who won?", "answer": "Team A."}])
    _write_jsonl(root / "knowmem" / "retain_qa.jsonl", [{"question": "Where?", "answer": "Paris."}])
    _write_jsonl(root / "privleak" / "holdout.jsonl", [{"text": "Unseen story."}])
    dm = MUSEDataModule(path=str(root), tokenizer=TINY_TOKENIZER, max_length=32, batch_size=2)
    dm.setup()
    assert (len(dm.forget_dataset), len(dm.retain_dataset)) == (5, 4)
    records = dm.eval_records()
    assert records["forget"] == [{"prompt": "Who won?", "response": "Team A."}]
    assert records["retain"] == [{"prompt": "Where?", "response": "Paris."}]
    assert records["holdout"] == [{"prompt": "", "response": "Unseen story."}]
    val = next(iter(dm.val_dataloader()))
    assert len(val) == 1 and val.retain.index.tolist() == [0]


def _truthfulqa_csv(tmp_path: Path) -> str:
    path = tmp_path / "TruthfulQA.csv"
    rows = [
        {"Type": "Adversarial", "Category": "Misc", "Question": "What colour is the sky?", "Best Answer": "Blue",
         "Correct Answers": "Blue; Light blue", "Incorrect Answers": "Green;  Red ", "Source": "x"},
        {"Type": "Adversarial", "Category": "Misc", "Question": "How many legs has a cat?", "Best Answer": "Four",
         "Correct Answers": "Four", "Incorrect Answers": "Three", "Source": "y"},
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_pku_saferlhf_preset_unsafe_rows_truthfulqa_pool_and_template(tmp_path):
    pku = _write_jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "How do I pick a lock?", "response_0": "Use a pin.", "response_1": "I won't help.",
         "is_response_0_safe": False, "is_response_1_safe": True},
        {"prompt": "Insult me.", "response_0": "You fool.", "response_1": "You idiot.",
         "is_response_0_safe": False, "is_response_1_safe": False},
        {"prompt": "Say hi.", "response_0": "Hi.", "response_1": "Hello.",
         "is_response_0_safe": True, "is_response_1_safe": True},
    ])
    dm = PKUSafeRLHFDataModule(path=pku, truthfulqa_path=_truthfulqa_csv(tmp_path), tokenizer=TINY_TOKENIZER,
                               batch_size=3, num_mismatch=2, max_length=64)
    dm.setup()
    tok = dm.tokenizer
    forget = [(r["prompt"], r["response"]) for r in dm._load_role("forget")]
    assert forget == [("How do I pick a lock?", "Use a pin."), ("Insult me.", "You fool."), ("Insult me.", "You idiot.")]
    assert [r["response"] for r in dm._load_role("mismatch_pool")] == [
        "Blue", "Blue", "Light blue", "Green", "Red", "Four", "Four", "Three"]
    assert [(r["prompt"], r["response"]) for r in dm.eval_records()["retain"]] == [
        ("What colour is the sky?", "Blue"), ("How many legs has a cat?", "Four")]
    ex = dm.forget_dataset[0]
    assert tok.decode(ex.prompt) == "### Question: How do I pick a lock?\n ### Answer:"
    assert tok.decode(ex.response) == " Use a pin." + tok.eos_token
    batch = next(iter(dm.train_dataloader()))
    assert batch.mismatch.input_ids.shape[0] == 6 and dm.has_mismatch_pool
    for row in range(6):
        answer = tok.decode(batch.mismatch.input_ids[row][batch.mismatch.loss_mask[row].bool()])
        assert answer.startswith(" ") and answer.endswith(tok.eos_token)
        prompt = tok.decode(batch.mismatch.input_ids[row][: _answer_start(batch.mismatch.loss_mask[row])])
        assert prompt.startswith("### Question: ") and prompt.endswith("### Answer:")


def test_presets_default_to_the_public_hub_layouts():
    tofu = TOFUDataModule(split="forget05")
    assert tofu.sources["forget"] == [DataSource("locuslab/TOFU", subset="forget05", fields=QA)]
    assert tofu.sources["retain"][0].subset == "retain95"
    assert tofu.sources["eval_forget"][0].subset == "forget05_perturbed"
    assert tofu.sources["eval_forget"][0].fields["perturbed_responses"] == "perturbed_answer"
    assert tofu.sources["eval_retain"][0].subset == "retain_perturbed"
    wmdp = WMDPDataModule(domains=["cyber"])
    assert [(s.path, s.subset, s.split) for s in wmdp.sources["forget"] + wmdp.sources["retain"] + wmdp.sources["eval_forget"]] == [
        ("cais/wmdp-corpora", "cyber-forget-corpus", "train"), ("cais/wmdp-corpora", "cyber-retain-corpus", "train"),
        ("cais/wmdp", "wmdp-cyber", "test")]
    muse = MUSEDataModule(corpus="Books", retain_split="retain2")
    assert [(s.path, s.subset, s.split) for k in ("forget", "retain", "eval_forget", "eval_retain", "eval_holdout")
            for s in muse.sources[k]] == [
        ("muse-bench/MUSE-Books", "raw", "forget"), ("muse-bench/MUSE-Books", "raw", "retain2"),
        ("muse-bench/MUSE-Books", "knowmem", "forget_qa"), ("muse-bench/MUSE-Books", "knowmem", "retain_qa"),
        ("muse-bench/MUSE-Books", "privleak", "holdout")]
    pku = PKUSafeRLHFDataModule(revision="abc123")
    assert pku.sources["forget"][0].revision == "abc123" and pku.sources["retain"] == pku.sources["mismatch_pool"]
    assert pku.prompt_template == "### Question: {prompt}\n ### Answer:" and pku.chat_template is False


class _NLLModule(L.LightningModule):
    """A real tiny LM trained on the forget NLL, to run the DataModule under a Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = build_tokenizer(ModelSpec(name_or_path=TINY_TOKENIZER))
        self.policy = tiny_lm(vocab_size=len(self.tokenizer), hidden_size=16).train()
        self.val_parts: list[tuple[int, int]] = []

    def policy_logps(self, batch):
        return token_logps(self.policy, batch.input_ids, batch.attention_mask, batch.loss_mask)

    def on_fit_start(self) -> None:  # what a precomputed NPO reference does with the forget sets
        self.reference = ReferencePolicy("precomputed")
        self.reference.precompute(self, lambda b: [b.forget], model_fp="tiny", cache_dir=self.trainer.default_root_dir)

    def _nll(self, part) -> torch.Tensor:
        labels = part.input_ids.masked_fill(part.loss_mask == 0, -100)
        return self.policy(input_ids=part.input_ids, attention_mask=part.attention_mask, labels=labels).loss

    def training_step(self, batch: ForgetRetainBatch, _):
        return self._nll(batch.forget) + self._nll(batch.retain)

    def validation_step(self, batch: ForgetRetainBatch, _):
        self.val_parts.append((len(batch), batch.retain.input_ids.shape[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.policy.parameters(), lr=0.01)


def test_datamodule_runs_under_a_trainer_with_the_module_tokenizer(tmp_path):
    module = _NLLModule()
    dm = ForgetRetainDataModule(forget=FORGET, retain=RETAIN, batch_size=4, eval_batch_size=10, max_length=48)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        val_check_interval=3, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert dm.tokenizer is module.tokenizer and trainer.global_step == 3
    assert dm._train_loader.state_dict() == {"epoch": 0, "consumed": 3}
    assert module.val_parts == [(10, 10), (10, 10)]
    sums, counts = module.reference.tables["train"]
    assert list(module.reference.tables) == ["train"] and sums.shape == counts.shape == (20, 1)
    assert counts[:, 0].tolist() == [len(ex.response) for ex in dm.forget_dataset]
    assert (sums < 0).all()
