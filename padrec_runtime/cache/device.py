"""KV cache resident on the engine's device, engines bound by address (ONNX Runtime IO binding).

One buffer (layers, key|value, batch, kv_heads, max_len, head_dim) holds the cache; each layer's past is a
contiguous slice of it, bound in place, so no cache ever crosses the bus. Engines write the new tokens'
KV into a bound output buffer; one device copy per row moves them behind the row's committed entries, and
`commit` gathers a round's accepted path on the device. Only logits and hidden states are read back.
In-place graphs (target_gqa, draft_chain_gqa) have the cache bound as their KV output too and write the new
KV there themselves; `_route` gives them the calls they compute exactly, the standard graphs the rest.
The same code runs with numpy on CPU (tests) and cupy on CUDA.

Static shapes: with `static=True` a call of T new tokens runs on a session built for exactly (batch, bucket)
with bucket the next of BUCKETS at or above T (padding tokens see only themselves and are never kept), so
every tensor has a fixed shape and a fixed address. On CUDA those sessions replay CUDA graphs (ONNX Runtime
captures one per bucket on its first runs); calls longer than the largest bucket (a long prefill) run on
the dynamic session. Sessions are shared by every runner of the same batch size, so each runner replays
its own graphs (an ONNX Runtime graph annotation id per runner: a graph is tied to the buffers it was
captured with). Each bucket's session holds its own copy of the weights on the device: GPU memory
grows with the buckets a workload touches (typically 3-5), in exchange for launch-free engine calls.
Every input of a bucket lives in one persistent buffer that each call overwrites.

Queued calls: `launch` returns a Pending instead of waiting; replays of a captured graph return as soon as
they are queued, and `take` copies another call's device output into this call's inputs on the device, so a
fused chain round (draft chain, then verify) waits for the device once.
"""
from __future__ import annotations

import contextlib
import itertools
import time

import numpy as np

from ..backends.base import cast_feeds, check_feeds, numpy_dtype
from ..errors import BackendError
from .host import CacheSpec, attention_mask, take_on_host
from ..manifest import IN_PLACE

_GRAPH_IDS = itertools.count(1)  # ONNX Runtime's CUDA-graph annotation ids (0 is reserved)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # token counts with a static session (a CUDA graph on GPU)
_CAPTURE_RUNS = 2  # runs of a bucket before its CUDA graph replays (ONNX Runtime: one warm-up run, one capture)
_KV_ROWS, _KV_POS = "(kv rows)", "(kv positions)"  # a bucket's packed inputs also carry its KV scatter indices


def bucket(T: int) -> int | None:
    """The smallest bucket holding T tokens, or None when T is larger than every bucket."""
    return next((b for b in BUCKETS if b >= T), None)


def array_module(device: str):
    """(array module, pointer-of) for 'cpu' (numpy) or 'cuda' (cupy)."""
    if device == "cpu":
        return np, (lambda a: a.ctypes.data)
    try:
        import cupy
    except ImportError:
        raise BackendError("cupy: not installed | pip install cupy-cuda12x (or cupy-cuda13x) for device='cuda'") from None
    return cupy, (lambda a: a.data.ptr)


def _pinned(shape) -> np.ndarray:
    """Zeroed page-locked host memory: copies from it to the device are asynchronous (a copy from pageable
    memory may wait for the stream, which would stall a queued engine call)."""
    import cupyx
    out = cupyx.empty_pinned(shape, dtype=np.uint8)
    out[...] = 0
    return out


