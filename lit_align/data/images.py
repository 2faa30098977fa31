"""Image classification data: scikit-learn's digits, HF datasets, image folders and torchvision sets.

:class:`ImageClassificationDataModule` turns a source into ``"x"`` tensors ``(C, H, W)`` of floats in [0, 1]
(see :mod:`lit_align.data.classification` for the batch format). Sources (``data.source``):

* ``builtin:digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes), as ``(1, 8, 8)``
  with the 0-16 intensities divided by 16; no download.
* ``hf:<hub id or local dir>``: a ``datasets`` dataset (a directory written by ``save_to_disk``, a local directory
  of data files, or a hub id); ``image_column`` holds the images (PIL or anything ``PIL.Image`` reads),
  ``label_column`` the classes, optional ``fine_label_column`` the sub-classes and ``group_column`` the sensitive
  attribute. Its ``train`` split is used, and its ``test`` split (when present) becomes the test subset. For
  CIFAR-100 (``hf:uoft-cs/cifar100``): ``label_column: coarse_label``, ``fine_label_column: fine_label`` trains on
  the 20 super-classes and forgets sub-classes; for CelebA, ``group_column: Male``.
* ``folder:<path>``: a directory of class sub-folders (``<path>/<class>/*.png``, optionally under ``train/`` and
  ``test/``), read offline by ``datasets``' ``imagefolder`` builder.
* ``torchvision:CIFAR10|CIFAR100|SVHN``: the torchvision dataset under ``root`` (``download`` to fetch it);
  torchvision is imported only then. CIFAR-100 reads its 20 coarse labels as ``y`` and its 100 fine labels as
  ``fine_labels`` (for sub-class forgetting) when ``label_column: coarse_label``; otherwise ``y`` = fine labels.

Images are kept as uint8 (``(N, C, H, W)``) and scaled when a row is read, so CIFAR-size sets fit in memory.
All images of one source must share one size (or set ``image_size`` to resize them while loading); a source whose
first image is grayscale gives ``C = 1``, others are converted to RGB.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lit_align.data.classification import ClassificationDataModule, SourceRows, Split, encode_groups, encode_labels
from lit_align.errors import ConfigError, DataError, MissingPathError, check_int

__all__ = ["ImageClassificationDataModule", "TORCHVISION_SETS"]

TORCHVISION_SETS = ("CIFAR10", "CIFAR100", "SVHN")


def _to_uint8(images: list[Any], source: str, size: int | None = None, mode: str | None = None) -> torch.Tensor:
    """PIL images (or arrays) -> uint8 tensor (N, C, H, W): ``mode`` (``L`` or ``RGB``; default grayscale when every
    image is, RGB otherwise), each resized to ``size`` x ``size`` (bilinear) when given."""
    from PIL import Image

    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    mode = mode or ("L" if all(im.mode in ("L", "1", "I;16", "I") for im in pil) else "RGB")
    pil = [im.convert(mode) for im in pil]
    if size is not None:
        pil = [im.resize((size, size), Image.Resampling.BILINEAR) if im.size != (size, size) else im for im in pil]
    arrays = [np.asarray(im, dtype=np.uint8) for im in pil]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"data.source={source!r}: images have different sizes {sorted(shapes)[:4]}; resize them to "
                        "one size first or set data.image_size")
    stack = np.stack(arrays)  # (N, H, W) or (N, H, W, 3)
    stack = stack[:, None] if stack.ndim == 3 else stack.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stack))


def _saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset(Dict).save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _images(dataset: Any, column: str, source: str, size: int | None, chunk: int = 1024) -> torch.Tensor:
    """The images of an HF dataset's ``column`` as uint8 (N, C, H, W), decoded ``chunk`` rows at a time (a large
    set such as CelebA is never held as PIL images all at once)."""
    from PIL import Image

    first = dataset[0][column]
    first = first if isinstance(first, Image.Image) else Image.fromarray(np.asarray(first))
    mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
    parts = [_to_uint8(dataset[start : start + chunk][column], source, size, mode)
             for start in range(0, len(dataset), chunk)]
    shapes = sorted({tuple(p.shape[1:]) for p in parts})
    if len(shapes) > 1:
        raise DataError(f"data.source={source!r}: images have different sizes {shapes[:4]}; resize them to one size "
                        "first or set data.image_size")
    return torch.cat(parts)


def _column(dataset: Any, name: str | None, key: str, source: str) -> list[Any] | None:
    if name is None:
        return None
    if name not in dataset.column_names:
        raise DataError(f"data.source={source!r}: {key}={name!r} is not a column; its columns are "
                        f"{dataset.column_names}")
    return dataset[name]


class ImageClassificationDataModule(ClassificationDataModule):
    """Images as ``(C, H, W)`` float tensors in [0, 1] (see the module docstring for the sources)."""

    def __init__(self, source: str = "builtin:digits", image_column: str = "image", label_column: str = "label",
                 fine_label_column: str | None = None, group_column: str | None = None,
                 group_positive: str | None = None, image_size: int | None = None, root: str = "data",
                 download: bool = False,
                 split: Split | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        """
        Args:
            source: ``builtin:digits``, ``hf:<id or dir>``, ``folder:<path>`` or ``torchvision:<name>``.
            image_column: column of the images (``hf:``; CIFAR on the hub: ``img``).
            label_column: column of the classes (``hf:``; ``torchvision:CIFAR100``: ``coarse_label`` picks the
                super-classes).
            fine_label_column: column of the sub-classes for sub-class forgetting (``hf:``).
            group_column: column of the sensitive attribute, read only for val/test rows (``hf:``).
            group_positive: with it, the group is 1 where the value equals it, else 0.
            image_size: resize every image to ``image_size`` x ``image_size`` when loading (``hf:`` / ``folder:``;
                e.g. 32 for CelebA with FIS's ViT); ``None`` keeps the size (all images must then share one).
            root: directory of the torchvision datasets.
            download: let torchvision download a missing dataset into ``root``.
            split: how rows become subsets (:class:`~lit_align.data.classification.HoldoutSplit` by default).
            batch_size: rows per training step on each rank.
            eval_batch_size: rows per evaluation step (default ``batch_size``).
            num_workers: DataLoader worker processes.
            seed: seed of the shuffled loaders.
        """
        super().__init__(split=split, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        self.source, self.image_column, self.label_column = source, image_column, label_column
        self.fine_label_column, self.group_column, self.group_positive = fine_label_column, group_column, group_positive
        self.root, self.download, self.image_size = root, download, image_size
        check_int("data.image_size", image_size, optional=True)
        self._x: torch.Tensor | None = None
        self._scale = 255.0

    # -- sources -------------------------------------------------------------------------------------
    def _digits(self) -> SourceRows:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self._x, self._scale = torch.as_tensor(digits.images, dtype=torch.float32)[:, None], 16.0  # (N, 1, 8, 8)
        labels, names = encode_labels(digits.target.tolist())
        return SourceRows(labels=labels, class_names=names)

    def _hf_dataset(self) -> tuple[Any, np.ndarray | None]:
        """The rows of an HF source (train then test split when it has one) and its test mask."""
        import datasets

        kind, _, name = self.source.partition(":")
        try:
            if kind == "folder":
                if not Path(name).expanduser().is_dir():
                    raise MissingPathError(f"data.source={self.source!r}: no such directory")
                loaded = datasets.load_dataset("imagefolder", data_dir=str(Path(name).expanduser()))
            elif _saved_to_disk(Path(name).expanduser()):
                loaded = datasets.load_from_disk(str(Path(name).expanduser()))
            else:
                loaded = datasets.load_dataset(name)
        except (FileNotFoundError, ValueError, ConnectionError) as err:
            if isinstance(err, MissingPathError):
                raise
            raise MissingPathError(f"data.source={self.source!r}: cannot load it with datasets ({err})") from err
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"data.source={self.source!r} has no 'train' split; it has {list(loaded)}")
            parts = [loaded["train"]] + ([loaded["test"]] if "test" in loaded else [])
            is_test = np.r_[np.zeros(len(parts[0]), bool), np.ones(len(parts[1]), bool)] if len(parts) > 1 else None
            return datasets.concatenate_datasets(parts), is_test
        return loaded, None

    def _hf(self) -> SourceRows:
        dataset, is_test = self._hf_dataset()
        if self.image_column not in dataset.column_names:
            raise DataError(f"data.source={self.source!r}: data.image_column={self.image_column!r} is not a column; "
                            f"its columns are {dataset.column_names}")
        labels, names = encode_labels(_column(dataset, self.label_column, "data.label_column", self.source),
                                      key="data.label_column", where=f"{self.source}: ")
        feature = dataset.features.get(self.label_column)
        if getattr(feature, "names", None) and len(feature.names) == len(names):
            names = [feature.names[int(n)] for n in names]  # ClassLabel ids -> their names
        fine = _column(dataset, self.fine_label_column, "data.fine_label_column", self.source)
        group_values = _column(dataset, self.group_column, "data.group_column", self.source)
        groups, group_names = (None, [])
        if group_values is not None:
            groups, group_names = encode_groups(group_values, positive=self.group_positive,
                                                key="data.group_column", where=f"{self.source}: ")
        self._x = _images(dataset, self.image_column, self.source, self.image_size)
        return SourceRows(labels=labels, class_names=names, groups=groups, group_names=group_names, is_test=is_test,
                          fine_labels=None if fine is None else encode_labels(fine, key="data.fine_label_column")[0])

    def _torchvision(self) -> SourceRows:
        name = self.source.partition(":")[2]
        if name not in TORCHVISION_SETS:
            raise ConfigError(f"data.source={self.source!r}: torchvision sources are {', '.join(TORCHVISION_SETS)}")
        try:
            import torchvision.datasets as tv
        except Exception as err:  # ImportError, or the RuntimeError of a torchvision built for another torch
            raise ConfigError(
                f"data.source={self.source!r} needs torchvision, which cannot be imported here ({err}). Install the "
                "torchvision build that matches your torch, or use hf:uoft-cs/cifar10 / hf:uoft-cs/cifar100 / "
                "hf:ufldl-stanford/svhn (data.image_column: img) instead") from err
        parts, fine_parts = [], []
        for train in (True, False):
            if name == "SVHN":
                data = tv.SVHN(self.root, split="train" if train else "test", download=self.download)
                images, targets = data.data, data.labels  # (N, 3, H, W) uint8
            else:
                data = getattr(tv, name)(self.root, train=train, download=self.download)
                images, targets = data.data.transpose(0, 3, 1, 2), data.targets  # (N, H, W, 3) -> (N, 3, H, W)
                if name == "CIFAR100" and self.label_column == "coarse_label":
                    fine_parts.append(np.asarray(targets))
                    with open(Path(data.root) / data.base_folder / ("train" if train else "test"), "rb") as f:
                        targets = pickle.load(f, encoding="latin1")["coarse_labels"]
            parts.append((np.ascontiguousarray(images), np.asarray(targets)))
        self._x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        labels, names = encode_labels(np.concatenate([p[1] for p in parts]).tolist())
        if getattr(data, "classes", None) and len(data.classes) == len(names) and not fine_parts:
            names = list(data.classes)
        is_test = np.r_[np.zeros(len(parts[0][1]), bool), np.ones(len(parts[1][1]), bool)]
        fine = np.concatenate(fine_parts).astype(np.int64) if fine_parts else None
        return SourceRows(labels=labels, class_names=names, is_test=is_test, fine_labels=fine)

    def _load_rows(self) -> SourceRows:
        kind = self.source.partition(":")[0]
        if self.source == "builtin:digits":
            return self._digits()
        if kind in ("hf", "folder"):
            return self._hf()
        if kind == "torchvision":
            return self._torchvision()
        raise ConfigError(f"data.source={self.source!r}: use builtin:digits, hf:<id or dir>, folder:<path> or "
                          f"torchvision:<{'|'.join(TORCHVISION_SETS)}>")

    # -- rows --------------------------------------------------------------------------------------
    def _build_features(self, train_side: np.ndarray) -> None:
        self.input_shape = tuple(self._x.shape[1:])

    def _row(self, index: int) -> torch.Tensor:
        return self._x[index].float() / self._scale

    def features(self, indices: Any) -> torch.Tensor:
        self._require_setup()
        return self._x[torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))].float() / self._scale
