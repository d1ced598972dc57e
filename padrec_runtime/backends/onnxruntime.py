"""ONNX Runtime backend: one InferenceSession per graph, feeds checked against the manifest before each run."""
from __future__ import annotations

import os
import threading
import weakref
from pathlib import PurePosixPath

from ..errors import BackendError, ManifestError
from ..manifest import Manifest
from .base import check_feeds, graph_names
from .weights import WeightPool, check_graph

# ONNX Runtime (>= 1.31; older ones ignore the entry) can time, per MatMul shape, cuBLAS against its small-M GEMV
# kernels on a session's first run of the shape and keep the fastest: on an H100 the fused 0.5B target's 1-token
# step 1.19 -> 1.16 ms and its 8-token verify 1.37 -> 1.31 ms (tools/gpu_step_profile.py,
# benchmarks/results/step_profile_h100.json). Its timed trials evict L2 by reading a scratch of twice the card's L2
# (100 MB on an H100) from the tuning session's arena, which a graphed session keeps for good (its arena never
# shrinks): RuntimeOptions.gemm_tuning says where tuning runs - "session" (each session), "apart" (a graphed bucket
# first in a throwaway twin of its session, DeviceCache._tune_apart: the results are kept per process, the scratch
# goes with the twin) or "off" (cuBLAS only). The setting decides over ONNX Runtime's ORT_CUDA_GEMM_AUTO_TUNE.
GEMM_TUNE_ENTRY = "ep.cuda.enable_gemm_auto_tune"
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


def _kv_shapes(kv: dict) -> dict:
    """The KV tensors' shapes as the manifest implies them: (batch, n_kv_heads, positions, head_dim)."""
    shape = {"shape": ["batch", kv["n_kv_heads"], "past", kv["head_dim"]]}
    return {kv[f"{part}_{side}"] % i: shape for i in range(kv["n_layers"]) for part in ("key", "value")
            for side in ("input", "output")}


# CUDA sessions without a CUDA graph allocate from one arena registered with ONNX Runtime's environment (a static
# session kept ~214 MB with an arena of its own, ~78 MB with the shared one; 0.5B-shaped target, H200). A session
# that replays a graph keeps its own: the replay writes to the addresses it captured, which a shared arena hands on
# to other sessions once the capturing run has freed them (seen as NaN logits on a trained 0.5B pair).
SHARED_ARENA = "session.use_env_allocators"
# A prefill run on the shared arena hands the arena's free memory back to the device when it ends: at LLM sizes a
# batch-64 prefill's activations are GBs, and an arena never shrinks on its own, so every prefill shape served would
# otherwise keep its peak for the process's life. Its cost, a cudaMalloc and cudaFree of those activations, falls
# once per request, on a run that syncs anyway (decode-sized runs never ask: they would pay it every round).
ARENA_SHRINK, ARENA_SHRINK_CUDA = "memory.enable_memory_arena_shrinkage", "gpu:0"
RUN_FAILED_FIX = " | check the engines with `padrec parity` (re-export them if it fails), and the card's free memory"
SHRINK_REFUSED = "memory arena shrink list"  # ONNX Runtime's refusal: no arena of that device to shrink
_arena_registered = False
CACHE_DIMS = ("past", "max_seq_len")  # a bucket's dimensions that every call of a cache shares: its length
_arena_lock = threading.Lock()


# cuBLAS gives each handle a workspace (32 MiB a handle on Hopper, and every CUDA session makes its own handles):
# capped to 4 MiB, the sessions of a 1.5B pair (graph max 16) held 0.25 GB less at batch 1 and 0.5 GB less from
# batch 8 (H100, benchmarks/results/gpu_memory_levers_h100.json). cuBLAS reads the variable when it makes a handle,
# so the cap holds for handles made after it is set.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"


_cublas_capped: str | None = None  # the value cap_cublas_workspace set, if it set one


