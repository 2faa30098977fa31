"""Classification data: batches, splits, the base DataModule and the label oracle.

A batch is a plain dict (collated by PyTorch's default collate, text padded per batch):

* ``"x"``: float Tensor ``(B, F)`` (tabular) or ``(B, C, H, W)`` (images); for text a dict
  ``{"input_ids": LongTensor (B, T), "attention_mask": LongTensor (B, T)}``;
* ``"y"``: LongTensor ``(B,)``, class labels ``0..K-1``;
* ``"index"``: LongTensor ``(B,)``, the row's stable index in the whole source (its position after the
  source's documented preprocessing, before any split);
* ``"group"``: LongTensor ``(B,)`` of the sensitive attribute ``0..M-1``, ONLY in batches of the ``val`` and
  ``test`` subsets (and ``test_forget`` / ``test_retain``). The training-side subsets (``train``,
  ``forget``, ``retain``, ``labelled``, ``pool``) never carry it, so training code cannot read it; their
  group values may even be missing (NaN).

A split (:class:`HoldoutSplit`, :class:`ForgetSplit`, :class:`ActiveLearningSplit`, chosen in YAML by
``class_path``) turns the labels into named subsets of stable indices; :class:`ClassificationDataModule`
serves each subset as a dataset and as a seeded, resumable, rank-sharded loader, and its
``train_dataloader`` combines the streams the LightningModule names in ``train_streams()``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import Dataset, default_collate

from lit_align.data.sampling import ResumableDataLoader, ShardedSampler, trainer_shard
from lit_align.errors import ConfigError, DataError, check_int, require

__all__ = [
    "ActiveLearningSplit",
    "ClassificationDataModule",
    "ClassificationSubset",
    "ForgetSplit",
    "HoldoutSplit",
    "LabelOracle",
    "SourceRows",
    "Split",
    "TrainStreams",
    "encode_groups",
    "encode_labels",
]

#: Subsets whose batches carry ``"group"``: the only ones evaluation code may read groups from.
GROUP_SUBSETS = ("val", "test", "test_forget", "test_retain")


@dataclass(frozen=True)
class TrainStreams:
    """The subsets a LightningModule trains on, as ``train_streams()`` returns them."""

    names: tuple[str, ...]
    """Subset names, e.g. ``("train",)`` or ``("forget", "retain")``."""
    mode: Literal["min_size", "max_size_cycle", "sequential"] = "sequential"
    """How several streams are combined (Lightning's ``CombinedLoader`` modes: ``min_size`` ends the epoch with the
    shortest stream, ``max_size_cycle`` with the longest, restarting the others); unused for one stream. Lightning's
    fit loop refuses ``sequential`` for several streams."""


@dataclass
class SourceRows:
    """What a source hands the base DataModule: labels, optional groups and fine labels (features stay in the
    subclass, which builds them once the split is known)."""

    labels: np.ndarray
    """(N,) int64 class ids ``0..K-1``."""
    class_names: list[str]
    """Name of each class id."""
    groups: np.ndarray | None = None
    """(N,) float group ids ``0..M-1``, NaN where unknown; ``None`` when the source has no group column."""
    group_names: list[str] = field(default_factory=list)
    """Name of each group id."""
    fine_labels: np.ndarray | None = None
    """(N,) int64 sub-class ids (e.g. CIFAR-100's 100 classes under its 20 super-classes), for sub-class forgetting."""
    is_test: np.ndarray | None = None
    """(N,) bool: rows of the source's own test split (used as ``test`` by the holdout and forget splits)."""


# -- label and group encoding ------------------------------------------------------------------
def _other_name(values: np.ndarray, positive: Any) -> str:
    """Name of the 0 class of a binary encoding: the other value when there is exactly one, else ``not <positive>``."""
    others = {str(v) for v in values.tolist()} - {str(positive)}
    return others.pop() if len(others) == 1 else f"not {positive}"


def encode_labels(values: Sequence[Any], *, positive: Any = None, key: str = "data.target",
                  where: str = "") -> tuple[np.ndarray, list[str]]:
    """Class ids of raw label values: with ``positive``, 1 where the value equals it (string compare) and 0
    elsewhere (classes ``[not <positive>, <positive>]``); otherwise the sorted distinct values numbered
    ``0..K-1`` (so labels that already are ``0..K-1`` keep their ids). A missing value is a DataError."""
    raw = np.asarray(values, dtype=object)
    missing = [i for i, v in enumerate(raw) if v is None or (isinstance(v, float) and np.isnan(v))]
    if missing:
        raise DataError(f"{where}{key}: {len(missing)} rows have no label (first at row {missing[0]}); "
                        "drop them or fill the column")
    if positive is not None:
        hits = np.array([str(v) == str(positive) for v in raw])
        if not hits.any():
            raise ConfigError(f"{key.replace('target', 'positive')}={positive!r} matches no row of "
                              f"{where or 'the source'}{key}; values: {sorted({str(v) for v in raw})[:20]}")
        return hits.astype(np.int64), [_other_name(raw, positive), str(positive)]
    classes = sorted(set(raw.tolist()), key=lambda v: (str(type(v)), v))
    ids = {v: i for i, v in enumerate(classes)}
    return np.array([ids[v] for v in raw], dtype=np.int64), [str(c) for c in classes]


def encode_groups(values: Sequence[Any], *, positive: Any = None, threshold: float | None = None,
                  key: str = "data.group", where: str = "") -> tuple[np.ndarray, list[str]]:
    """Group ids (float, NaN kept for missing values) of raw sensitive-attribute values: with ``positive``,
    1 where the value equals it and 0 elsewhere; with ``threshold``, 1 where the (numeric) value is
    ``>= threshold``; otherwise the sorted distinct non-missing values numbered ``0..M-1``. A ``positive`` that
    matches no row is a ConfigError, a non-numeric value under ``threshold`` a DataError (each naming ``key``)."""
    raw = np.asarray(values, dtype=object)
    known = np.array([not (v is None or (isinstance(v, float) and np.isnan(v))) for v in raw], dtype=bool)
    out = np.full(len(raw), np.nan)
    if threshold is not None:
        out[known] = [_threshold_value(v, i, key, where) >= threshold for i, v in zip(np.flatnonzero(known), raw[known])]
        return out, [f"< {threshold:g}", f">= {threshold:g}"]
    if positive is not None:
        hits = np.array([str(v) == str(positive) for v in raw[known]], dtype=bool)
        if not hits.any():
            raise ConfigError(f"data.group_positive={positive!r} matches no row of {where or 'the source'}{key} (every row "
                              f"would be in one group and the fairness gaps undefined); values: "
                              f"{sorted({str(v) for v in raw[known]})[:20]}")
        out[known] = hits.astype(float)
        return out, [_other_name(raw[known], positive), str(positive)]
    names = sorted({v for v in raw[known].tolist()}, key=lambda v: (str(type(v)), v))
    ids = {v: i for i, v in enumerate(names)}
    out[known] = [ids[v] for v in raw[known]]
    return out, [str(n) for n in names]


def _threshold_value(value: Any, row: int, key: str, where: str) -> float:
    """``value`` as a number for ``data.group_threshold``, or a DataError naming the row and the value."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}data.group_threshold is set but {key} has the non-numeric value {value!r} (row "
                        f"{row}): a threshold needs a numeric column; use data.group_positive for a categorical one"
                        ) from None


# -- splits ---------------------------------------------------------------------------------------
def _check_fraction(key: str, value: float, *, allow_zero: bool = True) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    require(number and (value >= 0.0 if allow_zero else value > 0.0) and value < 1.0, key,
            f"in {'[0' if allow_zero else '(0'}, 1)", value)


def _take(pool: np.ndarray, labels: np.ndarray, fraction: float, seed: int, stratify: bool, key: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` (indices) into (rest, taken) with ``round(fraction * len)`` taken, seeded, stratified by
    ``labels[pool]`` when asked and every class has at least two rows there."""
    from sklearn.model_selection import train_test_split  # imported here: lit_align.data loads without sklearn

    n = int(round(fraction * len(pool)))
    if n == 0:
        return np.sort(pool), np.array([], dtype=np.int64)
    if n >= len(pool):
        raise ConfigError(f"{key}={fraction} takes all {len(pool)} rows; lower it")
    counts = np.bincount(labels[pool])
    counts = counts[counts > 0]
    strat = labels[pool] if stratify and len(counts) > 1 and counts.min() >= 2 else None
    try:
        rest, taken = train_test_split(pool, test_size=n, random_state=seed, stratify=strat)
    except ValueError:  # too few rows per class for a stratified cut of this size
        rest, taken = train_test_split(pool, test_size=n, random_state=seed, stratify=None)
    return np.sort(rest), np.sort(taken)


class Split:
    """Base of the splits: ``assign(rows) -> {subset name: sorted stable indices}``."""

    seed: int
    val_fraction: float
    test_fraction: float
    stratify: bool

    @abstractmethod
    def assign(self, rows: SourceRows) -> dict[str, np.ndarray]:
        """The subsets of this split."""

    def _holdout(self, rows: SourceRows) -> dict[str, np.ndarray]:
        """``train``, ``val``, ``test``: the source's own test rows as ``test`` when it has them (then
        ``test_fraction`` is unused), else ``test_fraction`` of all rows; ``val_fraction`` of all rows (of the
        non-test rows when the source has its own test split) as ``val``; both seeded and stratified."""
        _check_fraction("data.split.val_fraction", self.val_fraction)
        _check_fraction("data.split.test_fraction", self.test_fraction)
        everything = np.arange(len(rows.labels))
        if rows.is_test is not None and rows.is_test.any():
            test = everything[rows.is_test]
            rest = everything[~rows.is_test]
            train, val = _take(rest, rows.labels, self.val_fraction, self.seed, self.stratify,
                               "data.split.val_fraction")
        else:
            if self.val_fraction + self.test_fraction >= 1.0:
                raise ConfigError(f"data.split.val_fraction + data.split.test_fraction must be < 1, got "
                                  f"{self.val_fraction} + {self.test_fraction}")
            rest, test = _take(everything, rows.labels, self.test_fraction, self.seed, self.stratify,
                               "data.split.test_fraction")
            frac = self.val_fraction * len(everything) / max(len(rest), 1)
            train, val = _take(rest, rows.labels, frac, self.seed + 1, self.stratify, "data.split.val_fraction")
        return {"train": train, "val": val, "test": test}


@dataclass
class HoldoutSplit(Split):
    """Train / validation / test (the source's own test split, when it has one, is the test set)."""

    val_fraction: float = 0.1
    """Share of the rows held out for validation (of the non-test rows when the source has its own test split)."""
    test_fraction: float = 0.2
    """Share of all rows held out for testing (unused when the source has its own test split)."""
    seed: int = 0
    """Seed of the split (independent of the loaders' shuffling seed)."""
    stratify: bool = True
    """Keep each class's share equal across the subsets."""

    def assign(self, rows: SourceRows) -> dict[str, np.ndarray]:
        return self._holdout(rows)


@dataclass
class ForgetSplit(Split):
    """A holdout split whose ``train`` rows are cut into ``forget`` and ``retain``.

    * ``class_wise``: ``forget`` = every train row of the classes ``classes``; ``test_forget`` / ``test_retain``
      are the test rows of those classes / of the remaining classes (UA and TA as in the paper).
    * ``random``: ``forget`` = a seeded ``fraction`` of the train rows (stratified); no test_forget/test_retain.
    * ``sub_class``: ``forget`` = train rows whose fine label (the source's ``fine_labels``, e.g. CIFAR-100's
      100 classes while ``y`` is the 20 super-classes) is in ``sub_classes``; ``test_forget`` / ``test_retain``
      split the test rows the same way.

    ``val`` and ``test`` keep the forgotten classes' rows.
    """

    kind: Literal["class_wise", "random", "sub_class"] = "class_wise"
    """Forgetting paradigm."""
    classes: list[int] = field(default_factory=list)
    """Class ids to forget (``class_wise``)."""
    fraction: float = 0.1
    """Share of the train rows to forget (``random``)."""
    sub_classes: list[int] = field(default_factory=list)
    """Fine-label ids to forget (``sub_class``)."""
    val_fraction: float = 0.1
    """As in :class:`HoldoutSplit`."""
    test_fraction: float = 0.2
    """As in :class:`HoldoutSplit`."""
    seed: int = 0
    """Seed of the holdout and of the random forget set."""
    stratify: bool = True
    """Stratify the holdout and the random forget set by class."""

    def assign(self, rows: SourceRows) -> dict[str, np.ndarray]:
        subsets = self._holdout(rows)
        train, test = subsets["train"], subsets["test"]
        if self.kind == "random":
            _check_fraction("data.split.fraction", self.fraction, allow_zero=False)
            retain, forget = _take(train, rows.labels, self.fraction, self.seed + 2, self.stratify,
                                   "data.split.fraction")
            return {**subsets, "forget": forget, "retain": retain}
        if self.kind == "class_wise":
            valid = sorted(set(range(len(rows.class_names))))
            bad = [c for c in self.classes if c not in valid]
            if not self.classes or bad:
                problem = f"no class {bad}" if bad else "give at least one class"
                listing = ", ".join(f"{i} ({n})" for i, n in enumerate(rows.class_names))
                raise ConfigError(f"data.split.classes={self.classes!r}: {problem}; valid classes: {listing}")
            member = np.isin(rows.labels, self.classes)
        elif self.kind == "sub_class":
            if rows.fine_labels is None:
                raise ConfigError("data.split.kind='sub_class' needs a source with fine labels (e.g. CIFAR-100 "
                                  "super-classes with data.fine_label_column); this source has none")
            valid = sorted(set(rows.fine_labels.tolist()))
            bad = [c for c in self.sub_classes if c not in valid]
            if not self.sub_classes or bad:
                raise ConfigError(f"data.split.sub_classes={self.sub_classes!r}: "
                                  f"{'give at least one' if not self.sub_classes else f'no fine label {bad}'}; "
                                  f"valid fine labels: {valid}")
            member = np.isin(rows.fine_labels, self.sub_classes)
        else:
            raise ConfigError(f"data.split.kind must be 'class_wise', 'random' or 'sub_class', got {self.kind!r}")
        forget, retain = train[member[train]], train[~member[train]]
        if len(forget) == 0:
            raise ConfigError(f"data.split: the forget set is empty (no training rows of "
                              f"{self.classes or self.sub_classes})")
        return {**subsets, "forget": forget, "retain": retain,
                "test_forget": test[member[test]], "test_retain": test[~member[test]]}


@dataclass
class ActiveLearningSplit(Split):
    """FIS's split: a labelled set, an unlabelled pool, and a validation and a test set with groups.

    ``test`` = ``test_ratio`` of all rows, ``val`` = ``val_ratio`` of all rows, ``labelled`` = ``label_ratio`` of
    the remaining (training) rows, ``pool`` = the rest of them; all seeded and stratified by class. ``train`` is
    ``labelled``. The source's own test split is not used (the ratios cover every row, as in FIS's scripts).
    """

    label_ratio: float = 0.2
    """Share of the training rows labelled at the start (D_L)."""
    val_ratio: float = 0.1
    """Share of all rows in the validation set (the only one whose groups training-time code uses)."""
    test_ratio: float = 0.2
    """Share of all rows in the test set."""
    seed: int = 0
    """Seed of the split."""
    stratify: bool = True
    """Stratify every cut by class."""

    def assign(self, rows: SourceRows) -> dict[str, np.ndarray]:
        _check_fraction("data.split.label_ratio", self.label_ratio, allow_zero=False)
        _check_fraction("data.split.val_ratio", self.val_ratio, allow_zero=False)
        _check_fraction("data.split.test_ratio", self.test_ratio, allow_zero=False)
        if self.val_ratio + self.test_ratio >= 1.0:
            raise ConfigError(f"data.split.val_ratio + data.split.test_ratio must be < 1, got "
                              f"{self.val_ratio} + {self.test_ratio}")
        everything = np.arange(len(rows.labels))
        rest, test = _take(everything, rows.labels, self.test_ratio, self.seed, self.stratify, "data.split.test_ratio")
        frac = self.val_ratio * len(everything) / len(rest)
        train_side, val = _take(rest, rows.labels, frac, self.seed + 1, self.stratify, "data.split.val_ratio")
        pool, labelled = _take(train_side, rows.labels, self.label_ratio, self.seed + 2, self.stratify,
                               "data.split.label_ratio")
        return {"train": labelled, "labelled": labelled, "pool": pool, "val": val, "test": test}


# -- datasets and the base DataModule -------------------------------------------------------------
class ClassificationSubset(Dataset):
    """One subset of a :class:`ClassificationDataModule`: item ``i`` is ``{"x", "y", "index"}`` (plus
    ``"group"`` when ``with_group``) of the row ``indices[i]``."""

    def __init__(self, indices: np.ndarray, row: Callable[[int], Any], labels: np.ndarray,
                 groups: np.ndarray | None) -> None:
        self.indices = indices
        self._row, self._labels, self._groups = row, labels, groups

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i])
        item = {"x": self._row(index), "y": torch.tensor(self._labels[index], dtype=torch.long),
                "index": torch.tensor(index, dtype=torch.long)}
        if self._groups is not None:
            item["group"] = torch.tensor(int(self._groups[index]), dtype=torch.long)
        return item


