"""Shared DataModule machinery: sources -> validated records -> tokenized datasets -> loaders."""

from __future__ import annotations

import random
from abc import abstractmethod
from typing import Any, ClassVar

import lightning as L
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from lit_align.data.records import DataSource, Record, load_records
from lit_align.data.sampling import ResumableDataLoader, ShardedSampler, trainer_shard
from lit_align.data.tokenize import TokenizedDataset, check_response_room, warn_truncated
from lit_align.errors import ConfigError
from lit_align.models.causal_lm import build_tokenizer
from lit_align.models.spec import ModelSpec

__all__ = ["TokenizedDataModule"]


class TokenizedDataModule(L.LightningDataModule):
    """Base of the text DataModules: loading, validation split, tokenization and loaders.

    The tokenizer is the LightningModule's (``module.tokenizer``, built from its model spec), so
    data and model can never disagree; pass ``tokenizer`` to use the DataModule on its own.
    Subclasses declare ``required_fields`` and implement :meth:`_encode` and :meth:`_collator`.
    """

    required_fields: ClassVar[tuple[str, ...]] = ()
    optional_fields: ClassVar[tuple[str, ...]] = ()
    #: how ``data.tokenizer`` gets a pad token when it has none (:class:`~lit_align.models.ModelSpec`'s field)
    missing_pad_token: ClassVar[str] = "eos"

    def __init__(
        self,
        train: DataSource,
        val: DataSource | None = None,
        test: DataSource | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int = 512,
        chat_template: bool | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        """
        Args:
            train: where the training records come from.
            val: validation records; ``None`` splits ``val_fraction`` off ``train`` (seeded).
            test: records for ``lit-align test`` and ``predict``; ``None`` uses the validation records.
            val_fraction: share of ``train`` held out when ``val`` is not given; 0 disables validation.
            batch_size: examples per step on each data-parallel rank.
            eval_batch_size: examples per validation step (default ``batch_size``).
            max_length: longest prompt + response in tokens; longer prompts are cut from the left.
            chat_template: format prompts with the tokenizer's chat template; ``None`` uses it when present.
            shuffle: shuffle training examples each epoch (seeded by ``seed`` and the epoch).
            seed: seed of the validation split and the shuffling.
            num_workers: DataLoader worker processes.
            tokenizer: tokenizer id or directory when the DataModule is used without a lit_align module.
        """
        super().__init__()
        if batch_size <= 0:
            raise ConfigError(f"data.batch_size must be positive, got {batch_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.train_source, self.val_source, self.test_source = train, val, test
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_length, self.chat_template = max_length, chat_template
        self.val_fraction, self.shuffle, self.seed, self.num_workers = val_fraction, shuffle, seed, num_workers
        self.tokenizer_name = tokenizer
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.train_dataset: TokenizedDataset | None = None
        self.val_dataset: TokenizedDataset | None = None
        self.test_dataset: TokenizedDataset | None = None  # the validation set unless data.test is given
        self._train_loader: ResumableDataLoader | None = None

    # -- subclass hooks --------------------------------------------------------------------
    @abstractmethod
    def _encode(self, record: Record, index: int, tokenizer: PreTrainedTokenizerBase, chat: bool) -> Any:
        """One validated record -> one tokenized example."""

    @abstractmethod
    def _collator(self, pad_token_id: int):
        """The collate function for this DataModule's examples."""

    # -- setup -----------------------------------------------------------------------------
    def _resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The module's tokenizer when there is a module with one (data and model must agree), else
        ``data.tokenizer`` built like a model spec's (same missing-pad-token handling)."""
        if self.tokenizer is not None:
            return self.tokenizer
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is not None:
            return module.tokenizer
        if self.tokenizer_name is None:
            raise ConfigError("data.tokenizer is not set and there is no LightningModule with a tokenizer")
        return build_tokenizer(ModelSpec(name_or_path=self.tokenizer_name, missing_pad_token=self.missing_pad_token),
                               key="data.tokenizer")

    def _load(self, source: DataSource) -> list[Record]:
        """Validated records of one source (subclasses with another record layout override this)."""
        return load_records(source, self.required_fields, self.optional_fields)

    def _split(self) -> tuple[list[Record], list[Record]]:
        train = self._load(self.train_source)
        if self.val_source is not None:
            return train, self._load(self.val_source)
        if self.val_fraction == 0.0:
            return train, []
        order = list(range(len(train)))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, round(len(train) * self.val_fraction))
        if n_val >= len(train):
            raise ConfigError(
                f"data.val_fraction={self.val_fraction} leaves no training records out of {len(train)}; "
                "lower it or give data.val"
            )
        held = set(order[:n_val])
        return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.tokenizer = self._resolve_tokenizer()
        chat = self.chat_template if self.chat_template is not None else bool(self.tokenizer.chat_template)
        if chat and not self.tokenizer.chat_template:
            raise ConfigError("data.chat_template is true but the tokenizer has no chat template")
        check_response_room(self.tokenizer, chat, self.max_length)
        train, val = self._split()
        self.train_dataset = self._tokenize(train, chat)
        self.val_dataset = self._tokenize(val, chat)
        test = self._load(self.test_source) if self.test_source else None
        self.test_dataset = self._tokenize(test, chat) if test else self.val_dataset
        warn_truncated(self.val_dataset, "validation")  # training examples: the train loader warns every epoch
        if self.test_dataset is not self.val_dataset:
            warn_truncated(self.test_dataset, "test")

    def _tokenize(self, records: list[Record], chat: bool) -> TokenizedDataset | None:
        if not records:
            return None
        return TokenizedDataset([self._encode(r, i, self.tokenizer, chat) for i, r in enumerate(records)],
                                self.max_length)

    # -- loaders ---------------------------------------------------------------------------
    def _shard(self) -> tuple[int, int]:
        return trainer_shard(self.trainer)

    def _loader(self, dataset: TokenizedDataset, batch_size: int, *, shuffle: bool, shard: bool,
                train: bool = False) -> DataLoader:
        replicas, rank = self._shard() if shard else (1, 0)
        sampler = ShardedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.seed)
        return ResumableDataLoader(
            dataset, sampler=sampler, batch_size=batch_size, collate_fn=self._collator(self.tokenizer.pad_token_id),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, warn_truncated=train,
        )

    def train_dataloader(self) -> ResumableDataLoader:
        self._train_loader = self._loader(self.train_dataset, self.batch_size, shuffle=self.shuffle, shard=True,
                                          train=True)
        return self._train_loader

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False, shard=True)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, self.eval_batch_size, shuffle=False, shard=True)

    def predict_dataloader(self) -> DataLoader | list:
        return self.test_dataloader()

    def split_of(self, stage: str) -> str:
        """Name of the dataset a stage (``train``, ``val``, ``test``) reads: ``test`` falls back to ``val``."""
        return "val" if stage == "test" and self.test_dataset is self.val_dataset else stage

    def split_loaders(self, shard: bool = False) -> dict[str, DataLoader]:
        """A loader per distinct split (``train``, ``val``, ``test``) in a fixed order, for per-example
        precomputation: every rank sees all of it, or with ``shard`` its own padded share (so every rank
        runs the same number of batches, as sharded models require)."""
        splits = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}
        if self.test_dataset is self.val_dataset:
            del splits["test"]
        return {k: self._loader(d, self.eval_batch_size, shuffle=False, shard=shard) for k, d in splits.items() if d}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.consumed += 1  # this batch reached the training step (see sampling.py)
        return batch
