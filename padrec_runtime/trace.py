"""Optional instrumentation: a tracer the runtime tells about every engine call (tools and tests use it)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class EngineCall:
    """One engine call, as its cache made it."""

    cache: str  # the cache's own graph: target or draft
    graph: str  # the graph that ran (an attached one: draft_chain, target_gqa, ...)
    batch: int
    tokens: int  # new tokens per row
    bucket: int | None  # the static token bucket, None on the dynamic session
    queued: bool  # inputs written on the device behind earlier work (device rounds)
    launch_s: float  # host seconds inside the engine's run call
    returned_at: float  # time.perf_counter() when the run call returned
    inputs: dict | None = field(default=None, repr=False)  # a bucket's bound inputs (reused by its next call)


class Tracer(Protocol):
    def engine_call(self, call: EngineCall) -> None: ...


class CallCounter:
    """A tracer that counts engine calls and sums their launch time per (cache, graph, bucket)."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.launch_s: Counter = Counter()

    def engine_call(self, call: EngineCall) -> None:
        key = (call.cache, call.graph, call.bucket)
        self.calls[key] += 1
        self.launch_s[key] += call.launch_s

    def count(self, cache: str | None = None, graph: str | None = None) -> int:
        """Calls matching the given cache and graph (None: any)."""
        return sum(n for (c, g, _), n in self.calls.items()
                   if (cache is None or c == cache) and (graph is None or g == graph))

    def clear(self) -> None:
        self.calls.clear()
        self.launch_s.clear()