class ClassificationDataModule(L.LightningDataModule):
    """Base of the classification sources: split, subsets, loaders and in-memory access by index.

    Subclasses implement :meth:`_load_rows` (labels, groups, fine labels, own test rows), :meth:`_build_features`
    (features, given the training-side rows, e.g. to fit a standardisation on them only) and :meth:`_row`
    (one row's ``"x"``); text overrides :meth:`_collate` (padding per batch).

    After :meth:`setup`: ``num_classes``, ``input_shape``, ``num_groups`` (0 without a group column),
    ``class_names``, ``group_names``, ``feature_names`` (tabular; else empty).
    """

    def __init__(self, split: Split | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        """
        Args:
            split: how rows become subsets (:class:`HoldoutSplit` by default).
            batch_size: rows per training step on each data-parallel rank.
            eval_batch_size: rows per evaluation step (default ``batch_size``).
            num_workers: DataLoader worker processes.
            seed: seed of the shuffled loaders (with each loader's ``seed_offset`` and the epoch).
        """
        super().__init__()
        self.save_hyperparameters()  # the subclass's arguments too (Lightning reads every __init__ frame)
        check_int("data.batch_size", batch_size)
        check_int("data.eval_batch_size", eval_batch_size, optional=True)
        check_int("data.num_workers", num_workers, low=0)
        self.split = split if split is not None else HoldoutSplit()
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.rows: SourceRows | None = None
        self.subsets: dict[str, np.ndarray] = {}
        self.num_classes = 0
        self.num_groups = 0
        self.input_shape: tuple[int, ...] = ()
        self.class_names: list[str] = []
        self.group_names: list[str] = []
        self.feature_names: list[str] = []
        self._train_loaders: dict[str, ResumableDataLoader] = {}
        self._consumed: dict[str, tuple[int, int]] = {}  # stream -> (epoch, batches consumed in it)

    # -- subclass hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _load_rows(self) -> SourceRows:
        """Read the source: labels, groups, fine labels and own test rows (features kept for
        :meth:`_build_features`)."""

    @abstractmethod
    def _build_features(self, train_side: np.ndarray) -> None:
        """Build the features now that the split is known; ``train_side`` = the indices of every row not in
        ``val`` or ``test`` (statistics may be fitted on these only). Sets ``input_shape``."""

    @abstractmethod
    def _row(self, index: int) -> Any:
        """The ``"x"`` of one row."""

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return default_collate(items)

    # -- setup -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.rows is not None:
            return
        rows = self._load_rows()
        self.subsets = {k: np.asarray(v, dtype=np.int64) for k, v in self.split.assign(rows).items()}
        self.num_classes, self.class_names = len(rows.class_names), list(rows.class_names)
        self.group_names = list(rows.group_names) if rows.groups is not None else []
        self.num_groups = len(self.group_names)
        for name in GROUP_SUBSETS:
            if rows.groups is not None and name in self.subsets:
                unknown = self.subsets[name][np.isnan(rows.groups[self.subsets[name]])]
                if len(unknown):
                    raise DataError(f"data.group: {len(unknown)} rows of the {name!r} subset have no group value "
                                    f"(first: row {int(unknown[0])}); evaluation rows need one. Fill or drop them")
                present = np.unique(rows.groups[self.subsets[name]])
                if name in ("val", "test") and len(self.subsets[name]) and len(present) < 2:
                    rank_zero_warn(f"data.group: the {name!r} subset holds only group(s) "
                                   f"{[rows.group_names[int(g)] for g in present]} of {rows.group_names}; its fairness "
                                   "gaps are undefined (NaN). Check data.group_positive / data.group_threshold or the "
                                   "split's ratios", category=UserWarning)
        held = np.concatenate([self.subsets[k] for k in ("val", "test") if k in self.subsets] or [np.array([], int)])
        train_side = np.setdiff1d(np.arange(len(rows.labels)), held)
        self.rows = rows
        self._build_features(train_side)

    def _require_setup(self) -> SourceRows:
        if self.rows is None:
            raise RuntimeError("call setup() first")
        return self.rows

    # -- subsets, loaders, rows by index --------------------------------------------------------------
    @property
    def subset_names(self) -> tuple[str, ...]:
        """Names of the subsets this split defines."""
        return tuple(self.subsets)

    def indices(self, name: str) -> np.ndarray:
        """Sorted stable indices of subset ``name``."""
        self._require_setup()
        if name not in self.subsets:
            raise ConfigError(f"subset {name!r} is not defined by data.split ({type(self.split).__name__}); "
                              f"it defines {list(self.subsets)}")
        return self.subsets[name]

    def subset(self, name: str) -> ClassificationSubset:
        """Subset ``name`` as a dataset (with ``"group"`` only for val/test subsets)."""
        rows = self._require_setup()
        groups = rows.groups if name in GROUP_SUBSETS else None
        return ClassificationSubset(self.indices(name), self._row, rows.labels, groups)

    def dataset_of(self, indices: Sequence[int] | np.ndarray | torch.Tensor,
                   labels: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> ClassificationSubset:
        """A dataset of any rows (no ``"group"``), e.g. FIS's growing labelled set; ``labels`` (one per row, in the
        order of ``indices``) replace the true labels, e.g. with pseudo-labels."""
        rows = self._require_setup()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        table = rows.labels
        if labels is not None:
            given = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(given) != len(idx):
                raise ValueError(f"dataset_of: {len(given)} labels for {len(idx)} rows")
            table = rows.labels.copy()
            table[idx] = given
        return ClassificationSubset(idx, self._row, table, None)

    def _shard(self) -> tuple[int, int]:
        return trainer_shard(self.trainer)

    def _loader_seed(self, seed_offset: int) -> int:
        """Seed of a shuffled loader from ``(seed, seed_offset)`` (the sampler adds the epoch)."""
        return int(np.random.SeedSequence([self.seed, seed_offset]).generate_state(1)[0] % 2**31)

    def loader(self, name: str | ClassificationSubset, *, shuffle: bool = False, batch_size: int | None = None,
               seed_offset: int = 0, num_replicas: int | None = None, rank: int | None = None,
               pad: bool = True) -> ResumableDataLoader:
        """A loader over subset ``name`` (or a dataset from :meth:`dataset_of`): shuffled per epoch from
        ``(seed, seed_offset, epoch)`` when ``shuffle``, sharded over the trainer's data-parallel ranks (or
        ``num_replicas``/``rank`` when given), resumable. ``batch_size`` defaults to ``batch_size`` for shuffled
        loaders and ``eval_batch_size`` otherwise. ``pad=True`` evens the ranks' shares by repeating rows (training:
        every rank takes the same number of steps); ``pad=False`` gives every row to exactly one rank (evaluation:
        the val and test loaders, so metrics count each row once)."""
        dataset = self.subset(name) if isinstance(name, str) else name
        replicas, own = self._shard()
        sampler = ShardedSampler(dataset, num_replicas=num_replicas or replicas, rank=own if rank is None else rank,
                                 shuffle=shuffle, seed=self._loader_seed(seed_offset), pad=pad)
        size = batch_size or (self.batch_size if shuffle else self.eval_batch_size)
        return ResumableDataLoader(dataset, sampler=sampler, batch_size=size, collate_fn=self._collate,
                                   num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def features(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> Any:
        """The ``"x"`` of the rows ``indices``, collated as in a batch (in memory, e.g. to score pool rows)."""
        self._require_setup()
        return self._collate([{"x": self._row(int(i))} for i in np.asarray(indices).reshape(-1)])["x"]

    def labels(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class labels (LongTensor) of the rows ``indices``."""
        rows = self._require_setup()
        return torch.as_tensor(rows.labels[np.asarray(indices, dtype=np.int64).reshape(-1)], dtype=torch.long)

    def groups(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Groups (LongTensor) of the rows ``indices``, which must all be validation or test rows."""
        rows = self._require_setup()
        if rows.groups is None:
            raise ConfigError("data.group is not set: this source has no groups")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        allowed = np.concatenate([self.subsets[k] for k in ("val", "test") if k in self.subsets])
        outside = idx[~np.isin(idx, allowed)]
        if len(outside):
            raise DataError(f"groups are readable only for val/test rows; rows {outside[:10].tolist()} are "
                            "training-side (training code must not read sensitive attributes)")
        return torch.as_tensor(rows.groups[idx], dtype=torch.long)

    # -- Lightning loaders ---------------------------------------------------------------------------
    def _streams(self) -> TrainStreams:
        module = self.trainer.lightning_module if self.trainer is not None else None
        streams = module.train_streams() if hasattr(module, "train_streams") else TrainStreams(("train",))
        unknown = [n for n in streams.names if n not in self.subsets]
        if not streams.names or unknown:
            raise ConfigError(f"the module trains on subsets {list(streams.names)} but data.split "
                              f"({type(self.split).__name__}) defines {list(self.subsets)}")
        if len(streams.names) > 1 and streams.mode not in ("min_size", "max_size_cycle"):
            raise ConfigError(f"train_streams() combines {list(streams.names)} with mode {streams.mode!r}; Lightning's "
                              "fit loop takes several streams only in 'min_size' or 'max_size_cycle' mode")
        return streams

    def train_dataloader(self) -> ResumableDataLoader | CombinedLoader:
        """The LightningModule's ``train_streams()``: one shuffled loader, or a ``CombinedLoader`` of several
        (stream ``i`` shuffled with ``seed_offset=i``)."""
        streams = self._streams()
        # stream i shuffles with seed_offset i: independent orders for forget and retain
        self._train_loaders = {n: self.loader(n, shuffle=True, seed_offset=i) for i, n in enumerate(streams.names)}
        self._consumed = {}
        if len(streams.names) == 1:
            return self._train_loaders[streams.names[0]]
        return CombinedLoader(dict(self._train_loaders), mode=streams.mode)

    def val_dataloader(self) -> ResumableDataLoader:
        return self.loader("val", pad=False)  # each row on one rank only: metrics count it once

    def test_dataloader(self) -> ResumableDataLoader:
        return self.loader("test", pad=False)

    def _count(self, name: str) -> None:
        """One more batch of stream ``name`` reached the training step: the loader's ``consumed`` (what a
        checkpoint saves) is the batches consumed in this epoch, modulo its length for a cycled stream."""
        loader = self._train_loaders[name]
        epoch = loader.sampler.epoch
        seen_epoch, count = self._consumed.get(name, (None, 0))
        count = (count if seen_epoch == epoch else loader.consumed) + 1
        self._consumed[name] = (epoch, count)
        loader.consumed = count % len(loader) if count > len(loader) else count

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self._train_loaders:
            names = list(self._train_loaders)
            if len(names) == 1:
                self._count(names[0])
            else:  # min_size / max_size_cycle: one batch of every stream per step
                for name in names:
                    if name in batch:
                        self._count(name)
        return batch


class LabelOracle:
    """Reveals true labels of pool rows and counts the label budget spent (FIS spends it only here).

    Every distinct queried index counts once (asking again for a row already revealed is free).
    """

    def __init__(self, datamodule: ClassificationDataModule) -> None:
        self.datamodule = datamodule
        self._queried: set[int] = set()

    @property
    def spent(self) -> int:
        """Distinct rows whose labels have been revealed."""
        return len(self._queried)

    def budget_left(self, budget: int) -> int:
        """Labels still allowed under ``budget``."""
        return budget - self.spent

    def query(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """True labels (LongTensor) of the pool rows ``indices``; each new index is charged once."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        pool = self.datamodule.indices("pool")
        outside = idx[~np.isin(idx, pool)]
        if len(outside):
            raise DataError(f"LabelOracle.query: rows {outside[:10].tolist()} are not in the unlabelled pool")
        self._queried.update(int(i) for i in idx)
        return self.datamodule.labels(idx)

    def state_dict(self) -> dict[str, list[int]]:
        return {"queried": sorted(self._queried)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self._queried = {int(i) for i in state["queried"]}


torch.serialization.add_safe_globals([HoldoutSplit, ForgetSplit, ActiveLearningSplit, TrainStreams])
