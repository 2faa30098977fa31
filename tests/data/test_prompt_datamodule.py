"""PromptDataModule: formats from local files, stable prompt ids, left padding, the chat template, empty
prompts, and rank-sharded, resumable loaders."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re

import pytest
import torch
import yaml
from lightning.pytorch.utilities import move_data_to_device

from lit_align.data import PromptBatch, PromptDataModule
from lit_align.data.prompts import DEFENDER_TEMPLATE, TLDR_TEMPLATE, SeedPromptDataModule
from lit_align.data.records import BUILTIN_DIR, DataSource
from lit_align.errors import ConfigError, DataError
from lit_align.models.causal_lm import build_causal_lm, build_tokenizer
from lit_align.models.spec import ModelSpec
from lit_align.rollout.sampler import SamplingConfig, sample


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _dm(tok, train, val=None, **kw) -> PromptDataModule:
    dm = PromptDataModule(train=DataSource(**train), val=DataSource(**val) if val else None,
                          val_fraction=kw.pop("val_fraction", 0.0), **kw)
    dm.tokenizer = tok  # the module's tokenizer, as a LightningModule would hand it over
    dm.setup("fit")
    return dm


def _rows_of(dm: PromptDataModule, batch: PromptBatch) -> list[str]:
    return [dm.tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch.input_ids, batch.attention_mask)]


POSTS = [
    {"id": "t3_abc", "subreddit": "relationships", "title": "My roommate", "post": "  She never cleans up.  ",
     "summary": "roommate"},
    {"id": "t3_def", "subreddit": "cooking", "title": "Bread", "post": "My bread is flat.", "summary": "bread"},
]


def test_formats_from_local_files(tmp_path, tokenizer):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"question": "How do I bake bread?", "qid": 7},
                                            {"question": "Where can I swim?"}])
    hh = _jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: How can I steal a car?\n\nAssistant: No.\n\nHuman: Why?\n\nAssistant: No.",
         "rejected": "x"},
        {"chosen": "Human: What should I cook?\n\nAssistant: Pasta.", "rejected": "y"},
    ])
    tldr = _jsonl(tmp_path / "tldr.jsonl", POSTS)
    trl_tldr = _jsonl(tmp_path / "trl_tldr.jsonl", [
        {"prompt": TLDR_TEMPLATE.format(subreddit="cooking", title="Bread", post="My bread is flat."),
         "completion": " bread"}])
    kw = {"chat_template": False}

    dm = _dm(tokenizer, {"path": prompts, "fields": {"prompt": "question", "id": "qid"}}, format="prompt", **kw)
    assert dm.train_dataset.prompts == ["How do I bake bread?", "Where can I swim?"]
    assert dm.train_dataset.uids == ["7", _sha("Where can I swim?")]  # the record id, else the text's hash
    dm = _dm(tokenizer, {"path": hh}, format="hh", **kw)
    assert dm.train_dataset.prompts == ["How can I steal a car?", "What should I cook?"]
    dm = _dm(tokenizer, {"path": tldr}, format="tldr", **kw)
    first = "SUBREDDIT: r/relationships\nTITLE: My roommate\nPOST: She never cleans up.\nTL;DR:"
    assert dm.train_dataset.prompts[0] == first and dm.train_dataset.uids == ["t3_abc", "t3_def"]
    batch = next(iter(dm._loader(dm.train_dataset, 2, shuffle=False, shard=False)))
    assert _rows_of(dm, batch)[0] == first and batch.prompts[0] == first
    # a `prompt` column already in the TL;DR layout is format `prompt`: the same text, so the same hash
    via_prompt = _dm(tokenizer, {"path": trl_tldr}, format="prompt", **kw).train_dataset
    assert via_prompt.prompts == [dm.train_dataset.prompts[1]] and via_prompt.uids == [_sha(via_prompt.prompts[0])]
    for path, fmt in [(prompts, "prompt"), (hh, "hh"), (tldr, "tldr")]:  # auto detects each
        fields = {"prompt": "question"} if fmt == "prompt" else {}
        auto = _dm(tokenizer, {"path": path, "fields": fields}, **kw).train_dataset.prompts
        assert auto == _dm(tokenizer, {"path": path, "fields": fields}, format=fmt, **kw).train_dataset.prompts
    with pytest.raises(DataError, match=r"tldr\.jsonl', record 1 \(line 1\): missing field 'post'"):
        _dm(tokenizer, {"path": _jsonl(tmp_path / "tldr.jsonl", [{"subreddit": "a", "title": "b"}])}, format="tldr")
    with pytest.raises(ConfigError, match="data.format must be one of"):
        PromptDataModule(train=DataSource(path=tldr), format="reddit")


def test_uids_stable_across_setups_and_ids_unique(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Question number {i}?"} for i in range(10)])
    one = _dm(tokenizer, {"path": path}, val_fraction=0.3, seed=1)
    two = _dm(tokenizer, {"path": path}, val_fraction=0.3, seed=1)
    assert one.train_dataset.uids == two.train_dataset.uids and one.val_dataset.uids == two.val_dataset.uids
    every = one.train_dataset.examples + one.val_dataset.examples
    assert {ex.uid for ex in every} == {_sha(f"Question number {i}?") for i in range(10)}
    assert all(ex.uid == _sha(ex.prompt) for ex in every)
    # the template and the chat template change the tokens, never the ids
    other = _dm(tokenizer, {"path": path}, val_fraction=0.3, seed=1, template="Q: {prompt}\nA:")
    assert other.train_dataset.uids == one.train_dataset.uids
    assert other.train_dataset.fingerprint() != one.train_dataset.fingerprint()
    clash = _jsonl(tmp_path / "clash.jsonl", [{"id": 1, "prompt": "A?"}, {"id": 2, "prompt": "B?"},
                                              {"id": 1, "prompt": "C?"}])
    with pytest.raises(DataError, match=r"record 3 \(line 3\) has id '1', like .*record 1 .*another prompt"):
        _dm(tokenizer, {"path": clash})


def test_left_padded_batches_and_repeat(tokenizer):
    dm = _dm(tokenizer, {"path": "builtin:seed_prompts/val"}, template=DEFENDER_TEMPLATE, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PromptBatch) and len(batch) == 4
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.index.dtype == torch.long
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.attention_mask.shape[0] == 4
    assert not bool(batch.attention_mask.all())  # these questions differ in length: some rows are padded
    assert bool((batch.attention_mask[:, 1:] >= batch.attention_mask[:, :-1]).all())  # padding on the left only
    assert bool((batch.input_ids[batch.attention_mask == 0] == tokenizer.pad_token_id).all())
    assert _rows_of(dm, batch) == [DEFENDER_TEMPLATE.format(prompt=p) for p in batch.prompts]
    assert batch.prompts == [dm.train_dataset[i].prompt for i in batch.index.tolist()]
    assert batch.uids == [_sha(p) for p in batch.prompts]
    moved = move_data_to_device(batch, torch.device("cpu"))
    assert isinstance(moved, PromptBatch) and moved.uids == batch.uids and torch.equal(moved.input_ids, batch.input_ids)
    # the game's names read the same fields
    assert batch.attacker_ids is batch.input_ids and batch.attacker_mask is batch.attention_mask
    assert batch.seeds is batch.prompts
    group = batch.repeat(3)  # k samples per prompt, each prompt's copies contiguous
    assert len(group) == 12 and group.uids == [u for u in batch.uids for _ in range(3)]
    assert torch.equal(group.input_ids[3:6], batch.input_ids[1:2].expand(3, -1))
    assert group.index.tolist() == batch.index.repeat_interleave(3).tolist()
    with pytest.raises(ValueError, match="k >= 1"):
        batch.repeat(0)


def test_chat_template_on_and_off(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "How do I bake bread?"}])
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                         add_generation_prompt=True, tokenize=False)
    default = _dm(tokenizer, {"path": path})  # the tokenizer has a chat template and the template is "{prompt}"
    on = _dm(tokenizer, {"path": path}, chat_template=True)
    off = _dm(tokenizer, {"path": path}, chat_template=False)
    templated = _dm(tokenizer, {"path": path}, template="Human: {prompt}\nAI:")  # a template turns it off
    first = lambda dm: dm.train_dataset[0].input_ids  # noqa: E731
    assert first(default) == first(on) == tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(first(on)) == chat and chat.endswith("<|assistant|>\n")
    assert tokenizer.decode(first(off)) == "How do I bake bread?"
    assert tokenizer.decode(first(templated)) == "Human: How do I bake bread?\nAI:"
    assert on.train_dataset[0].prompt == off.train_dataset[0].prompt == "How do I bake bread?"
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert tokenizer.decode(first(_dm(plain, {"path": path}))) == "How do I bake bread?"
    with pytest.raises(ConfigError, match="data.chat_template is true but the tokenizer has no chat template"):
        _dm(plain, {"path": path}, chat_template=True)


def test_empty_prompts_are_refused_naming_the_record(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Fine?"}, {"prompt": " \n "}, {"prompt": "Also fine?"}])
    with pytest.raises(DataError, match=r"p\.jsonl', record 2 \(line 2\): the prompt is empty.*data\.drop_empty"):
        _dm(tokenizer, {"path": path})
    hh = _jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello."},
                                        {"chosen": "\n\nHuman:    \n\nAssistant: Hm."}])
    with pytest.raises(DataError, match=r"hh\.jsonl', record 2 \(line 2\): the prompt is empty"):
        _dm(tokenizer, {"path": hh}, format="hh")
    with pytest.warns(UserWarning, match="dropped 1 of 3 empty prompts"):
        dm = _dm(tokenizer, {"path": path}, drop_empty=True)
    assert dm.train_dataset.prompts == ["Fine?", "Also fine?"] and dm.train_dataset.dropped == 1
    assert [ex.source_index for ex in dm.train_dataset.examples] == [0, 2]
    # a chat template that drops the user's words leaves a prompt that is empty once templated
    mute = copy.deepcopy(tokenizer)
    mute.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{% endfor %}<|assistant|>\n"
    ok = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "Fine?"}])
    with pytest.raises(DataError, match=r"ok\.jsonl', record 1 \(line 1\): the prompt 'Fine\?' is empty once "
                                        r"rendered by data\.template and the chat template"):
        _dm(mute, {"path": ok})


def test_long_prompts_dropped_and_counted(tokenizer):
    full = _dm(tokenizer, {"path": "builtin:seed_prompts/val"}, chat_template=False)
    lengths = [len(ex.input_ids) for ex in full.train_dataset.examples]
    limit = sorted(lengths)[len(lengths) // 2]
    with pytest.warns(UserWarning, match="longer than data.max_prompt_tokens"):
        dm = _dm(tokenizer, {"path": "builtin:seed_prompts/val"}, chat_template=False, max_prompt_tokens=limit)
    kept = [ex.uid for ex, n in zip(full.train_dataset.examples, lengths) if n <= limit]
    assert dm.train_dataset.uids == kept and dm.train_dataset.dropped == len(lengths) - len(kept)
    assert [ex.index for ex in dm.train_dataset.examples] == list(range(len(kept)))


def test_sharded_loaders_disjoint_and_resumable(tmp_path, tokenizer, monkeypatch):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}?"} for i in range(12)])

    def epoch(rank: int, replicas: int = 2, state: dict | None = None) -> list[PromptBatch]:
        dm = _dm(tokenizer, {"path": path}, batch_size=2, seed=3)
        monkeypatch.setattr(dm, "_shard", lambda: (replicas, rank))  # as the DDP strategy would report
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        if state is not None:
            loader.load_state_dict(state)
        return list(loader)

    ranks = [epoch(r) for r in range(2)]
    seen = [[u for b in batches for u in b.uids] for batches in ranks]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(f"q{i}" for i in range(12))
    for batches in ranks:
        for b in batches:
            assert b.uids == [f"q{i}" for i in b.index.tolist()]  # global index and id agree on every rank
    assert [u for b in epoch(0) for u in b.uids] == seen[0]  # a fresh setup repeats the epoch exactly
    one_rank = [u for b in epoch(0, replicas=1) for u in b.uids]
    assert sorted(one_rank) == sorted(seen[0] + seen[1]) and one_rank[::2] == seen[0]
    resumed = epoch(1, state={"epoch": 1, "consumed": 1})  # a mid-epoch resume continues with the next batch
    assert [b.uids for b in resumed] == [b.uids for b in ranks[1][1:]]


def test_builtin_prompts_with_tiny_game_base_and_seed_subclass():
    tok = build_tokenizer(ModelSpec(name_or_path="builtin:tiny-game-base"))
    dm = PromptDataModule(train=DataSource(path="builtin:seed_prompts"), val=DataSource(path="builtin:seed_prompts/val"),
                          template=DEFENDER_TEMPLATE, batch_size=8, tokenizer="builtin:tiny-game-base")
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (360, 48) and not dm.use_chat_template(tok)
    batch = next(iter(dm.val_dataloader()))
    assert [tok.decode(r[m.bool()]) for r, m in zip(batch.input_ids, batch.attention_mask)] == \
        [f"Human: {p}\nAI:" for p in batch.prompts]
    model = build_causal_lm(ModelSpec(name_or_path="builtin:tiny-game-base"), tok)  # the batch feeds the sampler as is
    group = batch.repeat(2)
    out = sample(model, group.input_ids, group.attention_mask, SamplingConfig(max_new_tokens=4, do_sample=False),
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert out.response_ids.shape[0] == 16 and torch.equal(out.response_ids[0::2], out.response_ids[1::2])
    seeds = SeedPromptDataModule(train=DataSource(path="builtin:seed_prompts/val"), val_fraction=0.0,
                                 tokenizer="builtin:tiny-game-base")
    seeds.setup("fit")
    assert isinstance(seeds, PromptDataModule) and seeds.train_dataset.uids == dm.val_dataset.uids
    assert seeds.attacker_template == seeds.template and "{seed}" in seeds.template
    with pytest.raises(ConfigError, match=r"data.template must contain '\{prompt\}'"):
        PromptDataModule(train=DataSource(path="builtin:seed_prompts"), template="Q: {question}")


def test_docstring_data_blocks_are_valid_configs():
    """The real-scale DATA blocks of the class docstring parse, and name only real arguments."""
    blocks = re.split(r"\n(?=\s*data:)", inspect.getdoc(PromptDataModule).split("Examples::", 1)[1])
    params = set(inspect.signature(PromptDataModule.__init__).parameters) - {"self"}
    configs = [yaml.safe_load(b)["data"] for b in blocks if b.strip().startswith("data:")]
    assert len(configs) == 4 and {c["init_args"].get("format", "auto") for c in configs} == {"auto", "hh", "prompt", "tldr"}
    for c in configs:
        assert c["class_path"] == "lit_align.data.PromptDataModule" and set(c["init_args"]) <= params
        for split in ("train", "val"):
            DataSource(**c["init_args"][split])


class _Trainer:
    """The two things PromptDataModule's train loader reads of a trainer: the epoch and the (absent) sharding."""

    def __init__(self, epoch: int, reload: int = 1) -> None:
        self.current_epoch, self.strategy, self.lightning_module = epoch, None, None
        self.reload_dataloaders_every_n_epochs = reload  # the stage driver forces 1


