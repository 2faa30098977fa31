"""Lightning callbacks: behaviour you can switch off without changing what a method is."""

from lit_align.callbacks.export import HFExport
from lit_align.callbacks.samples import SampleGenerations

__all__ = ["HFExport", "SampleGenerations"]
