"""Typed batches (defined in the leaf module :mod:`lit_align.containers`, re-exported here)."""

from lit_align.containers import AdversarialBatch, ForgetRetainBatch, PreferenceBatch, SequenceBatch

__all__ = ["AdversarialBatch", "ForgetRetainBatch", "PreferenceBatch", "SequenceBatch"]
