"""KV cache resident on the engine's device, engines bound by address (a backend with IO binding).

One buffer (layers, key|value, batch, kv_heads, max_len, head_dim) holds the cache; each layer's past is a
contiguous slice of it, bound in place, so no cache ever crosses the bus. Engines write the new tokens' KV
into a bound output buffer; one scatter moves them behind each row's committed entries, and `commit`
gathers a round's accepted path on the device. Only logits and hidden states are read back. In-place graphs
(target_gqa, draft_chain_gqa) have the cache bound as their KV output too and write the new KV themselves;
`buckets.route` gives them the calls they compute exactly, the standard graphs the rest. The same code runs
with numpy on CPU (tests) and cupy on CUDA.

With `static=True` every call runs on a fixed-shape bucket session (`buckets`), which on CUDA replays a CUDA
graph captured for this cache; calls longer than the largest bucket run on the dynamic session. Sessions are
shared by every cache of the same batch size; they share one device copy of the weights (backends/weights.py).
`launch` queues a call and returns a `Pending`; `take` copies another call's device output into this call's
inputs on the device, so a fused chain round (draft chain, then verify) waits for the device once.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..backends.base import cast_feeds, check_feeds, numpy_dtype
from ..errors import BackendError
from ..manifest import IN_PLACE
from ..trace import EngineCall
from . import buckets
from .buckets import KV_POS, KV_ROWS, Bound, Pending, Ready, fill_inputs, packed, route
from .host import CacheSpec, attention_mask, take_on_host

_GRAPH_IDS = itertools.count(1)  # ONNX Runtime's CUDA-graph annotation ids (0 is reserved), one per cache and bucket
_CACHE_IDS = itertools.count(1)
_CAPTURE_RUNS = 2  # runs of a bucket before its CUDA graph replays: one outside any graph, one capture
# A bucket's first run goes outside any graph (annotation -1), so what ONNX Runtime does once per shape (arena
# growth, GEMM tuning) never lands inside a capture: its CUDA provider counts warm-up runs per session, not per
# graph, so in a session that holds several graphs (graph_sessions="per_graph") a new bucket's first run would
# otherwise be its capture.
_OUTSIDE_GRAPHS = -1


class _RunOptions(NamedTuple):
    """A bucket's run options, each with the bucket's own graph id (see OrtBackend.run_options)."""

    warmup: object  # outside any CUDA graph
    capture: object  # the capture, or a run of a session without graphs
    replay: object  # queued: returns before the run ends
    release: object  # without a graph, handing the shared arena back after it: a prompt's prefill, a request's widest


@dataclass
class _Bucket:
    """A (graph, bucket) call's state in one cache: made on its first call, kept for the cache's life."""

    bound: Bound  # buffers and binding (a CUDA graph is tied to the addresses it was captured with)
    options: _RunOptions
    how: str  # graph (its session captures and replays a CUDA graph) | plain | outside (see OrtBackend.bucket_session)
    dims: dict  # the bucket's dimensions (batch, seq and the cache's length)
    runs: int = 0  # runs so far: the graph replays after _CAPTURE_RUNS
    unread: Pending | None = None  # its last call, until the next call of this bucket waits for its input copy


def array_module(device: str):
    """(array module, pointer-of) for 'cpu' (numpy) or 'cuda' (cupy)."""
    if device == "cpu":
        return np, (lambda a: a.ctypes.data)
    try:
        import cupy
    except ImportError:
        raise BackendError("cupy: not installed | device='cuda' keeps the KV cache on the GPU through cupy: "
                           "pip install '.[gpu]' (in the padrec checkout) (cupy-cuda12x, or cupy-cuda13x on CUDA 13)") from None
    return cupy, (lambda a: a.data.ptr)


def device_work(lock, stream) -> contextlib.ExitStack:
    """Enter `lock`, then `stream` (cupy streams are context managers that make themselves current); if the
    stream cannot be entered, the lock is let go."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(lock)
        stack.enter_context(stream)
        return stack.pop_all()