def cap_cublas_workspace(mib: int) -> None:
    """Set cuBLAS's workspace to one buffer of `mib` MiB a handle for this process, unless its environment asks
    for another (then raise: the caller's setting and the process's would disagree)."""
    global _cublas_capped
    want, have = f":{mib * 1024}:1", os.environ.get(CUBLAS_WORKSPACE_ENV)
    if have is not None and have != want:
        whose = ("an earlier Recommender of this process set" if have == _cublas_capped else "the environment sets")
        raise BackendError(f"cublas_workspace_mib={mib}: {whose} {CUBLAS_WORKSPACE_ENV}={have}, which holds for the "
                           f"whole process | give every Recommender the same cublas_workspace_mib "
                           f"(--cublas-workspace-mib), or unset the variable before the process starts")
    os.environ[CUBLAS_WORKSPACE_ENV] = _cublas_capped = want


def share_cuda_arena(ort) -> None:
    """Register the process's shared CUDA arena with ONNX Runtime (once; its sessions opt in, see _options)."""
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator_v2("CUDAExecutionProvider", info, {},
                                             ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
        _arena_registered = True


def require_cuda() -> None:
    """Raise, naming the fix, unless ONNX Runtime can run on a GPU here (onnxruntime-gpu and a visible GPU):
    checked before anything else of the CUDA path is set up, so a machine without a GPU hears that."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime: not installed | pip install '.[gpu]' (in the padrec checkout) for device='cuda'") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError("device='cuda': ONNX Runtime has no CUDAExecutionProvider here (no GPU, or the CPU-only "
                           "onnxruntime package) | install onnxruntime-gpu matching your CUDA on a GPU machine "
                           "(pip install '.[gpu]' (in the padrec checkout)), or use device='cpu'")


class OrtBackend:
    """Runs one graph of an engine directory with ONNX Runtime on CPU or CUDA."""

    name = "onnxruntime"
    binds_device_buffers = True  # capability: IO binding of caller-owned buffers (device KV caches)

    def __init__(self, manifest: Manifest, graph: str, device: str = "cpu", threads: int | None = 1,
                 cuda_graphs: bool = False, stream: int | None = None, weights: WeightPool | None = None,
                 graph_max_tokens: int | None = None, graph_sessions: str = "per_shape", static: bool = False,
                 gemm_tuning: str = "session"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime: not installed | pip install '.[runtime]' (in the padrec checkout) "
                               "(or 'padrec[gpu]' for CUDA)") from None
        self._ort = ort
        self.graph_name, self.spec = graph, manifest.graph(graph)
        self._expected = graph_names(self.spec)[0]
        # stream: a CUDA stream pointer, or an object with `.ptr` (a cupy Stream) that this backend keeps alive
        # for as long as its sessions, which synchronise and free buffers through it (see the end of __init__)
        self.device, self.threads, self.cuda_graphs = device, threads, cuda_graphs
        self.graph_max_tokens, self.graph_sessions, self.gemm_tuning = graph_max_tokens, graph_sessions, gemm_tuning
        self.stream = getattr(stream, "ptr", stream)
        if device == "cuda":
            require_cuda()
        elif device != "cpu":
            raise BackendError(f"onnxruntime device: got {device!r} | expected cpu or cuda")
        elif manifest.data.get("precision") == "bf16":  # its CPU kernels lack bf16 for ops every graph has (Tile)
            raise BackendError(f"{graph}: bf16 engines on the CPU | ONNX Runtime runs bf16 graphs on CUDA only | use "
                               "device='cuda' (onnxruntime-gpu), or export fp32 / fp16 engines for the CPU")
        # every session is made from these bytes, the ones whose sha256 matched (never from the path, which
        # could be swapped between the check and a later bucket's session), read once and kept: ONNX Runtime
        # reads the external data files from memory (a model given as bytes has no directory to read them from)
        self.path = manifest.root / self.spec["file"]
        self._model = manifest.read(self.spec["file"])
        self._external = {f: manifest.read(f, mutable=True) for f in self.spec.get("external_data", [])}
        # the listed weights come from one device copy shared by all sessions (backends/weights.py)
        self.weights = weights if weights is not None else WeightPool(device)
        check_graph(graph, self.spec, self._model)
        self.supplied = self.weights.supply(graph, self.spec, self._external)
        self._static: dict = {}
        self._graphed: set = set()  # keys of static sessions that capture and replay a CUDA graph
        self._graphed_dims: dict = {}  # id of a session made with a CUDA graph -> its fixed dimensions
        self._tuned: set = set()  # the call dims a tuning twin has run (gemm_tuning="apart")
        self._graph_session = None  # graph_sessions="per_graph": the one session whose CUDA graphs every bucket shares
        self.graph_notes: list = []  # why a static session runs without a CUDA graph, if one does
        self.shrinks_arena = True  # prefill runs release the shared arena (until ONNX Runtime refuses: run_bound)
        self._session_lock = threading.Lock()
        self._session = self._open()
        self._check_graph()
        if static:  # calls run on bucket sessions: the dynamic one, checked, goes until a call past every bucket
            self._session = None  # needs it (on CUDA each session holds ~75 MB of cuBLAS / cuDNN state at 7B)
        self._stream_owner = stream  # set last: when the backend goes, its sessions go before the stream

    @property
    def session(self):
        """The dynamic-shape session (made again on first use where `static` let it go)."""
        with self._session_lock:
            if self._session is None:
                self._session = self._open()
            return self._session

    @property
    def tunes_apart(self) -> bool:
        """Whether the first call of a bucket in a CUDA-graph session runs once in a throwaway twin of the session
        first (DeviceCache._tune_apart): gemm_tuning="apart", on CUDA with graphs."""
        return self.device == "cuda" and self.cuda_graphs and self.gemm_tuning == "apart"

    def tuning_twin(self, session, call: dict):
        """A new session made as `session` was (the same fixed dimensions, a CUDA graph), for one run of a call of
        dims `call` outside any graph, whose GEMM tuning leaves its scratch in the twin's arena, which goes with
        the twin. None where no twin is needed: a call of these dims was tuned before (ONNX Runtime keeps the results
        per process: another cache's bucket, a prefill window), or `session` was not made with a graph."""
        dims, key = self._graphed_dims.get(id(session)), tuple(sorted(call.items()))
        if dims is None or key in self._tuned:
            return None
        self._tuned.add(key)
        return self._open(dims, cuda_graph=True)

    def _open(self, dims: dict | None = None, cuda_graph: bool = False):
        """A session over the graph; `dims` fixes its symbolic dimensions (a static-shape session)."""
        session = self._make(dims, cuda_graph)
        if cuda_graph:
            self._graphed_dims[id(session)] = dict(dims or {})
            weakref.finalize(session, self._graphed_dims.pop, id(session), None)
        return session

    def _make(self, dims: dict | None, cuda_graph: bool):
        opts, providers = self._options(dims, cuda_graph)
        if self.device == "cuda":
            share_cuda_arena(self._ort)
        if self._external:
            names = [PurePosixPath(f).name for f in self._external]  # as the graph's locations name them
            buffers = list(self._external.values())
            opts.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
        for name, value in self.supplied.items():
            opts.add_initializer(name, value)
        try:
            return self._ort.InferenceSession(self._model, opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            why = f"{type(exc).__name__}: {str(exc)[:300]}" if str(exc) else type(exc).__name__
            raise BackendError(f"{self.path}: onnxruntime cannot make a session of it ({why}) | a file damaged past "
                               "its hash, or a machine out of memory or threads (see RuntimeOptions.threads): "
                               "re-export the engines, or free resources") from None

    def _options(self, dims: dict | None, cuda_graph: bool) -> tuple:
        """The session options and execution providers of a session (see `_open`)."""
        ort = self._ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        for name, size in (dims or {}).items():
            opts.add_free_dimension_override_by_name(name, int(size))
        providers: list = ["CPUExecutionProvider"]
        if self.device == "cuda":
            opts.add_session_config_entry(GEMM_TUNE_ENTRY, "0" if self.gemm_tuning == "off" else "1")
            cuda = {}
            if self.stream is not None:
                cuda["user_compute_stream"] = str(self.stream)
            if cuda_graph:  # a replayed graph reuses its capture-time addresses: its arena must be its own, with
                cuda["enable_cuda_graph"] = "1"  # the default growth (kSameAsRequested measured larger, H200)
            else:
                opts.add_session_config_entry(SHARED_ARENA, "1")  # the arena share_cuda_arena registers
            providers.insert(0, ("CUDAExecutionProvider", cuda))
        return opts, providers

    def bucket_session(self, dims: dict) -> tuple:
        """(session, how it runs) for a bucket call of `dims` (made once); how: "graph" (captures and replays a
        CUDA graph), "plain" (a session without graphs, on the shared arena) or "outside" (in a CUDA-graph session,
        outside any graph).

        per_shape: a session per shape, every dimension fixed, so ONNX Runtime folds the shape arithmetic away and,
        with cuda_graphs, captures the whole graph once per cache. per_graph: one session for every graphed bucket,
        only the cache length fixed, each cache's bucket capturing a graph of its own in it (`run_options`): one
        arena and one set of cuBLAS / cuDNN state for the graph instead of one per shape; buckets without a graph
        (above graph_max_tokens) run on per-shape sessions over the shared arena. single: as per_graph, and the
        buckets without a graph run in that one session too, outside any graph (no session per prefill shape; their
        activations stay in its arena). pair: as per_graph, the buckets without a graph on the graph's one
        dynamic-shape session (no session per prefill shape; their activations go back with the shared arena). A
        graph whose session ONNX Runtime refuses to capture (data crossing between host and device,
        padrec_export.placement; engines exported before that was fixed) keeps a graphed session per shape."""
        graphed = self.wants_graph(dims)
        if self.graph_sessions == "pair" and self.cuda_graphs and not graphed:  # without graphs: as per_graph
            return self.session, "plain"
        shared = self.cuda_graphs and self.device == "cuda" and (
            self.graph_sessions == "single" or (self.graph_sessions in ("per_graph", "pair") and graphed))
        if shared and self._graph_session is None:
            fixed = {k: v for k, v in dims.items() if k in CACHE_DIMS}
            try:
                self._graph_session = self._open(fixed, cuda_graph=True)
            except BackendError as exc:  # refused: a graphed session per shape, as per_shape
                self.graph_notes.append(f"{fixed}: no CUDA graph ({exc})")
                self._graph_session = False
        if shared and self._graph_session:
            return self._graph_session, ("graph" if graphed else "outside")
        return self.static_session(dims), ("graph" if self.replays_graph(dims) else "plain")

    def static_session(self, dims: dict):
        """The session for one fixed shape (made once): every dimension known, so ONNX Runtime folds the shape
        arithmetic away and, on CUDA with cuda_graphs, captures the whole graph once and replays it."""
        key = tuple(sorted(dims.items()))
        if key not in self._static:
            want_graph = self.wants_graph(dims)
            try:
                self._static[key] = self._open(dims, cuda_graph=want_graph)
                if want_graph:
                    self._graphed.add(key)
            except BackendError as exc:
                if not want_graph:
                    raise
                self.graph_notes.append(f"{dict(dims)}: no CUDA graph ({exc})")
                self._static[key] = self._open(dims)
        return self._static[key]

    def wants_graph(self, dims: dict) -> bool:
        """Whether the static session for these dims is to capture a CUDA graph: on CUDA with cuda_graphs, for
        calls of at most graph_max_tokens tokens a row (the others share the CUDA arena instead, see _options)."""
        small = self.graph_max_tokens is None or dims.get("seq", 1) <= self.graph_max_tokens
        return self.cuda_graphs and self.device == "cuda" and small

    def replays_graph(self, dims: dict) -> bool:
        """Whether the static session for these dims replays a CUDA graph."""
        return tuple(sorted(dims.items())) in self._graphed

    def _check_graph(self) -> None:
        expected_in, expected_out = graph_names(self.spec)
        got_in = {i.name: _ORT_TYPES.get(i.type, i.type) for i in self.session.get_inputs()}
        got_out = {o.name: _ORT_TYPES.get(o.type, o.type) for o in self.session.get_outputs()}
        for kind, got, exp in (("inputs", got_in, expected_in), ("outputs", got_out, expected_out)):
            if set(got) != set(exp):
                raise ManifestError(f"{self.graph_name}.onnx {kind}: {sorted(got)} | manifest lists {sorted(exp)} | "
                                    "the graph and manifest come from different exports")
            for name, dtype in exp.items():
                if got[name] != dtype:
                    raise ManifestError(f"graphs.{self.graph_name}.{kind}.{name}.dtype: graph has {got[name]}, "
                                        f"manifest {dtype} | re-export the engines")
        declared = {**self.spec["inputs"], **self.spec["outputs"], **_kv_shapes(self.spec["kv"])}
        for node in (*self.session.get_inputs(), *self.session.get_outputs()):
            want = declared.get(node.name, {}).get("shape")
            if want is None:
                continue
            if isinstance(node.shape, list) and len(node.shape) != len(want):
                raise ManifestError(f"{self.graph_name}.onnx {node.name}: rank {len(node.shape)}, manifest says "
                                    f"{want} | the graph and manifest come from different exports")
            for axis, (g, w) in enumerate(zip(node.shape, want)):
                if isinstance(g, int) and isinstance(w, int) and g != w:
                    raise ManifestError(f"{self.graph_name}.onnx {node.name}: dimension {axis} is {g}, manifest says "
                                        f"{w} | the graph and manifest come from different exports")
        self._outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict) -> dict:
        check_feeds(self.graph_name, self.spec, feeds, self._expected)
        try:
            values = self.session.run(self._outputs, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.graph_name}: onnxruntime run failed ({str(exc)[:300]})"
                               f"{RUN_FAILED_FIX}") from None
        return dict(zip(self._outputs, values))


    # IO binding, for device caches (padrec_runtime.cache.device): buffers bound by address, runs that replay
    # a captured CUDA graph per cache, and runs that return once queued.

    def new_binding(self, session):
        return session.io_binding()

    @staticmethod
    def bind(binding, name: str, arr, device: str, ptr: int, output: bool = False) -> None:
        fn = binding.bind_output if output else binding.bind_input
        fn(name, device, 0, arr.dtype, list(arr.shape), ptr)

    @staticmethod
    def bind_host_scalar(binding, name: str, arr) -> None:
        """A host scalar input (ONNX Runtime reads total_sequence_length on the CPU)."""
        binding.bind_input(name, "cpu", 0, arr.dtype, [], arr.ctypes.data)

    def run_options(self, graph_id: int, queued: bool, release: bool = False):
        """Options of a cache's runs: its own CUDA graphs in the shared static sessions (an annotation id per
        cache: a graph is tied to the buffers it was captured with); `queued`: the run returns once queued
        (only for replays of a captured graph: a run that executes node by node must end with a sync, or ONNX
        Runtime frees its pinned host buffers from a stream callback, where CUDA forbids it). release: a
        synchronous run on the shared arena (a session without a CUDA graph) that shrinks the arena when it
        ends (ARENA_SHRINK); CUDA only: a CPU session has no such arena, and ONNX Runtime would refuse the run."""
        if release and queued:
            raise BackendError("run options: a queued run cannot release the arena | release on a synchronous run")
        options = self._ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        if queued:
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        if release and self.device == "cuda" and self.shrinks_arena:
            options.add_run_config_entry(ARENA_SHRINK, ARENA_SHRINK_CUDA)
        return options

    def run_bound(self, graph: str, session, binding, options) -> None:
        if not self.shrinks_arena and self._asks_shrink(options):  # refused before: options made earlier still ask
            options = self.run_options(int(options.get_run_config_entry("gpu_graph_id")), queued=False)
        try:
            session.run_with_iobinding(binding, options)
        except Exception as exc:  # onnxruntime raises its own exception types
            if not (self._asks_shrink(options) and SHRINK_REFUSED in str(exc)):
                raise BackendError(f"{graph}: onnxruntime run failed ({str(exc)[:300]}){RUN_FAILED_FIX}") from None
            # ONNX Runtime checks the shrink request before the run starts, so nothing ran: run it without, and
            # ask no more (a build whose shared arena it cannot find keeps prefill memory in the arena instead)
            self.shrinks_arena = False
            self.graph_notes.append(f"arena shrink refused, prefill memory stays in the arena ({str(exc)[:200]})")
            self.run_bound(graph, session, binding, options)

    @staticmethod
    def _asks_shrink(options) -> bool:
        """Whether a run's options ask ONNX Runtime to shrink the shared arena when the run ends."""
        try:
            return options is not None and bool(options.get_run_config_entry(ARENA_SHRINK))
        except RuntimeError:  # onnxruntime: no such entry
            return False