def _read(xp, out_blob, outs: dict, T: int, per_token: set, host=None) -> dict:
    """The outputs for the first T tokens, on the host. host: the page-locked copy of the packed output
    buffer that the call queued behind itself (read once its event has passed), else one blocking copy."""
    if xp is np:  # the buffers are reused: copies
        return {name: (arr[:, :T] if name in per_token else arr).copy() for name, arr in outs.items()}
    host = out_blob.get() if host is None else host.copy()  # a copy: the next call reuses the pinned buffer
    base = out_blob.data.ptr
    result = {}
    for name, arr in outs.items():
        off = arr.data.ptr - base
        view = host[off:off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
        result[name] = view[:, :T] if name in per_token else view
    return result


class Pending:
    """An engine call queued on the device; `result()` waits for it and reads its outputs back (once).
    Valid until the runner's next call of the same graph and bucket (which reuses the output buffers).

    A call of a static bucket on CUDA queues the copy of its outputs to page-locked memory right behind
    itself, with an event: `result()` waits for that event only, not for work queued after the call (the
    verify pass behind a draft chain keeps running while the host reads the chain's tokens)."""

    def __init__(self, runner, out_blob, outs: dict, T: int, per_token: set, host=None, event=None):
        # what reading needs, not the runner: a runner keeps its last Pending per bucket, and a reference
        # cycle would leave the runner's sessions to the cyclic garbage collector, freed at any later moment
        self._guard, self._stream, self._xp = runner._guard, runner.stream, runner.xp
        self._blob, self._outs, self._T, self._per_token = out_blob, outs, T, per_token
        self._pinned, self._event = host, event
        self._host = None

    def device(self, name: str):
        """The output where the engine wrote it (a device array; first T tokens of per-token outputs)."""
        arr = self._outs[name]
        return arr[:, :self._T] if name in self._per_token else arr

    def result(self) -> dict:
        if self._host is None:
            if self._event is not None:  # outputs already on their way to the host: wait for this call only
                self._event.synchronize()
                self._host = _read(self._xp, self._blob, self._outs, self._T, self._per_token, self._pinned)
            else:  # the guard is re-entrant: a launch waiting on an unread call holds it already
                with self._guard, self._stream:
                    self._host = _read(self._xp, self._blob, self._outs, self._T, self._per_token)
        return self._host


class BoundKVRunner:
    """A KVRunner whose cache lives with the engine (same interface: forward, commit, discard).

    backend: an OrtBackend (its `session`, and `static_session(dims)` when static); stream: the cupy stream
    that ONNX Runtime was given as its compute stream, so copies, engine runs and cache updates are ordered.
    """

    def __init__(self, backend, graph: str, graph_spec: dict, spec: CacheSpec, batch: int, device: str = "cuda",
                 static: bool = False, stream=None, lock=None):
        self.xp, self._ptr = array_module(device)
        self.device, self.graph, self.graph_spec, self.spec = device, graph, graph_spec, spec
        self.backend, self.static = backend, static
        self.stream = stream if stream is not None else contextlib.nullcontext()
        # device work of every runner sharing the stream is serialised: a CUDA-graph capture on the shared
        # stream must not see another thread's allocations, copies or kernels
        self._guard = lock if lock is not None else contextlib.nullcontext()
        self.dtype = numpy_dtype(graph_spec["kv"]["dtype"])
        self._graphs: dict = {}  # graph name -> (backend, spec, KV names, KV input names, per-token names)
        self._stand_in: dict = {}  # graph -> an attached in-place graph that runs its causal calls (target_gqa)
        self._total = np.array(spec.max_len, dtype=np.int32)  # the in-place graphs' host scalar input
        self.attach(graph, backend, graph_spec)
        shape = (spec.n_layers, 2, batch, spec.n_kv_heads, spec.max_len, spec.head_dim)
        try:
            with self._guard, self.stream:
                self.cache = self.xp.zeros(shape, dtype=self.dtype)
        except Exception as exc:  # numpy MemoryError or cupy OutOfMemoryError
            if not isinstance(exc, MemoryError) and "OutOfMemory" not in type(exc).__name__:
                raise
            nbytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
            raise BackendError(f"kv cache: out of {device} memory allocating {nbytes / 2**20:.0f} MiB for batch "
                               f"{batch} x {spec.max_len} positions | lower the batch or max_seq_len") from None
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.scratch = 0
        self._by_seq: dict = {}  # (graph, bucket) -> (binding, new KV, outputs, inputs, session), made once
        self._unread: dict = {}  # (graph, bucket) -> its last Pending, until a later call of that key
        self._graphed: set = set()  # (graph, bucket) keys whose session replays a CUDA graph
        self.graph_id = next(_GRAPH_IDS)
        self._run_options = self._queued_options = None
        if static and hasattr(backend, "_ort"):  # this runner's own CUDA graphs in the shared static sessions
            self._run_options = backend._ort.RunOptions()
            self._run_options.add_run_config_entry("gpu_graph_id", str(self.graph_id))
            self._queued_options = self._run_options
            if device != "cpu":  # once a bucket's graph is captured its replays return once queued
                # (Pending.result waits, on the same stream). Only replays: a run that executes the graph node
                # by node ends with a sync as usual (unsynced, ONNX Runtime frees its pinned host buffers from a
                # stream callback, where CUDA forbids it: the process aborts)
                self._queued_options = backend._ort.RunOptions()
                self._queued_options.add_run_config_entry("gpu_graph_id", str(self.graph_id))
                self._queued_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.launch_s: dict = {}  # as `calls`: host seconds spent in the engine's run call (to return)
        self.queued_at = 0.0  # time.perf_counter() when the last run call returned
        self.extras: dict = {}  # what decode helpers keep per runner (DeviceRounds' device tables and buffers)
        self._stream_owner = self.stream  # set last: when the runner goes, its sessions go before the stream
        self.calls: dict = {}  # (bucket or "dynamic"), or (graph, bucket) for attached graphs -> engine calls

    def attach(self, graph: str, backend, graph_spec: dict) -> None:
        """Let `forward(..., graph=graph)` run another graph over this cache (same KV layout), e.g. the fused
        draft chain next to the draft."""
        kv = graph_spec["kv"]
        if kv["n_layers"] != self.spec.n_layers or numpy_dtype(kv["dtype"]) != self.dtype:
            raise BackendError(f"{graph}: KV layout differs from {self.graph}'s | re-export the engines together")
        if kv.get("in_place"):  # runs the causal calls of the graph it stands in for (see _route)
            if kv.get("max_len") != self.spec.max_len:
                raise BackendError(f"{graph}: cache of {kv.get('max_len')} positions | {self.graph}'s holds "
                                   f"{self.spec.max_len} | re-export the engines together")
            self._stand_in[IN_PLACE[graph]] = graph
        names = [(kv["key_input"] % i, kv["value_input"] % i, kv["key_output"] % i, kv["value_output"] % i)
                 for i in range(self.spec.n_layers)]
        per_token = {name for side in ("inputs", "outputs") for name, t in graph_spec[side].items()
                     if t["shape"][1:2] == ["seq"]}  # tensors with one entry per token (the rest: per row)
        self._graphs[graph] = (backend, graph_spec, names, {n for k_in, v_in, _, _ in names for n in (k_in, v_in)},
                               per_token)

    @property
    def chain_steps(self) -> int:
        """K of an attached fused draft-chain graph (0 without one)."""
        return self._graphs["draft_chain"][1]["chain_steps"] if "draft_chain" in self._graphs else 0

    @property
    def batch(self) -> int:
        return len(self.lengths)

    def _bind(self, binding, name: str, arr, output: bool = False) -> None:
        fn = binding.bind_output if output else binding.bind_input
        fn(name, self.device, 0, arr.dtype, list(arr.shape), self._ptr(arr))

    def _packed(self, specs: dict, host: bool):
        """One device buffer holding several tensors (name -> (shape, dtype)), 256-byte aligned, so a
        single copy moves them all; returns (device buffer, device views, host buffer, host views)."""
        offsets, total = {}, 0
        for name, (shape, dtype) in specs.items():
            offsets[name] = total
            total += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 256) * 256
        blob = self.xp.zeros(max(total, 256), dtype=np.uint8)

        def views(buf):
            return {name: buf[offsets[name]:offsets[name] + int(np.prod(shape)) * np.dtype(dtype).itemsize]
                    .view(dtype).reshape(shape) for name, (shape, dtype) in specs.items()}
        hblob = (blob if self.xp is np else _pinned(blob.shape)) if host else None
        return blob, views(blob), hblob, (views(hblob) if host else None)

    def _buffers(self, graph: str, session, T: int, inputs: bool):
        """A binding for T new tokens with the cache, new-KV and output buffers (and, for a bucket, the
        input buffers) bound. Inputs and outputs each live in one packed buffer: one copy each way."""
        xp, B, S = self.xp, self.batch, self.spec.max_len
        _, gspec, names, kv_inputs, _ = self._graphs[graph]
        dims = {"batch": B, "seq": T, "past": S, "past_plus_seq": S + T}
        binding = session.io_binding()
        extra = gspec.get("chain_steps", 1) - 1  # a chain graph also returns its draft steps' KV (not kept)
        in_place = gspec["kv"].get("in_place", False)
        new = None if in_place else xp.empty(
            (self.spec.n_layers, 2, B, self.spec.n_kv_heads, T + extra, self.spec.head_dim), dtype=self.dtype)
        for i, (k_in, v_in, k_out, v_out) in enumerate(names):
            self._bind(binding, k_in, self.cache[i, 0])
            self._bind(binding, v_in, self.cache[i, 1])
            self._bind(binding, k_out, (self.cache if in_place else new)[i, 0], output=True)
            self._bind(binding, v_out, (self.cache if in_place else new)[i, 1], output=True)
        if "total_sequence_length" in gspec["inputs"]:  # a host scalar (ONNX Runtime reads it on the CPU)
            binding.bind_input("total_sequence_length", "cpu", 0, np.int32, [], self._total.ctypes.data)
        out_specs = {name: (tuple(dims.get(d, d) for d in t["shape"]), numpy_dtype(t["dtype"]))
                     for name, t in gspec["outputs"].items()}
        out_blob, outs, out_host, _ = self._packed(out_specs, host=inputs)  # a bucket's: a pinned copy too
        for name, arr in outs.items():
            self._bind(binding, name, arr, output=True)
        ins = None
        if inputs:
            in_specs = {name: (tuple(dims.get(d, d) for d in t["shape"]), numpy_dtype(t["dtype"]))
                        for name, t in gspec["inputs"].items()
                        if name not in kv_inputs and name != "total_sequence_length"}
            in_specs[_KV_ROWS] = in_specs[_KV_POS] = ((B, T), np.int64)  # where the new KV goes: up with the feeds
            in_blob, dev_ins, host_blob, host_ins = self._packed(in_specs, host=True)
            host_ins[_KV_ROWS][...] = np.arange(B)[:, None]
            for name, arr in dev_ins.items():
                if name not in (_KV_ROWS, _KV_POS):
                    self._bind(binding, name, arr)
            ins = (in_blob, host_blob, host_ins, dev_ins)
        return binding, new, (out_blob, outs, out_host), ins

    def _fill(self, host_ins: dict, feeds: dict, mask: np.ndarray, T: int, P: int, per_token: set) -> None:
        """Write the feeds for P >= T tokens into the host input views: padding tokens are zeros that
        attend only to themselves, so they never change a real token's result."""
        S = self.spec.max_len
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
        h[:, :T, :S + T] = mask
        h[:, np.arange(T, P), S + np.arange(T, P)] = True

    def _route(self, graph: str, feeds: dict, new_mask: np.ndarray, P: int, take: dict | None) -> str:
        """The attached in-place graph where it computes exactly what `graph` would: no scratch entries, every
        row's new tokens causal at positions following its cache, a batch of one or one token per row (ONNX
        Runtime's GroupQueryAttention takes several new tokens only for a single row), and room in the
        cache for the padded call (it writes every padding token's KV too). Else `graph`."""
        fused = self._stand_in.get(graph)
        if fused is None or self.scratch:
            return graph
        B, T = new_mask.shape[:2]
        steps = self._graphs[fused][1].get("chain_steps", 1) - 1  # a chain writes its steps' KV behind too
        if (B > 1 and T > 1) or int(self.lengths.max()) + P + steps > self.spec.max_len:
            return graph
        if take and not set(take) <= set(self._graphs[fused][1]["inputs"]):
            return graph
        pos = feeds.get("position_ids")
        if pos is None or not np.array_equal(pos, self.lengths[:, None] + np.arange(T)):
            return graph
        return fused if (new_mask == np.tri(T, dtype=bool)).all() else graph

    def forward(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None) -> dict:
        """Run T new tokens through this runner's graph (or an attached one) over the cache; the new tokens'
        KV becomes scratch entries behind each row's committed ones."""
        return self.launch(feeds, new_mask, graph).result()

    def launch(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None, take: dict | None = None,
               fill=None):
        """`forward` without waiting: queues the call on the device and returns a Pending whose `result()`
        reads the outputs back. take: {input name: (Pending, output name, first column)} copies another
        call's device output into this call's input columns on the device (the draft chain's tokens into the
        verify pass), so neither waits for the host in between; (device array, None, first column) copies
        that array (a per-row input takes it whole). Taken values replace the feeds' on a static bucket; on
        the dynamic path (no bound input buffers) the host waits for Pending values instead.
        fill(device inputs): writes inputs on the device after the feeds' upload and `take`'s copies, in stream
        order (DeviceRounds' accept step); static buckets only."""
        xp, S = self.xp, self.spec.max_len
        B, T = feeds["input_ids"].shape
        P = bucket(T) if self.static else None
        graph = self._route(graph or self.graph, feeds, new_mask, P or T, take)
        backend, gspec, names, _, per_token = self._graphs[graph]
        in_place = gspec["kv"].get("in_place", False)
        # the engine mask (which also refuses an overflowing cache); an in-place call has none, and _route
        # made sure of its room
        mask = None if in_place else attention_mask(self.lengths, self.scratch, new_mask, S, S)
        if in_place:  # causal over each row's cache: its length after this call says where the tokens go
            feeds = {name: arr for name, arr in feeds.items() if name in gspec["inputs"]}
            feeds["seqlens_k"] = (self.lengths + (P or T) - 1).astype(np.int32)
        key = (graph, P)
        first = P is not None and key not in self._by_seq
        if fill is not None and P is None:
            raise BackendError(f"{graph}: device-written inputs need a static bucket | T={T} is above the largest "
                               f"({BUCKETS[-1]}); use static shapes and a shorter call")
        if take and P is None:  # no bound input buffers to copy into: the host waits for the values
            feeds, take = take_on_host(feeds, take), None
        if first or P is None:  # checked on each new shape (the loop's feeds keep their dtypes); a bucket's
            feeds = cast_feeds(gspec, feeds)  # later calls cast while copying into its buffers
            probe = dict(feeds, total_sequence_length=self._total) if in_place else dict(feeds, attention_mask=mask)
            for k_in, v_in, _, _ in names:
                probe[k_in] = probe[v_in] = np.empty((B, self.spec.n_kv_heads, S, self.spec.head_dim), self.dtype)
            check_feeds(graph, gspec, probe)
        with self._guard, self.stream:
            if P is not None:
                if first:
                    dims = ({"batch": B, "seq": P, "max_seq_len": S} if in_place else
                            {"batch": B, "seq": P, "past": S, "past_plus_seq": S + P})
                    session = backend.static_session(dims)
                    self._by_seq[key] = self._buffers(graph, session, P, inputs=True) + (session,)
                    if backend.replays_graph(dims):
                        self._graphed.add(key)
                binding, new, (out_blob, outs, out_host), (in_blob, host_blob, host_ins, dev_ins), session = \
                    self._by_seq[key]
                unread = self._unread.pop(key, None)
                if unread is not None:  # its input copy may still be queued: wait before the host buffer changes
                    unread.result()
                self._fill(host_ins, feeds, mask, T, P, per_token)
                if not in_place:  # where _scatter puts the new KV
                    host_ins[_KV_POS][...] = (self.lengths + self.scratch)[:, None] + np.arange(P)
                if xp is not np:
                    in_blob.set(host_blob)
                for name, (src, out, col) in (take or {}).items():  # device to device, in stream order
                    dst = dev_ins[name]
                    got = (src if out is None else src.device(out)).astype(dst.dtype, copy=False)
                    if dst.ndim == 1:  # one value per row
                        dst[...] = got
                    else:
                        dst[:, col:col + got.shape[1]] = got
                if fill is not None:
                    fill(dev_ins)
            else:  # dynamic shapes; buffers for one call only (prompt lengths vary without bound)
                session = backend.session
                binding, new, (out_blob, outs, out_host), _ = self._buffers(graph, session, T, inputs=False)
                keep = {name: xp.asarray(arr) for name, arr in (feeds if in_place else dict(feeds, attention_mask=mask)
                                                                 ).items()}
                for name, arr in keep.items():
                    self._bind(binding, name, arr)
            count = (P or "dynamic") if graph == self.graph else (graph, P or "dynamic")
            done = self.calls.get(count, 0)
            options = (None if P is None else self._queued_options if key in self._graphed and done >= _CAPTURE_RUNS
                       else self._run_options)
            t0 = time.perf_counter()
            try:
                session.run_with_iobinding(binding, options)
            except Exception as exc:  # onnxruntime raises its own exception types
                raise BackendError(f"{graph}: onnxruntime run failed ({str(exc)[:300]})") from None
            self.queued_at = time.perf_counter()
            self.launch_s[count] = self.launch_s.get(count, 0.0) + self.queued_at - t0
            self.calls[count] = done + 1
            if not in_place:  # (an in-place graph has written its new KV behind each row's entries itself)
                self._scatter(new, B, T, dev_ins if P is not None else None)
            self.scratch += T
            event = None
            if P is not None and xp is not np:  # outputs to the host behind the call, then its event
                stream = xp.cuda.get_current_stream()  # self.stream, entered above
                xp.cuda.runtime.memcpyAsync(out_host.ctypes.data, out_blob.data.ptr, out_blob.nbytes,
                                            xp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
                event = xp.cuda.Event(block=False, disable_timing=True)
                event.record(stream)
            pending = Pending(self, out_blob, outs, T, per_token, out_host if event else None, event)
            if P is not None:
                self._unread[key] = pending
            return pending

    def _scatter(self, new, B: int, T: int, dev_ins: dict | None) -> None:
        """One scatter writes every row's new KV behind its committed and scratch entries, all layers at once.
        dev_ins: a bucket's device inputs, whose packed upload carried the scatter indices."""
        xp, start = self.xp, self.lengths + self.scratch
        if B == 1:
            n = int(start[0])
            self.cache[:, :, 0, :, n:n + T] = new[:, :, 0, :, :T]
            return
        if dev_ins is not None:
            rows, pos = dev_ins[_KV_ROWS][:, :T], dev_ins[_KV_POS][:, :T]
        else:  # a dynamic call sends them now
            rows = xp.asarray(np.repeat(np.arange(B), T).reshape(B, T))
            pos = xp.asarray(start[:, None] + np.arange(T))
        self.cache[:, :, rows, :, pos] = new[..., :T, :].transpose(2, 4, 0, 1, 3, 5)

    def commit(self, select: list) -> None:
        """Keep each row's selected scratch entries (one gather and one scatter for the whole batch)."""
        counts = [len(idx) for idx in select]
        M = max(counts, default=0)
        if M:
            S = self.spec.max_len
            with self._guard, self.stream:
                if self.batch == 1:
                    n, idx = int(self.lengths[0]), np.asarray(select[0], dtype=np.int64)
                    if not np.array_equal(idx, np.arange(M)):  # the accepted path is not already in place
                        src = self.xp.asarray(n + idx)
                        self.cache[:, :, 0, :, n:n + M] = self.cache[:, :, 0][..., src, :]
                elif not all(len(idx) == 0 or idx[-1] == len(idx) - 1 for idx in select):  # else all in place
                    # (a selection is ascending, so it is the prefix 0..m-1 exactly when it ends at m-1)
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

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts (buffers, bindings and graphs are kept)."""
        self.lengths[:] = 0
        self.scratch = 0
