"""KV cache over preallocated buffers: committed entries per row plus a scratch area for speculation.

Every engine call appends its new tokens' KV to the scratch area behind each row's committed length.
``commit`` keeps the chosen scratch entries (the accepted path of a chain or a tree) and drops the rest,
so a rewind is never a copy of the whole cache and a tree's accepted path is compacted, not truncated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import BackendError, InputError

KV_INPUT = ("past.%d.key", "past.%d.value")
KV_OUTPUT = ("new.%d.key", "new.%d.value")


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one model's KV cache."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_len: int  # positions a row can hold, committed plus scratch


def attention_mask(lengths: np.ndarray, scratch: int, new_mask: np.ndarray, past: int, max_len: int) -> np.ndarray:
    """(B, T, past + T) engine mask: each row's committed entries, the scratch entries and new tokens new_mask
    allows. `past` is how many cache positions the engine reads; raises when the cache would overflow."""
    B, T = new_mask.shape[:2]
    if int(lengths.max()) + scratch + T > max_len:
        raise InputError(f"kv cache: {int(lengths.max()) + scratch + T} positions needed | engine holds {max_len} | "
                         "shorten the history or export with a larger max_seq_len")
    mask = np.zeros((B, T, past + T), dtype=bool)
    for b in range(B):
        n = int(lengths[b])
        mask[b, :, :n] = True
        mask[b, :, n:n + scratch] = new_mask[b, :, :scratch]
    mask[:, :, past:] = new_mask[:, :, scratch:]
    return mask


def take_on_host(feeds: dict, take: dict | None) -> dict:
    """Feeds with `take`'s values written in: {input name: (call, output name, first column)} copies the
    call's output (its `result()`, on the host) into the input's columns from `first column` on; (array,
    None, first column) copies that array (a device array is read back; a per-row input takes it whole).
    Caches without device buffers use this; device caches copy on the device instead (DeviceCache.launch)."""
    if not take:
        return feeds
    feeds = dict(feeds)
    for name, (src, out, col) in take.items():
        got = src.result()[out] if out is not None else src if isinstance(src, np.ndarray) else src.get()
        feeds[name] = np.array(feeds[name])
        if feeds[name].ndim == 1:
            feeds[name][...] = got
        else:
            feeds[name][:, col:col + got.shape[1]] = got
    return feeds


class Done:
    """The result of an engine call that has run already (host caches run calls when they are launched)."""

    def __init__(self, out: dict):
        self.out = out

    def result(self) -> dict:
        return self.out


class HostCalls:
    """`launch` for caches whose engine calls run at once on the host: values to `take` are read back first."""

    queues_on_device = False  # capability: calls cannot be queued with inputs written on the device

    def launch(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None, take: dict | None = None,
               fill=None) -> Done:
        if fill is not None:
            raise BackendError("device-written inputs need a device cache with static shapes | "
                               "RuntimeOptions(device_cache=True, static_shapes=True)")
        return Done(self.forward(take_on_host(feeds, take), new_mask, graph))


class KVRunner(HostCalls):
    """Runs one engine (a function of named numpy arrays) over its own KV cache."""

    def __init__(self, forward: Callable[[dict], dict], spec: CacheSpec, batch: int, dtype=np.float32):
        self._forwards = {None: forward}
        self.chain_steps = 0  # K of an attached fused draft-chain graph (see `attach`)
        self.spec = spec
        shape = (batch, spec.n_kv_heads, spec.max_len, spec.head_dim)
        nbytes = 2 * spec.n_layers * int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            self.keys = [np.zeros(shape, dtype) for _ in range(spec.n_layers)]
            self.values = [np.zeros(shape, dtype) for _ in range(spec.n_layers)]
        except MemoryError:
            raise BackendError(f"kv cache: out of memory allocating {nbytes / 2**20:.0f} MiB for batch {batch} x "
                               f"{spec.max_len} positions | lower the batch or the history length") from None
        self.lengths = np.zeros(batch, dtype=np.int64)  # committed entries per row
        self.scratch = 0  # uncommitted entries behind every row's committed ones

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def attach(self, graph: str, forward: Callable[[dict], dict], graph_spec: dict) -> None:
        """Let `forward(..., graph=graph)` run another engine over this cache (same KV layout), e.g. the fused
        draft chain ("draft_chain") next to the draft."""
        self._forwards[graph] = forward
        if graph == "draft_chain":
            self.chain_steps = graph_spec["chain_steps"]

    def forward(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None) -> dict:
        """Run the engine (or the attached `graph`) on T new tokens per row.

        new_mask: (B, T, scratch + T) bool, which scratch entries and new tokens each new token sees;
        every token sees all committed entries of its row. The new tokens' KV becomes scratch entries (an
        engine may return more KV entries than tokens, e.g. a chain's draft steps: only the first T are kept).
        """
        B, T = feeds["input_ids"].shape
        past = int(self.lengths.max()) + self.scratch
        mask = attention_mask(self.lengths, self.scratch, new_mask, past, self.spec.max_len)
        feeds = dict(feeds, attention_mask=mask)
        for i in range(self.spec.n_layers):
            feeds[KV_INPUT[0] % i] = self.keys[i][:, :, :past]
            feeds[KV_INPUT[1] % i] = self.values[i][:, :, :past]
        out = self._forwards[graph](feeds)
        for i in range(self.spec.n_layers):
            for buf, name in ((self.keys[i], KV_OUTPUT[0] % i), (self.values[i], KV_OUTPUT[1] % i)):
                new = out[name]
                for b in range(B):
                    start = int(self.lengths[b]) + self.scratch
                    buf[b, :, start:start + T] = new[b, :, :T]
        self.scratch += T
        return out

    def commit(self, select: list) -> None:
        """Keep, per row, the scratch entries with the given indices (in order) and drop the rest."""
        for b, idx in enumerate(select):
            idx = np.asarray(idx, dtype=np.int64)
            if len(idx) == 0:
                continue
            n = int(self.lengths[b])
            for buf in (*self.keys, *self.values):
                buf[b, :, n:n + len(idx)] = buf[b][:, n + idx]
            self.lengths[b] += len(idx)
        self.scratch = 0

    def discard(self) -> None:
        """Drop every scratch entry."""
        self.scratch = 0