class _Graph:
    """A graph running over this cache: its backend, manifest entry and tensor names."""

    def __init__(self, backend, spec: dict, n_layers: int):
        kv = spec["kv"]
        self.backend, self.spec, self.in_place = backend, spec, kv.get("in_place", False)
        self.kv_names = [(kv["key_input"] % i, kv["value_input"] % i, kv["key_output"] % i, kv["value_output"] % i)
                         for i in range(n_layers)]
        self.kv_inputs = {n for k_in, v_in, _, _ in self.kv_names for n in (k_in, v_in)}
        self.per_token = {name for side in ("inputs", "outputs") for name, t in spec[side].items()
                          if t["shape"][1:2] == ["seq"]}  # tensors with one entry per token (the rest: per row)


class DeviceCache:
    """A KV cache that lives with the engine (the KVCache protocol: launch, forward, commit, discard).

    backend: a backend that binds device buffers (OrtBackend); stream: the cupy stream ONNX Runtime was given
    as its compute stream, so copies, engine runs and cache updates are ordered; lock: serialises the device
    work of every cache sharing the stream (a CUDA-graph capture must not see another thread's work);
    prefill_rows: a prefill into the empty cache of more rows than this runs that many at a time, through windows
    over the cache (RuntimeOptions.prefill_rows); window_buffers: the bound buffers those windows use, which the
    caches of one store share (a dict of its own where none is given)."""

    def __init__(self, backend, graph: str, graph_spec: dict, spec: CacheSpec, batch: int, device: str = "cuda",
                 static: bool = False, stream=None, lock=None, tracer=None, rows_of=None, prefill_rows: int = 8,
                 window_buffers: dict | None = None):
        if not backend.binds_device_buffers:
            raise BackendError(f"{graph}: the {backend.name} backend binds no device buffers | use the host cache")
        self.xp, self._ptr = array_module(device)
        self.device, self.graph, self.spec, self.static, self.tracer = device, graph, spec, static, tracer
        self.prefill_rows = prefill_rows
        self.stream = stream if stream is not None else contextlib.nullcontext()
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self.dtype = numpy_dtype(graph_spec["kv"]["dtype"])
        self._graphs: dict = {}  # graph name -> _Graph
        self._stand_in: dict = {}  # graph -> the attached in-place graph that runs its causal calls
        self._total = np.array(spec.max_len, dtype=np.int32)  # the in-place graphs' host scalar input
        self.attach(graph, backend, graph_spec)
        # rows_of: (cache, first row) makes this cache a window over `batch` rows of that cache's buffer (each
        # layer's rows stay one contiguous block, bound as they are); only the window ending at its last row hands
        # the arena back after a prefill, so a chunked prefill releases it once
        if rows_of is None:
            self.cache, self._releases = self._allocate((spec.n_layers, 2, batch, spec.n_kv_heads, spec.max_len,
                                                         spec.head_dim)), True
            self._shared_buffers = None
        else:
            whole, r0 = rows_of
            self.cache, self._releases = whole.cache[:, :, r0:r0 + batch], r0 + batch == whole.batch
            self._shared_buffers = whole._window_buffers
        self._windows: dict = {}  # first row -> a window of prefill_rows rows over this cache (`_prefill_rows`)
        # the bound buffers those windows share (`_buffers`); every window runs under the device lock, so the
        # caches of one store can share one set (a batch-64 cache's windows reuse a batch-32 cache's)
        self._window_buffers: dict = {} if window_buffers is None else window_buffers
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.scratch = 0
        self._buckets: dict = {}  # (graph, bucket) -> _Bucket
        self.cache_id = next(_CACHE_IDS)
        self._memo: dict = {}  # what device-side helpers keep per cache (DeviceRounds' tables and staging)
        # set last: CPython drops an object's attributes in the order they were set, so the bindings above
        # are released before the stream they were bound on
        self._stream_owner = self.stream

    def _allocate(self, shape):
        try:
            with self.work():
                return self.xp.zeros(shape, dtype=self.dtype)
        except Exception as exc:  # numpy MemoryError or cupy OutOfMemoryError
            if not isinstance(exc, MemoryError) and "OutOfMemory" not in type(exc).__name__:
                raise
            nbytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
            raise BackendError(f"kv cache: out of {self.device} memory allocating {nbytes / 2**20:.0f} MiB for batch "
                               f"{shape[2]} x {shape[4]} positions | lower the batch or max_seq_len") from None

    def work(self):
        """The context for device work on this cache: its lock, then its stream."""
        return device_work(self._lock, self.stream)

    def memo(self, key, make):
        """A value kept with this cache, made once by make() under `work()` (device tables, staging buffers)."""
        if key not in self._memo:
            with self.work():
                self._memo[key] = make()
        return self._memo[key]

    def packed(self, specs: dict, host: bool):
        return packed(self.xp, specs, host)

    def buffer_bytes(self, seen: set | None = None) -> dict:
        """Device bytes of this cache's bound buffers by kind (new_kv, outputs, inputs, rounds: DeviceRounds' tables),
        its prefill windows' included, the KV cache not; each buffer counted once across calls sharing `seen`."""
        seen = set() if seen is None else seen
        kinds: dict = {}

        def add(kind, arr):
            if arr is not None and hasattr(arr, "nbytes") and id(arr) not in seen:
                seen.add(id(arr))
                kinds[kind] = kinds.get(kind, 0) + int(arr.nbytes)
        bound = [b.bound for c in (self, *self._windows.values()) for b in c._buckets.values()]
        windows = list(self._window_buffers.values()) if self._windows else []
        for new, outs, ins in [(b.new, b.outs, b.ins) for b in bound] + windows:
            add("new_kv", new)
            add("outputs", outs.blob)
            add("inputs", ins.blob if ins is not None else None)
        for memo in self._memo.values():
            for value in (vars(memo).values() if hasattr(memo, "__dict__") else [memo]):
                add("rounds", value)
        return kinds

    def attach(self, graph: str, backend, graph_spec: dict) -> None:
        """Let `launch(..., graph=graph)` run another graph over this cache (same KV layout), e.g. the fused
        draft chain next to the draft."""
        kv = graph_spec["kv"]
        if kv["n_layers"] != self.spec.n_layers or numpy_dtype(kv["dtype"]) != self.dtype:
            raise BackendError(f"{graph}: KV layout differs from {self.graph}'s | re-export the engines together")
        if kv.get("in_place"):  # runs the causal calls of the graph it stands in for
            if kv.get("max_len") != self.spec.max_len:
                raise BackendError(f"{graph}: cache of {kv.get('max_len')} positions | {self.graph}'s holds "
                                   f"{self.spec.max_len} | re-export the engines together")
            self._stand_in[IN_PLACE[graph]] = graph
        self._graphs[graph] = _Graph(backend, graph_spec, self.spec.n_layers)

    @property
    def chain_steps(self) -> int:
        """K of an attached fused draft-chain graph (0 without one)."""
        return self._graphs["draft_chain"].spec["chain_steps"] if "draft_chain" in self._graphs else 0

    @property
    def queues_on_device(self) -> bool:
        """Capability: calls can be queued with inputs written on the device (static buckets only)."""
        return self.static

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def empty(self) -> bool:
        """No entry kept or pending: the next call is a prompt's prefill."""
        return self.scratch == 0 and not self.lengths.any()

    def _route(self, graph: str, feeds: dict, new_mask, P: int, take) -> str:
        fused = self._stand_in.get(graph)
        ok = route(fused, self._graphs[fused].spec if fused else None, self.lengths, self.scratch,
                   self.spec.max_len, feeds, new_mask, P, take)
        return fused if ok else graph

    def _bind(self, name: str, session, T: int, bucket_inputs: bool, buffers: tuple | None = None) -> Bound:
        """A binding for T new tokens with the cache, new-KV and output buffers (and, for a bucket, the
        input buffers) bound. Inputs and outputs each live in one packed buffer: one copy each way.
        buffers: (new KV, outputs, inputs) to bind instead of the bucket's own (another session over them)."""
        g, be = self._graphs[name], self._graphs[name].backend
        binding = be.new_binding(session)
        new, outs, ins = buffers or self._buffers(name, T, bucket_inputs)
        out_kv = self.cache if g.in_place else new
        for i, (k_in, v_in, k_out, v_out) in enumerate(g.kv_names):
            for tensor, arr, output in ((k_in, self.cache[i, 0], False), (v_in, self.cache[i, 1], False),
                                        (k_out, out_kv[i, 0], True), (v_out, out_kv[i, 1], True)):
                be.bind(binding, tensor, arr, self.device, self._ptr(arr), output)
        if "total_sequence_length" in g.spec["inputs"]:
            be.bind_host_scalar(binding, "total_sequence_length", self._total)
        for n, arr in outs.views.items():
            be.bind(binding, n, arr, self.device, self._ptr(arr), output=True)
        for n, arr in (ins.views.items() if ins is not None else ()):
            if n not in (KV_ROWS, KV_POS):
                be.bind(binding, n, arr, self.device, self._ptr(arr))
        return Bound(binding, session, new, outs, ins)

    def _buffers(self, name: str, T: int, bucket_inputs: bool) -> tuple:
        """(new KV or None, outputs, inputs or None) of a binding. The row windows of one cache share one set per
        bucket: they run one after another, each read before the next (`_prefill_rows`), so a batch-64 prefill holds
        batch 8's buffers once, not eight times."""
        shared = self._shared_buffers if bucket_inputs else None  # a dynamic call's buffers live for that call only
        if shared is not None and (name, T) in shared:
            return shared[(name, T)]
        g, xp, B, S = self._graphs[name], self.xp, self.batch, self.spec.max_len
        dims = {"batch": B, "seq": T, "past": S, "past_plus_seq": S + T}
        extra = g.spec.get("chain_steps", 1) - 1  # a chain graph also returns its draft steps' KV (not kept)
        new = None if g.in_place else xp.empty(
            (self.spec.n_layers, 2, B, self.spec.n_kv_heads, T + extra, self.spec.head_dim), dtype=self.dtype)

        def shapes(side, skip=()):
            return {n: (tuple(dims.get(d, d) for d in t["shape"]), numpy_dtype(t["dtype"]))
                    for n, t in g.spec[side].items() if n not in skip}
        outs = self.packed(shapes("outputs"), host=bucket_inputs)  # a bucket's: a pinned copy too
        ins = None
        if bucket_inputs:
            specs = shapes("inputs", g.kv_inputs | {"total_sequence_length"})
            specs[KV_ROWS] = specs[KV_POS] = ((B, T), np.int64)  # where the new KV goes: up with the feeds
            ins = self.packed(specs, host=True)
            ins.host[KV_ROWS][...] = np.arange(B)[:, None]
        if shared is not None:
            shared[(name, T)] = (new, outs, ins)
        return new, outs, ins

    def _check(self, name: str, feeds: dict, mask, B: int) -> dict:
        """Feeds cast to the graph's precision and checked against the manifest (each new shape)."""
        g, S = self._graphs[name], self.spec.max_len
        feeds = cast_feeds(g.spec, feeds)
        probe = dict(feeds, total_sequence_length=self._total) if g.in_place else dict(feeds, attention_mask=mask)
        for k_in, v_in, _, _ in g.kv_names:
            probe[k_in] = probe[v_in] = np.empty((B, self.spec.n_kv_heads, S, self.spec.head_dim), self.dtype)
        check_feeds(name, g.spec, probe)
        return feeds

    def _bucket_call(self, name: str, feeds: dict, mask, T: int, P: int, take, fill) -> Bound:
        """Upload a bucket call's inputs (one copy), then `take`'s device copies and `fill`, in stream order."""
        key, g = (name, P), self._graphs[name]
        if key not in self._buckets:
            self._buckets[key] = self._new_bucket(name, P)
        bucket = self._buckets[key]
        if bucket.unread is not None:  # its input copy may still be queued: wait before the host buffer changes
            bucket.unread.result()
            bucket.unread = None
        bound = bucket.bound
        ins = bound.ins
        fill_inputs(ins.host, feeds, mask, T, P, g.per_token, self.spec.max_len)
        if not g.in_place:  # where `_scatter` puts the new KV
            ins.host[KV_POS][...] = (self.lengths + self.scratch)[:, None] + np.arange(P)
        if self.xp is not np:
            ins.blob.set(ins.host_blob)
        for n, (src, out, col) in (take or {}).items():  # device to device, in stream order
            dst = ins.views[n]
            got = (src if out is None else src.device(out)).astype(dst.dtype, copy=False)
            if dst.ndim == 1:  # one value per row
                dst[...] = got
            else:
                dst[:, col:col + got.shape[1]] = got
        if fill is not None:
            fill(ins.views)
        return bound

    def _new_bucket(self, name: str, P: int) -> _Bucket:
        """A bucket's session (shared by the caches of this batch size), buffers and run options."""
        g, B, S = self._graphs[name], self.batch, self.spec.max_len
        dims = ({"batch": B, "seq": P, "max_seq_len": S} if g.in_place else
                {"batch": B, "seq": P, "past": S, "past_plus_seq": S + P})
        session, how = g.backend.bucket_session(dims)
        # a graph is tied to the buffers it was captured with, so each cache's bucket has an id of its own
        graph_id, run_options = next(_GRAPH_IDS), g.backend.run_options
        options = _RunOptions(run_options(_OUTSIDE_GRAPHS, queued=False), run_options(graph_id, queued=False),
                              run_options(graph_id, queued=self.device != "cpu"),
                              run_options(graph_id, queued=False, release=True))
        return _Bucket(self._bind(name, session, P, bucket_inputs=True), options, how, dims)

    def _dynamic_call(self, name: str, feeds: dict, mask, T: int) -> Bound:
        """Buffers for one call of any length (prompt lengths vary without bound), its inputs bound as they are."""
        g = self._graphs[name]
        bound = self._bind(name, g.backend.session, T, bucket_inputs=False)
        keep = bound.keep = {n: self.xp.asarray(a) for n, a in (feeds if g.in_place else
                                                                dict(feeds, attention_mask=mask)).items()}
        for n, arr in keep.items():
            g.backend.bind(bound.binding, n, arr, self.device, self._ptr(arr))
        return bound

    def launch(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None, take: dict | None = None,
               fill=None) -> Pending:
        """Queue T new tokens through this cache's graph (or an attached one); their KV becomes scratch entries.
        take: {input: (Pending, output, first column)} copies another call's device output into this call's
        input columns on the device; (device array, None, first column) copies that array (a per-row input
        takes it whole). On the dynamic path (no bound input buffers) the host waits for those values instead.
        fill(device inputs): writes inputs on the device after the upload and `take` (static buckets only)."""
        B, T = feeds["input_ids"].shape
        if B != self.batch or new_mask.shape[0] != B:
            raise BackendError(f"{graph or self.graph}: a call of {B} rows (mask: {new_mask.shape[0]}) on a cache of "
                               f"{self.batch} | use a cache of the request's batch size")
        if B > self.prefill_rows and self.empty and take is None and fill is None:
            return self._prefill_rows(feeds, new_mask, graph)
        P = buckets.bucket(T) if self.static else None
        name = self._route(graph or self.graph, feeds, new_mask, P or T, take)
        g = self._graphs[name]
        # the engine mask (which also refuses an overflowing cache); an in-place call has none, and routing
        # made sure of its room
        S = self.spec.max_len
        mask = None if g.in_place else attention_mask(self.lengths, self.scratch, new_mask, S, S)
        if g.in_place:  # causal over each row's cache: its length after this call says where the tokens go
            feeds = {n: a for n, a in feeds.items() if n in g.spec["inputs"]}
            feeds["seqlens_k"] = (self.lengths + (P or T) - 1).astype(np.int32)
        if fill is not None and P is None:
            raise BackendError(f"{name}: device-written inputs need a static bucket | T={T} is above the largest "
                               f"({buckets.BUCKETS[-1]}); use static shapes and a shorter call")
        if take and P is None:
            feeds, take = take_on_host(feeds, take), None
        if P is None or (name, P) not in self._buckets:  # a bucket's later calls cast while copying in
            feeds = self._check(name, feeds, mask, B)
        with self.work():
            bound = (self._bucket_call(name, feeds, mask, T, P, take, fill) if P is not None
                     else self._dynamic_call(name, feeds, mask, T))
            return self._run(name, bound, T, P, fill is not None)

    def _prefill_rows(self, feeds: dict, new_mask: np.ndarray, graph: str | None) -> Ready:
        """A prefill of more than prefill_rows rows, that many at a time, each through a window over those rows.
        The last window ends at the last row, so where the batch is not a multiple it overlaps the one before:
        those rows run twice on the same inputs, and the later run's KV and outputs are the ones kept."""
        B, T, R = *new_mask.shape[:2], self.prefill_rows
        starts = [*range(0, B - R, R), B - R]
        parts = []
        with self._lock:  # the windows' buffers may be another cache's too: no other cache's window in between
            for r0 in starts:
                if r0 not in self._windows:
                    self._windows[r0] = self._window(r0)
                window = self._windows[r0]
                window.reset()
                rows = slice(r0, r0 + R)
                part = {n: (a[rows] if np.ndim(a) and len(a) == B else a) for n, a in feeds.items()}
                parts.append((rows, window.launch(part, new_mask[rows], graph).result()))
        self.scratch += T
        outs = {n: np.empty((B, *a.shape[1:]), a.dtype) for n, a in parts[0][1].items()}
        for rows, got in parts:  # in order: an overlapped row keeps the later window's outputs
            for n, a in got.items():
                outs[n][rows] = a
        return Ready(self.xp, outs, (self._lock, self.stream))

    def _window(self, r0: int) -> "DeviceCache":
        first = self._graphs[self.graph]
        window = DeviceCache(first.backend, self.graph, first.spec, self.spec, self.prefill_rows, self.device,
                             self.static, self._stream_owner, self._lock, self.tracer, rows_of=(self, r0),
                             prefill_rows=self.prefill_rows)
        for name, g in self._graphs.items():
            if name != self.graph:
                window.attach(name, g.backend, g.spec)
        return window

    def _run(self, name: str, bound: Bound, T: int, P: int | None, queued: bool) -> Pending:
        """Run a bound call, scatter its new KV, queue its outputs' way back; returns the Pending."""
        g, xp = self._graphs[name], self.xp
        bucket = self._buckets.get((name, P)) if P is not None else None  # None: a dynamic call
        options = None
        if bucket is not None and bucket.how == "graph":
            options = (bucket.options.warmup, bucket.options.capture, bucket.options.replay)[
                min(bucket.runs, _CAPTURE_RUNS)]
        elif bucket is not None and bucket.how == "outside":  # in a graphed session: its arena is never shrunk
            options = bucket.options.warmup  # (its graphs replay into memory the arena counts as free)
        elif bucket is not None:  # on the shared arena: a prompt's prefill (the call into the empty cache) releases it
            options = bucket.options.release if self._releases and self.empty else bucket.options.capture
        if bucket is not None and bucket.how != "plain" and bucket.runs == 0 and g.backend.tunes_apart:
            self._tune_apart(name, bucket, P)
        t0 = time.perf_counter()
        g.backend.run_bound(name, bound.session, bound.binding, options)
        returned = time.perf_counter()
        if bucket is not None:
            bucket.runs += 1
        if not g.in_place:  # (an in-place graph has written its new KV behind each row's entries itself)
            self._scatter(bound.new, T, bound.ins.views if P is not None else None)
        self.scratch += T
        event = None
        if P is not None and xp is not np:  # outputs to the host behind the call, then its event
            stream = xp.cuda.get_current_stream()  # self.stream, entered by the caller
            xp.cuda.runtime.memcpyAsync(bound.outs.host_blob.ctypes.data, bound.outs.blob.data.ptr,
                                        bound.outs.blob.nbytes, xp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
            event = xp.cuda.Event(block=False, disable_timing=True)
            event.record(stream)
        pending = Pending((self._lock, self.stream), xp, bound.outs, T, g.per_token,
                          bound.outs.host_blob if event else None, event)
        if bucket is not None:
            bucket.unread = pending
        if self.tracer is not None:
            self.tracer.engine_call(EngineCall(self.graph, name, self.batch, T, P, queued, returned - t0, returned,
                                               bound.ins.views if P is not None else None))
        return pending

    def _tune_apart(self, name: str, bucket: "_Bucket", P: int) -> None:
        """Run the first call of a bucket in a CUDA-graph session (captured, or outside any graph) once in a
        throwaway twin of the session, then drop the twin: ONNX Runtime's GEMM tuning (process-wide results) reads
        an L2-eviction scratch of twice the card's L2 from the arena of the session that tunes, and a graph
        session's arena never shrinks; tuned here, the bucket's own first run finds the results and its arena holds
        only its activations. The call is repeated, not changed: the same inputs write the same outputs and KV. A
        twin that cannot be made costs the saving, not the request (noted in graph_notes)."""
        g, b = self._graphs[name], bucket.bound
        try:
            twin = g.backend.tuning_twin(b.session, bucket.dims)
        except BackendError as exc:
            g.backend.graph_notes.append(f"{bucket.dims}: no tuning twin, tuned in its own session ({exc})")
            return
        if twin is None:
            return
        twin_bound = self._bind(name, twin, P, bucket_inputs=True, buffers=(b.new, b.outs, b.ins))
        g.backend.run_bound(name, twin, twin_bound.binding, g.backend.run_options(_OUTSIDE_GRAPHS, queued=False))

    def forward(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None) -> dict:
        """`launch`, then wait for the outputs."""
        return self.launch(feeds, new_mask, graph).result()

    def _scatter(self, new, T: int, dev_ins: dict | None) -> None:
        """One scatter writes every row's new KV behind its committed and scratch entries, all layers at once.
        dev_ins: a bucket's device inputs, whose packed upload carried the scatter indices."""
        xp, start, B = self.xp, self.lengths + self.scratch, self.batch
        if B == 1:
            n = int(start[0])
            self.cache[:, :, 0, :, n:n + T] = new[:, :, 0, :, :T]
            return
        if dev_ins is not None:
            rows, pos = dev_ins[KV_ROWS][:, :T], dev_ins[KV_POS][:, :T]
        else:  # a dynamic call sends them now
            rows = xp.asarray(np.repeat(np.arange(B), T).reshape(B, T))
            pos = xp.asarray(start[:, None] + np.arange(T))
        self.cache[:, :, rows, :, pos] = new[..., :T, :].transpose(2, 4, 0, 1, 3, 5)

    def commit(self, select: list) -> None:
        """Keep each row's selected scratch entries (one gather and one scatter for the whole batch)."""
        counts = [len(idx) for idx in select]
        if max(counts, default=0):
            with self.work():
                self._gather(select, counts)
            self.lengths += np.asarray(counts, dtype=np.int64)
        self.scratch = 0

    def _gather(self, select: list, counts: list) -> None:
        M, S, xp = max(counts), self.spec.max_len, self.xp
        if self.batch == 1:
            n, idx = int(self.lengths[0]), np.asarray(select[0], dtype=np.int64)
            if not np.array_equal(idx, np.arange(M)):  # the accepted path is not already in place
                self.cache[:, :, 0, :, n:n + M] = self.cache[:, :, 0][..., xp.asarray(n + idx), :]
            return
        # a selection is ascending, so it is the prefix 0..m-1 (already in place) exactly when it ends at m-1
        if all(len(idx) == 0 or idx[-1] == len(idx) - 1 for idx in select):
            return
        src = np.empty((self.batch, M), dtype=np.int64)
        dst = np.empty((self.batch, M), dtype=np.int64)
        for b, idx in enumerate(select):
            n, m = int(self.lengths[b]), counts[b]
            src[b, :m] = n + np.asarray(idx, dtype=np.int64)
            dst[b, :m] = n + np.arange(m)
            src[b, m:] = dst[b, m:] = min(n + m, S - 1)  # padding copies an entry onto itself
        rows = xp.asarray(np.repeat(np.arange(self.batch), M).reshape(self.batch, M))
        values = self.cache[:, :, rows, :, xp.asarray(src)]
        self.cache[:, :, rows, :, xp.asarray(dst)] = values

    def discard(self) -> None:
        self.scratch = 0

    def reset(self) -> None:
        """Empty the cache for a new batch of prompts (buffers, bindings and graphs are kept)."""
        self.lengths[:] = 0
        self.scratch = 0