def test_iterations_serve_disjoint_contiguous_slices_one_per_epoch(tokenizer):
    """data.iterations = 3 over 10 prompts: F = 10 // 3 = 3; epoch k serves dataset positions 3k .. 3k+2 (SELM's
    train_prefs[k F:(k+1) F]), shuffled within the slice only; the 10th prompt is left out (warned); no prompt is
    served in two iterations; batches keep the dataset index."""
    with pytest.warns(UserWarning, match="1 of 10 training prompts"):
        dm = _dm(tokenizer, {"path": "builtin:seed_prompts", "limit": 10}, iterations=3, batch_size=2)
    assert dm.num_stages == 3
    seen = []
    for epoch in range(3):
        dm.trainer = _Trainer(epoch)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        index = torch.cat([b.index for b in loader]).tolist()
        assert sorted(index) == [3 * epoch, 3 * epoch + 1, 3 * epoch + 2]
        seen.append(set(index))
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    dm.trainer = _Trainer(3)
    with pytest.raises(ConfigError, match="trainer.max_epochs to 3"):
        dm.train_dataloader()
    dm.trainer = _Trainer(1, reload=0)  # a method outside the stage driver would serve slice 0 at every epoch
    with pytest.raises(ConfigError, match="trainer.reload_dataloaders_every_n_epochs: 1"):
        dm.train_dataloader()


