"""Static token buckets and the bound buffers of one (graph, bucket): packed inputs and outputs, one copy each way.

A call of T new tokens runs on the session built for (batch, bucket) with bucket the next of BUCKETS at or
above T; padding tokens attend only to themselves and are never kept, so every tensor has a fixed shape and
address (what a CUDA graph needs). Outputs of a queued call come back through `Pending`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # token counts with a static session (a CUDA graph on GPU)
KV_ROWS, KV_POS = "(kv rows)", "(kv positions)"  # a bucket's packed inputs also carry its KV scatter indices


def bucket(T: int) -> int | None:
    """The smallest bucket holding T tokens, or None when T is larger than every bucket."""
    return next((b for b in BUCKETS if b >= T), None)


def pinned(shape) -> np.ndarray:
    """Zeroed page-locked host memory: copies from it to the device are asynchronous (a copy from pageable
    memory may wait for the stream, which would stall a queued engine call)."""
    import cupyx
    out = cupyx.empty_pinned(shape, dtype=np.uint8)
    out[...] = 0
    return out


@dataclass
class Packed:
    """Several tensors in one 256-byte aligned device buffer (and a host twin), so one copy moves them all."""

    blob: object  # device buffer (uint8)
    views: dict  # name -> device view
    host_blob: np.ndarray | None  # page-locked twin (numpy: the same buffer)
    host: dict | None  # name -> host view


def packed(xp, specs: dict, host: bool) -> Packed:
    """Buffers for specs {name: (shape, dtype)}; `host`: with a host twin."""
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        offsets[name] = total
        total += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 256) * 256
    blob = xp.zeros(max(total, 256), dtype=np.uint8)

    def views(buf):
        return {name: buf[offsets[name]:offsets[name] + int(np.prod(shape)) * np.dtype(dtype).itemsize]
                .view(dtype).reshape(shape) for name, (shape, dtype) in specs.items()}
    hblob = (blob if xp is np else pinned(blob.shape)) if host else None
    return Packed(blob, views(blob), hblob, views(hblob) if host else None)


@dataclass
class Bound:
    """A binding of one graph at one token count: cache, new-KV and output buffers, a bucket's inputs too."""

    binding: object  # the backend's binding object
    session: object  # the session it binds
    new: object | None  # (layers, 2, B, heads, T, head_dim) new KV, None for in-place graphs
    outs: Packed  # outputs; a bucket's has a pinned host twin
    ins: Packed | None  # a bucket's inputs (None on the dynamic path)
    keep: dict | None = None  # a dynamic call's input arrays, alive until the call has run


def fill_inputs(host_ins: dict, feeds: dict, mask, T: int, P: int, per_token: set, max_len: int) -> None:
    """Write the feeds for P >= T tokens into a bucket's host input views: padding tokens are zeros that
    attend only to themselves, so they never change a real token's result."""
    for name, arr in feeds.items():
        h = host_ins[name]
        if name not in per_token:  # per row, not per token
            h[...] = arr
            continue
        h[:, :T] = arr
        if P > T:
            h[:, T:] = 0
    if "attention_mask" not in host_ins:  # an in-place graph: causal, no mask
        return
    h = host_ins["attention_mask"]
    h[...] = False
    h[:, :T, :max_len + T] = mask
    h[:, np.arange(T, P), max_len + np.arange(T, P)] = True


def read_outputs(xp, outs: Packed, T: int, per_token: set, host=None) -> dict:
    """The outputs for the first T tokens, on the host. host: the page-locked copy of the packed output
    buffer that the call queued behind itself (read once its event has passed), else one blocking copy."""
    if xp is np:  # the buffers are reused: copies
        return {name: (arr[:, :T] if name in per_token else arr).copy() for name, arr in outs.views.items()}
    host = outs.blob.get() if host is None else host.copy()  # a copy: the next call reuses the pinned buffer
    base = outs.blob.data.ptr
    result = {}
    for name, arr in outs.views.items():
        off = arr.data.ptr - base
        view = host[off:off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
        result[name] = view[:, :T] if name in per_token else view
    return result


class Pending:
    """An engine call queued on the device; `result()` waits for it and reads its outputs back (once).
    Valid until the cache's next call of the same graph and bucket (which reuses the output buffers).

    A call of a static bucket on CUDA queues the copy of its outputs to page-locked memory right behind
    itself, with an event: `result()` waits for that event only, not for work queued after the call (the
    verify pass behind a draft chain keeps running while the host reads the chain's tokens)."""

    def __init__(self, work: tuple, xp, outs: Packed, T: int, per_token: set, host=None, event=None):
        # what reading needs (work: the cache's device lock and stream), not the cache: a cache keeps its last
        # Pending per bucket, and a reference cycle would leave the cache's sessions to the cyclic garbage
        # collector, freed at any later moment
        self._work, self._xp, self._outs, self._T, self._per_token = work, xp, outs, T, per_token
        self._pinned, self._event = host, event
        self._host = None

    def device(self, name: str):
        """The output where the engine wrote it (a device array; first T tokens of per-token outputs)."""
        arr = self._outs.views[name]
        return arr[:, :self._T] if name in self._per_token else arr

    def result(self) -> dict:
        if self._host is None:
            if self._event is not None:  # outputs already on their way to the host: wait for this call only
                self._event.synchronize()
                self._host = read_outputs(self._xp, self._outs, self._T, self._per_token, self._pinned)
            else:  # the device lock is re-entrant: a launch waiting on an unread call holds it already
                lock, stream = self._work
                with lock, stream:
                    self._host = read_outputs(self._xp, self._outs, self._T, self._per_token)
        return self._host


class Ready:
    """A call whose outputs are already on the host (a prefill run in row windows): the Pending interface. An
    output asked for on the device is uploaded once, under the cache's lock and on its stream (work: both)."""

    def __init__(self, xp, outs: dict, work: tuple):
        self._xp, self._outs, self._work, self._device = xp, outs, work, {}

    def device(self, name: str):
        if name not in self._device:
            lock, stream = self._work
            with lock, stream:
                self._device[name] = self._xp.asarray(self._outs[name])
        return self._device[name]

    def result(self) -> dict:
        return self._outs


def route(stand_in: str | None, fused_spec: dict | None, lengths: np.ndarray, scratch: int, max_len: int,
          feeds: dict, new_mask: np.ndarray, P: int, take: dict | None) -> bool:
    """Whether an attached in-place graph (`stand_in`) computes exactly what the cache's graph would for this
    call: no scratch entries, every row's new tokens causal at positions following its cache, a batch of one
    or one token per row (ONNX Runtime's GroupQueryAttention takes several new tokens only for a single row),
    and room in the cache for the padded call (it writes every padding token's KV too)."""
    if stand_in is None or scratch:
        return False
    B, T = new_mask.shape[:2]
    steps = fused_spec.get("chain_steps", 1) - 1  # a chain writes its steps' KV behind too
    if (B > 1 and T > 1) or int(lengths.max()) + P + steps > max_len:
        return False
    if take and not set(take) <= set(fused_spec["inputs"]):
        return False
    pos = feeds.get("position_ids")
    if pos is None or not np.array_equal(pos, lengths[:, None] + np.arange(T)):
        return False
    return bool((new_mask == np.tri(T, dtype=bool)).all())
