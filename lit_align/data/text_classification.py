"""Text classification data: an HF dataset id or a local file/directory, tokenized once, padded per batch.

:class:`TextClassificationDataModule` gives batches whose ``"x"`` is ``{"input_ids": LongTensor (B, T),
"attention_mask": LongTensor (B, T)}``, right-padded to the longest row of the batch (see
:mod:`lit_align.data.classification` for the rest of the batch). Texts are cut to ``max_length`` tokens
(the tokenizer's special tokens included); a text with no tokens at all becomes one pad token (attended), so
no row is all mask.

Sources (``data.source``, an optional ``hf:`` prefix is allowed):

* a hub id, e.g. ``SetFit/20_newsgroups`` (20 Newsgroups, columns ``text``, ``label`` 0..19, ``label_text``;
  11,314 train and 7,532 test rows; the test split becomes the test subset; ``label_name_column: label_text``
  names the classes) - UGradSL's text benchmark with BERT. A class-wise forget config for it::

      data:
        class_path: lit_align.data.TextClassificationDataModule
        init_args:
          source: SetFit/20_newsgroups
          tokenizer: bert-base-uncased
          label_name_column: label_text
          max_length: 256
          split: {class_path: lit_align.data.ForgetSplit, init_args: {kind: class_wise, classes: [0]}}

* a local directory of data files or one written by ``save_to_disk`` (``train``/``test`` splits as above);
* a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file (one split; the split's fractions make the test set).

The tokenizer (``data.tokenizer``: a local directory or a hub id) is built as a model spec's would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_align.data.classification import ClassificationDataModule, SourceRows, Split, encode_groups, encode_labels
from lit_align.data.records import DataSource, read_rows
from lit_align.errors import ConfigError, DataError, MissingPathError, check_int
from lit_align.models.causal_lm import build_tokenizer
from lit_align.models.spec import ModelSpec

__all__ = ["TextClassificationDataModule"]

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class TextClassificationDataModule(ClassificationDataModule):
    """Texts as token ids padded per batch (see the module docstring for the sources)."""

    def __init__(self, source: str = "SetFit/20_newsgroups", tokenizer: str | None = None, text_column: str = "text",
                 label_column: str = "label", label_name_column: str | None = None, max_length: int = 128,
                 group_column: str | None = None,
                 group_positive: str | None = None, missing_pad_token: str = "eos", split: Split | None = None,
                 batch_size: int = 32, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0) -> None:
        """
        Args:
            source: an HF dataset id (``hf:`` prefix optional), a local data directory, or a
                .jsonl/.json/.csv/.parquet file.
            tokenizer: tokenizer directory or hub id (e.g. the backbone's ``bert-base-uncased``).
            text_column: column of the texts.
            label_column: column of the classes (ints or strings; the sorted distinct values become ``0..K-1``).
            label_name_column: column naming each row's class (20 Newsgroups: ``label_text``), for ``class_names``.
            max_length: longest row in tokens (longer texts are cut at the end).
            group_column: column of the sensitive attribute, read only for val/test rows.
            group_positive: with it, the group is 1 where the value equals it, else 0.
            missing_pad_token: how a tokenizer without a pad token gets one (``eos``, ``unk``, ``add``, ``error``).
            split: how rows become subsets (:class:`~lit_align.data.classification.HoldoutSplit` by default).
            batch_size: rows per training step on each rank.
            eval_batch_size: rows per evaluation step (default ``batch_size``).
            num_workers: DataLoader worker processes.
            seed: seed of the shuffled loaders.
        """
        super().__init__(split=split, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        check_int("data.max_length", max_length, low=2)
        if tokenizer is None:
            raise ConfigError("data.tokenizer is not set; give the tokenizer directory or hub id of the backbone")
        self.source, self.tokenizer_name = source, tokenizer
        self.text_column, self.label_column, self.max_length = text_column, label_column, max_length
        self.label_name_column = label_name_column
        self.group_column, self.group_positive, self.missing_pad_token = group_column, group_positive, missing_pad_token
        self.tokenizer = None
        self._ids: list[list[int]] = []
        self._texts: list[str] | None = None

    def _read(self) -> tuple[list[dict[str, Any]] | Any, np.ndarray | None]:
        """The rows (a list of dicts or an HF dataset) and the source's own test mask."""
        name = self.source.removeprefix("hf:")
        path = Path(name).expanduser()
        if path.suffix.lower() in LOCAL_SUFFIXES:
            if not path.is_file():
                raise MissingPathError(f"data.source={self.source!r}: no such file")
            return read_rows(DataSource(path=str(path))), None
        import datasets

        try:
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path) if path.is_dir() else name)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            raise MissingPathError(f"data.source={self.source!r}: cannot load it with datasets ({err})") from err
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"data.source={self.source!r} has no 'train' split; it has {list(loaded)}")
            if "test" not in loaded:
                return loaded["train"], None
            mask = np.r_[np.zeros(len(loaded["train"]), bool), np.ones(len(loaded["test"]), bool)]
            return datasets.concatenate_datasets([loaded["train"], loaded["test"]]), mask
        return loaded, None

    def _values(self, rows: Any, column: str, key: str) -> list[Any]:
        if isinstance(rows, list):
            missing = next((i for i, r in enumerate(rows) if column not in r), None)
            if missing is not None:
                raise DataError(f"{self.source}: record {missing + 1} has no column {column!r} ({key}); it has "
                                f"{sorted(rows[missing])}")
            return [r[column] for r in rows]
        if column not in rows.column_names:
            raise DataError(f"{self.source}: {key}={column!r} is not a column; its columns are {rows.column_names}")
        return rows[column]

    def _load_rows(self) -> SourceRows:
        rows, is_test = self._read()
        texts = self._values(rows, self.text_column, "data.text_column")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"{self.source}: record {bad + 1}: {self.text_column!r} must be a string, got "
                            f"{type(texts[bad]).__name__}")
        labels, names = encode_labels(self._values(rows, self.label_column, "data.label_column"),
                                      key="data.label_column", where=f"{self.source}: ")
        if self.label_name_column is not None:
            named = dict(zip(labels.tolist(), self._values(rows, self.label_name_column, "data.label_name_column")))
            names = [str(named[i]) for i in range(len(names))]
        groups, group_names = (None, [])
        if self.group_column is not None:
            groups, group_names = encode_groups(self._values(rows, self.group_column, "data.group_column"),
                                                positive=self.group_positive, key="data.group_column",
                                                where=f"{self.source}: ")
        self._texts = list(texts)
        return SourceRows(labels=labels, class_names=names, groups=groups, group_names=group_names, is_test=is_test)

    def _build_features(self, train_side: np.ndarray) -> None:
        self.tokenizer = build_tokenizer(ModelSpec(name_or_path=self.tokenizer_name,
                                                   missing_pad_token=self.missing_pad_token),
                                         key="data.tokenizer", needs_eos=False)
        encoded = self.tokenizer(self._texts, truncation=True, max_length=self.max_length)["input_ids"]
        pad = self.tokenizer.pad_token_id
        self._ids = [ids if ids else [pad] for ids in encoded]
        self._texts, self.input_shape = None, ()

    def _row(self, index: int) -> list[int]:
        return self._ids[index]

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-pad the rows' token ids to the batch's longest; the rest of the batch as default collate."""
        longest = max(len(item["x"]) for item in items)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(items), longest), pad, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)  # (B, T)
        for i, item in enumerate(items):
            input_ids[i, : len(item["x"])] = torch.tensor(item["x"], dtype=torch.long)
            attention_mask[i, : len(item["x"])] = 1
        batch = {"x": {"input_ids": input_ids, "attention_mask": attention_mask}}
        for key in ("y", "index", "group"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch
