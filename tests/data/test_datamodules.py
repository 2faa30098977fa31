"""DataModules (standalone and under a real Trainer), the sharded sampler and the resumable loader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align.data import (
    DataSource,
    PreferenceBatch,
    PreferenceDataModule,
    SequenceBatch,
    SFTDataModule,
    load_records,
)
from lit_align.data.sampling import ResumableDataLoader, ShardedSampler
from lit_align.methods import SFTModule
from lit_align.models import TINY_TOKENIZER, ModelSpec, TinyArch


def _sft(**kwargs) -> SFTDataModule:
    kwargs = {"train": DataSource("builtin:instructions", limit=40), "batch_size": 4, "max_length": 64,
              "tokenizer": TINY_TOKENIZER, **kwargs}
    dm = SFTDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _prompts(dataset) -> list[tuple[int, ...]]:
    return [tuple(ex.prompt) for ex in dataset]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- setup and splits


def test_sft_datamodule_batches_mask_the_response():
    dm = _sft(val_fraction=0.0)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, SequenceBatch) and len(batch) == 4
    tok = dm.tokenizer
    for row in range(4):
        response = batch.input_ids[row][batch.loss_mask[row].bool()].tolist()
        assert response[-1] == tok.eos_token_id
        prompt = batch.input_ids[row][: batch.loss_mask[row].nonzero()[0].item()].tolist()
        assert tok.decode(prompt).startswith("<|user|>\n") and tok.decode(prompt).endswith("<|assistant|>\n")
    assert (batch.loss_mask <= batch.attention_mask).all()


def test_validation_split_is_seeded_disjoint_and_deterministic():
    a, b, other = _sft(val_fraction=0.25), _sft(val_fraction=0.25), _sft(val_fraction=0.25, seed=1)
    assert (len(a.train_dataset), len(a.val_dataset)) == (30, 10)
    assert not set(_prompts(a.train_dataset)) & set(_prompts(a.val_dataset))
    assert len(set(_prompts(a.train_dataset)) | set(_prompts(a.val_dataset))) == 40
    assert a.val_dataset.fingerprint() == b.val_dataset.fingerprint()
    assert a.train_dataset.fingerprint() == b.train_dataset.fingerprint()
    assert set(_prompts(other.val_dataset)) != set(_prompts(a.val_dataset))
    val_batch = next(iter(a.val_dataloader()))  # unshuffled, in split order
    assert val_batch.index.tolist() == [0, 1, 2, 3]


def test_explicit_val_source_is_used_whole(tmp_path):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(3)]
    val = _write_jsonl(tmp_path / "val.jsonl", rows)
    dm = _sft(val=DataSource(val), val_fraction=0.5)  # val_fraction is ignored when val is given
    assert len(dm.train_dataset) == 40 and len(dm.val_dataset) == 3
    assert dm.tokenizer.decode(dm.val_dataset[2].prompt) == "<|user|>\nQuestion 2?<|end|>\n<|assistant|>\n"


def test_val_fraction_zero_disables_validation():
    dm = _sft(val_fraction=0.0)
    assert len(dm.train_dataset) == 40 and dm.val_dataset is None
    assert dm.val_dataloader() == []
    assert list(dm.split_loaders()) == ["train"]


def test_chat_template_false_uses_plain_prompts():
    dm = _sft(val_fraction=0.0, chat_template=False)
    first = load_records(DataSource("builtin:instructions"), ["prompt", "response"])[0]
    assert dm.tokenizer.decode(dm.train_dataset[0].prompt) == first["prompt"]


def test_preference_datamodule_setup_and_batch():
    dm = PreferenceDataModule(DataSource("builtin:preferences", limit=20), val_fraction=0.2, batch_size=3,
                              max_length=64, tokenizer=TINY_TOKENIZER)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (16, 4)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, PreferenceBatch) and len(batch) == 3
    for side in (batch.chosen, batch.rejected):
        first_response = side.loss_mask.argmax(dim=1)  # (B,) where each response starts
        assert torch.equal(first_response, batch.chosen.loss_mask.argmax(dim=1))  # one shared prompt length
        assert side.input_ids.shape[1] <= 64
    for row in range(3):  # prompts are identical on both sides
        n = int(batch.chosen.loss_mask[row].argmax())
        assert torch.equal(batch.chosen.input_ids[row, :n], batch.rejected.input_ids[row, :n])


def test_conversational_preferences_take_the_prompt_from_chosen(tmp_path):
    user = {"role": "user", "content": "Say hi."}
    rows = [{"chosen": [user, {"role": "assistant", "content": "Hi!"}],
             "rejected": [user, {"role": "assistant", "content": "No."}]}] * 2
    dm = PreferenceDataModule(DataSource(_write_jsonl(tmp_path / "chat.jsonl", rows)), val_fraction=0.0,
                              tokenizer=TINY_TOKENIZER)
    dm.setup()
    ex, tok = dm.train_dataset[0], dm.tokenizer
    assert tok.decode(ex.prompt) == "<|user|>\nSay hi.<|end|>\n<|assistant|>\n"
    assert tok.decode(ex.chosen) == "Hi!<|endoftext|>" and tok.decode(ex.rejected) == "No.<|endoftext|>"


def test_datamodule_takes_the_tokenizer_of_the_module_under_a_trainer(tmp_path):
    """No ``tokenizer=``: the DataModule uses ``module.tokenizer``; consumed batches are counted per step."""
    module = SFTModule(ModelSpec(tiny=TinyArch(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                               intermediate_size=32)))
    dm = SFTDataModule(DataSource("builtin:instructions", limit=24), val_fraction=0.25, batch_size=4, max_length=48)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert dm.tokenizer is module.tokenizer
    assert trainer.global_step == 2
    assert dm._train_loader.state_dict() == {"epoch": 0, "consumed": 2}


# --------------------------------------------------------------------------- sampling


def test_two_ranks_cover_what_one_rank_with_double_batch_covers():
    data, b = list(range(13)), 2
    one = list(ShardedSampler(data, num_replicas=1, rank=0, seed=3))
    ranks = [list(ShardedSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert sorted(one) == data
    assert len(ranks[0]) == len(ranks[1]) == 7  # 13 padded to 14 by wrapping
    for step in range(len(ranks[0]) // b):
        together = ranks[0][step * b : (step + 1) * b] + ranks[1][step * b : (step + 1) * b]
        assert sorted(together) == sorted(one[step * 2 * b : (step + 1) * 2 * b])
    assert set(ranks[0]) | set(ranks[1]) == set(data)


def test_padding_repeats_the_last_rows_so_a_sorted_order_stays_sorted_per_rank():
    """5 rows on 2 ranks (total 6) pad with row 4, on 4 ranks (total 8) with rows 2, 3, 4: each rank's share of an
    unshuffled order stays increasing; 1 row on 3 ranks repeats it. Shuffled orders pad with their own last rows."""
    data = list(range(5))
    assert [list(ShardedSampler(data, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)] == [[0, 2, 4], [1, 3, 4]]
    four = [list(ShardedSampler(data, num_replicas=4, rank=r, shuffle=False)) for r in range(4)]
    assert four == [[0, 4], [1, 2], [2, 3], [3, 4]]
    assert [list(ShardedSampler(["x"], num_replicas=3, rank=r, shuffle=False)) for r in range(3)] == [[0], [0], [0]]
    order = ShardedSampler(list(range(13)), num_replicas=2, seed=3)._epoch_order()
    assert order[13:] == order[12:13] and sorted(order[:13]) == list(range(13))


def test_sampler_is_deterministic_per_epoch_and_differs_across_epochs():
    data = list(range(32))
    s = ShardedSampler(data, seed=0)
    epoch0 = list(s)
    assert list(s) == epoch0 == list(ShardedSampler(data, seed=0))
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0 and sorted(epoch1) == data
    assert list(ShardedSampler(data, seed=1)) != epoch0
    assert list(ShardedSampler(data, shuffle=False)) == data


def test_sampler_skip_applies_once_and_only_in_its_epoch():
    data = list(range(10))
    s = ShardedSampler(data, seed=0)
    full = list(s)
    s.resume(0, 4)
    assert list(s) == full[4:]
    assert list(s) == full  # the skip is spent
    s.resume(0, 4)
    s.set_epoch(1)  # a checkpoint from the end of epoch 0 resumes in epoch 1: nothing to skip
    assert sorted(list(s)) == data and list(s) != full[4:]
    s.resume(1, 10)  # everything of epoch 1 consumed: the epoch is over, not empty
    assert len(list(s)) == 10


def test_resumable_loader_continues_with_the_next_batch():
    dm = _sft(val_fraction=0.0)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    batches = []
    for batch in loader:
        batches.append(batch.index.tolist())
        loader.consumed += 1  # what on_after_batch_transfer does when a batch reaches the step
        if len(batches) == 3:
            break
    state = loader.state_dict()
    assert state == {"epoch": 2, "consumed": 3}
    expected = next(b.index.tolist() for i, b in enumerate(loader) if i == 3)

    fresh = _sft(val_fraction=0.0).train_dataloader()
    assert isinstance(fresh, ResumableDataLoader)
    fresh.load_state_dict(state)
    resumed = iter(fresh)
    assert next(resumed).index.tolist() == expected
    assert fresh.consumed == 3  # a resumed epoch keeps counting from the checkpoint
    assert len(list(resumed)) == len(fresh) - 4
    assert [b.index.tolist() for b in fresh][:1] == [batches[0]]  # the next epoch starts whole


def test_truncation_warning_is_emitted_every_epoch():
    dm = _sft(val_fraction=0.0, max_length=16)
    assert dm.train_dataset.truncated > 0
    loader = dm.train_dataloader()
    with pytest.warns(UserWarning, match=r"epoch 0: \d+ of 40 training examples .*data\.max_length=16"):
        iter(loader)
    loader.sampler.set_epoch(1)
    with pytest.warns(UserWarning, match=r"epoch 1: .*data\.max_length=16"):
        iter(loader)
    fine = _sft(val_fraction=0.0, max_length=512)
    assert fine.train_dataset.truncated == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iter(fine.train_dataloader())
