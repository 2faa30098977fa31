"""DataModules, typed batches, record loading and the built-in tiny datasets."""

from lit_align.data.base import TokenizedDataModule
from lit_align.data.batches import PreferenceBatch, SequenceBatch
from lit_align.data.preference import PreferenceDataModule
from lit_align.data.records import BUILTIN_DIR, DataSource, load_records
from lit_align.data.sft import SFTDataModule

__all__ = [
    "BUILTIN_DIR",
    "DataSource",
    "PreferenceBatch",
    "PreferenceDataModule",
    "SFTDataModule",
    "SequenceBatch",
    "TokenizedDataModule",
    "load_records",
]
