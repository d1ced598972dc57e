"""KV caches the loop runs engines over: on the host (numpy, any backend) or on the engine's device (bound
buffers, static buckets, CUDA graphs, rounds queued on the device)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .host import CacheSpec, KVRunner


class KVCache(Protocol):
    """What the loop needs of a cache: engine calls over it, and keeping or dropping their KV entries."""

    chain_steps: int  # K of an attached fused draft-chain graph (0: none)
    queues_on_device: bool  # capability: calls queued with inputs written on the device (`fill`)
    scratch: int  # uncommitted entries behind every row's committed ones

    def launch(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None, take: dict | None = None,
               fill=None):
        """Queue (or run) T new tokens per row; the result's `result()` gives the outputs."""

    def forward(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None) -> dict: ...

    def commit(self, select: list) -> None:
        """Keep, per row, the scratch entries with the given indices (in order); drop the rest."""

    def discard(self) -> None:
        """Drop every scratch entry."""


__all__ = ["CacheSpec", "KVCache", "KVRunner"]