def test_iterations_needing_more_prompts_than_the_data_has_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match=r"data.iterations = 5 needs at least 5 training prompts .* gives 4"):
        _dm(tokenizer, {"path": "builtin:seed_prompts", "limit": 4}, iterations=5)
    with pytest.raises(ConfigError, match="data.iterations must be an int >= 1"):
        PromptDataModule(train=DataSource(path="builtin:seed_prompts"), iterations=0)


def test_dataset_responses_are_kept_when_the_format_has_them(tmp_path, tokenizer):
    """prompt/chosen/rejected records (builtin:preferences; UltraFeedback-binarized's message lists) keep their
    two responses, chosen first; hh transcripts give their first assistant turns; prompt-only data gives none."""
    dm = _dm(tokenizer, {"path": "builtin:preferences", "limit": 2}, format="prompt", shuffle=False)
    first = json.loads((BUILTIN_DIR / "preferences.jsonl").read_text().splitlines()[0])
    batch = next(iter(dm.train_dataloader()))
    assert batch.responses[0] == [first["chosen"], first["rejected"]]
    assert batch.repeat(2).responses[:2] == [batch.responses[0]] * 2
    messages = _jsonl(tmp_path / "uf.jsonl", [{"prompt": "Hi?", "chosen": [{"role": "user", "content": "Hi?"},
                                                                         {"role": "assistant", "content": "Hello."}],
                                               "rejected": [{"role": "user", "content": "Hi?"},
                                                            {"role": "assistant", "content": "Go away."}]}])
    assert _dm(tokenizer, {"path": messages}).train_dataset[0].responses == ("Hello.", "Go away.")
    hh = _jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: Q?\n\nAssistant: Yes.\n\nHuman: Why?\n\nAssistant: So.",
                                         "rejected": "\n\nHuman: Q?\n\nAssistant: No."}])
    assert _dm(tokenizer, {"path": hh}, format="hh").train_dataset[0].responses == ("Yes.", "No.")
    assert _dm(tokenizer, {"path": "builtin:seed_prompts", "limit": 2}).train_dataset[0].responses == ()
