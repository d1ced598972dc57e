"""KV cache resident on the engine's device, engines bound by address (ONNX Runtime IO binding).

One buffer (layers, key|value, batch, kv_heads, max_len, head_dim) holds the cache; each layer's past is a
contiguous slice of it, bound in place, so no cache ever crosses the bus. Engines write the new tokens'
KV into a bound output buffer; one device copy per row moves them behind the row's committed entries, and
`commit` gathers a round's accepted path on the device. Only logits and hidden states are read back.
The same code runs with numpy on CPU (tests) and cupy on CUDA.
"""
from __future__ import annotations

import numpy as np

from .backends.base import cast_feeds, check_feeds, numpy_dtype
from .errors import BackendError
from .kvcache import CacheSpec, attention_mask


def array_module(device: str):
    """(array module, pointer-of, to-host) for 'cpu' (numpy) or 'cuda' (cupy)."""
    if device == "cpu":
        return np, (lambda a: a.ctypes.data), (lambda a: a.copy())  # outputs are reused buffers: hand out copies
    try:
        import cupy
    except ImportError:
        raise BackendError("cupy: not installed | pip install cupy-cuda12x (or cupy-cuda13x) for device='cuda'") from None
    return cupy, (lambda a: a.data.ptr), cupy.asnumpy


class BoundKVRunner:
    """A KVRunner whose cache lives with the engine (same interface: forward, commit, discard)."""

    def __init__(self, session, graph: str, graph_spec: dict, spec: CacheSpec, batch: int, device: str = "cuda"):
        self.xp, self._ptr, self._host = array_module(device)
        self.device, self.graph, self.graph_spec, self.spec = device, graph, graph_spec, spec
        kv = graph_spec["kv"]
        self.dtype = numpy_dtype(kv["dtype"])
        self._names = [(kv["key_input"] % i, kv["value_input"] % i, kv["key_output"] % i, kv["value_output"] % i)
                       for i in range(spec.n_layers)]
        shape = (spec.n_layers, 2, batch, spec.n_kv_heads, spec.max_len, spec.head_dim)
        try:
            self.cache = self.xp.zeros(shape, dtype=self.dtype)
        except Exception as exc:  # numpy MemoryError or cupy OutOfMemoryError
            if not isinstance(exc, MemoryError) and "OutOfMemory" not in type(exc).__name__:
                raise
            nbytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
            raise BackendError(f"kv cache: out of {device} memory allocating {nbytes / 2**20:.0f} MiB for batch "
                               f"{batch} x {spec.max_len} positions | lower the batch or max_seq_len") from None
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.scratch = 0
        self.session = session
        self._by_seq: dict = {}  # seq length -> (binding, new-KV buffer, output buffers), bound once
        self._keep: list = []  # input arrays bound for the current run

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def _bind(self, binding, name: str, arr, output: bool = False) -> None:
        fn = binding.bind_output if output else binding.bind_input
        fn(name, self.device, 0, arr.dtype, list(arr.shape), self._ptr(arr))

    def _bound_for(self, T: int):
        """The binding for T new tokens: cache, new-KV and output buffers bound once and reused."""
        hit = self._by_seq.get(T)
        if hit is not None:
            return hit
        xp, B = self.xp, self.batch
        binding = self.session.io_binding()
        new = xp.empty((self.spec.n_layers, 2, B, self.spec.n_kv_heads, T, self.spec.head_dim), dtype=self.dtype)
        for i, (k_in, v_in, k_out, v_out) in enumerate(self._names):
            self._bind(binding, k_in, self.cache[i, 0])
            self._bind(binding, v_in, self.cache[i, 1])
            self._bind(binding, k_out, new[i, 0], output=True)
            self._bind(binding, v_out, new[i, 1], output=True)
        outs = {}
        for name, t in self.graph_spec["outputs"].items():
            outs[name] = xp.empty((B, T, t["shape"][-1]), dtype=numpy_dtype(t["dtype"]))
            self._bind(binding, name, outs[name], output=True)
        self._by_seq[T] = (binding, new, outs)
        return self._by_seq[T]

    def forward(self, feeds: dict, new_mask: np.ndarray) -> dict:
        xp, S = self.xp, self.spec.max_len
        B, T = feeds["input_ids"].shape
        mask = attention_mask(self.lengths, self.scratch, new_mask, S, S)
        feeds = cast_feeds(self.graph_spec, dict(feeds, attention_mask=mask))
        probe = dict(feeds)
        for k_in, v_in, _, _ in self._names:
            probe[k_in] = probe[v_in] = np.empty((B, self.spec.n_kv_heads, S, self.spec.head_dim), self.dtype)
        check_feeds(self.graph, self.graph_spec, probe)
        binding, new, outs = self._bound_for(T)
        self._keep = [xp.asarray(v) for v in feeds.values()]
        for name, arr in zip(feeds, self._keep):
            self._bind(binding, name, arr)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.graph}: onnxruntime run failed ({str(exc)[:300]})") from None
        # one scatter writes every row's new KV behind its committed and scratch entries, all layers at once
        rows = np.repeat(np.arange(B), T).reshape(B, T)
        pos = (self.lengths + self.scratch)[:, None] + np.arange(T)
        self.cache[:, :, xp.asarray(rows), :, xp.asarray(pos)] = new.transpose(2, 4, 0, 1, 3, 5)
        self.scratch += T
        return {name: self._host(arr) for name, arr in outs.items()}

    def commit(self, select: list) -> None:
        """Keep each row's selected scratch entries (one gather and one scatter for the whole batch)."""
        counts = [len(idx) for idx in select]
        M = max(counts, default=0)
        if M:
            S = self.spec.max_len
            src = np.empty((self.batch, M), dtype=np.int64)
            dst = np.empty((self.batch, M), dtype=np.int64)
            for b, idx in enumerate(select):
                n, m = int(self.lengths[b]), counts[b]
                src[b, :m] = n + np.asarray(idx, dtype=np.int64)
                dst[b, :m] = n + np.arange(m)
                src[b, m:] = dst[b, m:] = min(n + m, S - 1)  # padding copies an entry onto itself
            rows = self.xp.asarray(np.repeat(np.arange(self.batch), M).reshape(self.batch, M))
            values = self.cache[:, :, rows, :, self.xp.asarray(src)]
            self.cache[:, :, rows, :, self.xp.asarray(dst)] = values
            self.lengths += np.asarray(counts, dtype=np.int64)
        self.scratch = 0

    def discard(self) -> None:
        self.scratch = 0
