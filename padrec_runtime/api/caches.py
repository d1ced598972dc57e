"""The caches a Recommender hands to its decodes: host caches made per request, device caches kept and reused."""
from __future__ import annotations

import threading

from ..backends.base import cast_feeds, numpy_dtype
from ..cache.host import CacheSpec, KVRunner

# graphs that run over another graph's KV cache: the fused draft chain over the draft's, and the in-place
# graphs standing in for the target and the chain
ATTACHED = {"draft": ("draft_chain", "draft_chain_gqa"), "target": ("target_gqa",)}


class CacheStore:
    """Makes the KV caches of a request. Device caches (buffers, bindings and CUDA graphs) are expensive:
    `recommend` (serialised) reuses one per (graph, batch); caller-owned streams lease theirs from a pool, so
    the number of caches (and of captured graphs) stays at the peak of streams open at once."""

    def __init__(self, manifest, backends: dict, settings, stream=None, tracer=None):
        self.manifest, self.backends, self.settings = manifest, backends, settings
        self.stream, self.tracer = stream, tracer
        self.device_lock = threading.RLock()  # one engine call or cache update at a time on the device
        self._shared: dict = {}
        self._pool: dict = {}
        self._window_buffers: dict = {}  # graph -> the prefill windows' bound buffers, one set for its caches
        self._pool_lock = threading.Lock()

    def _attached(self, graph: str) -> list:
        return [g for g in ATTACHED.get(graph, ()) if g in self.backends]

    def host_cache(self, graph: str, batch: int, max_len: int) -> KVRunner:
        """A numpy cache of `max_len` positions over any backend (engines called with host arrays)."""
        g = self.manifest.graph(graph)
        kv = g["kv"]
        spec = CacheSpec(kv["n_layers"], kv["n_kv_heads"], kv["head_dim"], max_len)
        cache = KVRunner(self._infer(graph), spec, batch, numpy_dtype(kv["dtype"]))
        for name in self._attached(graph):
            cache.attach(name, self._infer(name), self.manifest.graph(name))
        return cache

    def _infer(self, graph: str):
        backend, spec = self.backends[graph], self.manifest.graph(graph)
        return lambda feeds: backend.infer(cast_feeds(spec, feeds))

    def _device_cache(self, graph: str, batch: int):
        from ..cache.device import DeviceCache
        g, s = self.manifest.graph(graph), self.settings
        kv = g["kv"]
        spec = CacheSpec(kv["n_layers"], kv["n_kv_heads"], kv["head_dim"], self.manifest.model["max_seq_len"])
        cache = DeviceCache(self.backends[graph], graph, g, spec, batch, s.device, static=s.static_shapes,
                            stream=self.stream, lock=self.device_lock, tracer=self.tracer,
                            prefill_rows=s.prefill_rows, window_buffers=self._window_buffers.setdefault(graph, {}))
        for name in self._attached(graph):
            cache.attach(name, self.backends[name], self.manifest.graph(name))
        return cache

    def shared(self, graph: str, batch: int):
        """The device cache `recommend` reuses for this graph and batch size, emptied."""
        key = (graph, batch)
        if key not in self._shared:
            self._shared[key] = self._device_cache(graph, batch)
        cache = self._shared[key]
        cache.reset()
        return cache

    def lease(self, graph: str, batch: int):
        """A device cache of its own for a caller-owned stream (from the pool when one is free), emptied."""
        with self._pool_lock:
            free = self._pool.setdefault((graph, batch), [])
            cache = free.pop() if free else None
        if cache is None:
            return self._device_cache(graph, batch)
        cache.reset()
        return cache

    def give_back(self, leased: list) -> None:
        """Return (graph, cache) pairs to the pool (a stream's finaliser calls this)."""
        with self._pool_lock:
            for graph, cache in leased:
                self._pool.setdefault((graph, cache.batch), []).append(cache)

    def pooled(self, graph: str, batch: int) -> int:
        """Caches free in the pool for this graph and batch size."""
        with self._pool_lock:
            return len(self._pool.get((graph, batch), []))

    def kv_bytes(self) -> int:
        """Bytes of the device KV caches kept (reused by `recommend` or free in the pool)."""
        with self._pool_lock:
            caches = [*self._shared.values(), *(c for free in self._pool.values() for c in free)]
        return sum(int(c.cache.nbytes) for c in caches)

    def buffer_bytes(self) -> dict:
        """Bytes of the kept device caches' bound buffers by kind (DeviceCache.buffer_bytes), KV caches aside."""
        with self._pool_lock:
            caches = [*self._shared.values(), *(c for free in self._pool.values() for c in free)]
        seen, total = set(), {}
        for cache in caches:
            for kind, n in cache.buffer_bytes(seen).items():
                total[kind] = total.get(kind, 0) + n
        return total

    def clear(self) -> None:
        self._shared.clear()
        self._window_buffers.clear()
        with self._pool_lock:
            self._pool.clear()

    def __bool__(self) -> bool:
        return bool(self._shared or self._pool)

