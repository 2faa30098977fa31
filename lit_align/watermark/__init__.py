"""Statistical text watermarks (baselines for the learned watermark of the co-training method)."""

from lit_align.watermark.kgw import KGWScore, KGWWatermark, WatermarkedLM, watermarked_sample

__all__ = ["KGWScore", "KGWWatermark", "WatermarkedLM", "watermarked_sample"]
