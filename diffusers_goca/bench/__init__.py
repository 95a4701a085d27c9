"""Benchmark building blocks shared by `benchmarks/segmentation.py` and `benchmarks/coco30k.py`: dataset loaders,
a resumable per-item result log, sharding across processes, and generation metrics (FID, CLIP score)."""

from .runlog import ResultLog, Shard

__all__ = ["ResultLog", "Shard"]
