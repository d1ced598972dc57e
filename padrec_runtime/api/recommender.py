"""The service API: a Recommender opened on an engine directory writes recommendation lists."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import numpy as np

from ..loop.session import DecodeConfig, DecodeSession, max_cache_len
from ..errors import BackendError, InputError, ManifestError
from ..backends.base import cast_feeds, numpy_dtype
from ..cache.host import CacheSpec, KVRunner
from ..grammar import Catalogue, ListConstraint
from ..manifest import IN_PLACE, load_manifest
from ..loop.sampling import SamplingConfig

BACKENDS = ("onnxruntime", "tensorrt")

DEVICE_ROUNDS_MAX_BATCH = 8  # device rounds by default up to this batch (measured on an H100, see `config`)


@dataclass(frozen=True)
class Recommendation:
    """One user's list."""

    item_ids: list  # recommended item ids, in order
    sids: list  # their semantic IDs
    titles: list | None  # their titles when the catalogue has them
    tokens: list  # the generated tokens, separators and eos included


@dataclass
class RecommendResult:
    """Lists for a batch and what they took."""

    lists: list  # Recommendation per history
    tau: float  # tokens committed per target forward, bonus included
    rounds: int  # target forwards after prefill
    committed: list = field(repr=False)  # per row, tokens committed per round
    time_s: dict = field(default_factory=dict)  # total / draft / verify / host seconds


def _open_backend(manifest, graph: str, backend: str, device: str, trt_module: str, allow_host_code: bool,
                  threads: int | None, cuda_graphs: bool = False, stream=None):
    if backend == "onnxruntime":
        from ..backends.onnxruntime import OrtBackend
        return OrtBackend(manifest, graph, device=device, threads=threads, cuda_graphs=cuda_graphs, stream=stream)
    if backend == "tensorrt":
        from ..backends.tensorrt import TrtBackend
        return TrtBackend(manifest, graph, module=trt_module, allow_host_code=allow_host_code)
    raise BackendError(f"backend: got {backend!r} | expected one of {', '.join(BACKENDS)}")


def _check_pairing(m) -> None:
    """The draft must read the target's features and speak its vocabulary."""
    vocab = m.layout.vocab_size
    for name, g in m.data["graphs"].items():
        if "logits" not in g["outputs"]:  # draft_chain returns tokens
            continue
        got = g["outputs"]["logits"]["shape"][-1]
        if got != vocab:
            raise ManifestError(f"graphs.{name}.outputs.logits: vocabulary {got} | layout has {vocab} | re-export")
    if "draft" in m.data["graphs"]:
        t, d = m.graph("target"), m.graph("draft")
        if d["hidden_size"] != t["hidden_size"] or d["inputs"]["hidden_in"]["shape"][-1] != t["hidden_size"]:
            raise ManifestError(f"graphs.draft.hidden_size: {d['hidden_size']} | target has {t['hidden_size']} | "
                                "the draft was not trained for this target; export them together")


class Recommender:
    """Loads engines once; `recommend` may be called from several threads (calls are serialised)."""

    def __init__(self, engine_dir, backend: str = "onnxruntime", device: str = "cpu", trt_module: str = "tensorrt",
                 allow_host_code: bool = False, threads: int | None = 1, io_binding: bool | None = None,
                 static_shapes: bool | None = None, cuda_graphs: bool | None = None, fused_target: bool | None = None):
        """io_binding: KV cache on the engine's device (default on CUDA). static_shapes: decode calls padded to
        a few fixed token counts, one session each (default with io_binding on CUDA). cuda_graphs: those
        sessions replay CUDA graphs (default with static_shapes on CUDA). fused_target: causal target calls
        (prefill, AR steps, chain verify; a batch of one, or one token per row) run the engines' target_gqa
        graph, ONNX Runtime's fused ops writing the cache in place, and fused chain rounds of one history their
        draft_chain_gqa graph (default: on with io_binding where the engines have them, except fp32 engines on
        CUDA; tree verify passes and batches of chain rounds keep the standard graphs)."""
        # device-resident KV through ONNX Runtime IO binding: the default on CUDA
        self.io_binding = (device == "cuda" and backend == "onnxruntime") if io_binding is None else io_binding
        if self.io_binding and backend != "onnxruntime":
            raise BackendError("io_binding: only the onnxruntime backend binds buffers | drop io_binding")
        self.static_shapes = (self.io_binding and device == "cuda") if static_shapes is None else static_shapes
        if self.static_shapes and not self.io_binding:
            raise BackendError("static_shapes: needs io_binding (fixed buffers) | pass io_binding=True")
        self.cuda_graphs = (self.static_shapes and device == "cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not (self.static_shapes and device == "cuda"):
            raise BackendError("cuda_graphs: needs device='cuda' and static_shapes | drop cuda_graphs")
        self.manifest = load_manifest(engine_dir)
        m = self.manifest
        has_fused = "target_gqa" in m.data["graphs"]  # (with a draft chain, draft_chain_gqa beside it)
        # ONNX Runtime's CUDA GroupQueryAttention has fp16 / bf16 kernels only: an fp32 one would run on the CPU
        cuda_fp32 = device == "cuda" and m.precision == "fp32"
        self.fused_target = (self.io_binding and has_fused and not cuda_fp32) if fused_target is None else fused_target
        if self.fused_target and not (self.io_binding and has_fused):
            raise BackendError("fused_target: needs io_binding (the graph writes the bound cache in place) and engines "
                               "with a target_gqa graph | drop fused_target or re-export (fp16 or fp32)")
        if self.fused_target and cuda_fp32:
            raise BackendError("fused_target: fp32 engines | ONNX Runtime's CUDA GroupQueryAttention runs fp16 only; "
                               "export fp16 engines or drop fused_target")
        self.catalogue = Catalogue.load(m.verify_file(m.model["catalogue"]), m.layout)
        _check_pairing(m)
        self.stream = None  # one CUDA stream for the engines and the cache updates, in order
        if self.io_binding and device == "cuda":
            from ..cache.device import array_module
            cupy = array_module("cuda")[0]
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self.backends = {g: _open_backend(m, g, backend, device, trt_module, allow_host_code, threads,
                                          self.cuda_graphs, self.stream)
                         for g in m.data["graphs"] if g not in IN_PLACE or self.fused_target}
        self._lock = threading.Lock()
        self.device = device
        self._bound: dict = {}
        # device caches of finished caller-owned sessions, reused by the next ones: the number of caches
        # (and of CUDA graphs captured for them) stays at the peak of sessions open at once
        self._pool: dict = {}
        self._pool_lock = threading.Lock()
        self._device_lock = threading.RLock()  # one engine call or cache update at a time on the device

    def close(self, _collect: bool = True) -> None:
        """Free the engines and device caches now (also on `with Recommender(...) as rec:` exit and when the
        object is collected). Queued device work finishes first, so nothing the engines still use goes away
        under them (CUDA sessions free their buffers through the stream they ran on)."""
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        for name in ("_bound", "_pool"):
            if hasattr(self, name):
                getattr(self, name).clear()
        if hasattr(self, "backends"):
            self.backends.clear()
        if _collect:
            import gc
            gc.collect()  # sessions held only by reference cycles go now, not at some later moment
        if getattr(self, "stream", None) is not None:
            import cupy
            cupy.cuda.Device().synchronize()  # the sessions' own cleanup work queued while they were freed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close(_collect=False)
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def _release(self, runners: list) -> None:
        with self._pool_lock:
            for graph, runner in runners:
                self._pool.setdefault((graph, runner.batch), []).append(runner)

    @property
    def limits(self) -> dict:
        return self.manifest.model

    def _runner(self, graph: str, batch: int, max_len: int, reuse: bool = False):
        g = self.manifest.graph(graph)
        kv = g["kv"]
        if self.io_binding:
            from ..cache.device import BoundKVRunner
            spec = CacheSpec(kv["n_layers"], kv["n_kv_heads"], kv["head_dim"], self.limits["max_seq_len"])

            def make():
                runner = BoundKVRunner(self.backends[graph], graph, g, spec, batch, self.device,
                                       static=self.static_shapes, stream=self.stream, lock=self._device_lock)
                for name in self._attached(graph):
                    runner.attach(name, self.backends[name], self.manifest.graph(name))
                return runner
            if not reuse:  # a caller-owned session gets caches of its own, from a pool (see `start`)
                with self._pool_lock:
                    free = self._pool.setdefault((graph, batch), [])
                    runner = free.pop() if free else None
                if runner is None:
                    return make()
                runner.reset()
                return runner
            key = (graph, batch)
            if key not in self._bound:  # `recommend` (serialised) reuses device caches per batch size
                self._bound[key] = make()
            runner = self._bound[key]
            runner.reset()
            return runner
        spec = CacheSpec(kv["n_layers"], kv["n_kv_heads"], kv["head_dim"], max_len)
        runner = KVRunner(self._infer(graph), spec, batch, numpy_dtype(kv["dtype"]))
        for name in self._attached(graph):
            runner.attach(name, self._infer(name), self.manifest.graph(name))
        return runner

    def _infer(self, graph: str):
        backend, spec = self.backends[graph], self.manifest.graph(graph)
        return lambda feeds: backend.infer(cast_feeds(spec, feeds))

    def _attached(self, graph: str) -> list:
        """Graphs that run over `graph`'s KV cache: the fused draft chain over the draft's, and the in-place
        graphs standing in for the target and the chain."""
        attached = {"draft": ["draft_chain", "draft_chain_gqa"], "target": ["target_gqa"]}.get(graph, [])
        return [g for g in attached if g in self.backends]

    def _check_histories(self, histories) -> list:
        lim = self.limits
        if not isinstance(histories, (list, tuple)) or not histories:
            raise InputError("histories: expected a non-empty list of histories (lists of item ids)")
        if len(histories) > lim["max_batch"]:
            raise InputError(f"histories: batch of {len(histories)} | the engines take at most {lim['max_batch']}; "
                             "split the batch")
        out = []
        for b, h in enumerate(histories):
            if isinstance(h, np.ndarray):
                h = h.tolist()
            if not isinstance(h, (list, tuple)) or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                           for i in h):
                raise InputError(f"histories[{b}]: expected a list of integer item ids, got {h!r:.80}")
            if not h:
                raise InputError(f"histories[{b}]: empty | give at least one item the user interacted with")
            if len(h) > lim["max_history"]:
                raise InputError(f"histories[{b}]: {len(h)} items | the engines take at most {lim['max_history']}; "
                                 "keep the most recent ones")
            if len(set(h)) != len(h):
                raise InputError(f"histories[{b}]: item ids repeat | give each item once")
            out.append([int(i) for i in h])
        return out

    def calibrate(self, histories: list, batches=(1, 8, 32), repeats: int = 3) -> list:
        """Measure AR and speculation settings per batch size; `speculate="auto"` then uses the fastest."""
        from .adaptive import calibrate
        self.plan = calibrate(self, histories, batches, repeats)
        return self.plan

    def config(self, speculate: str = "chain", greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, draft_steps: int | None = None, tree_topk: int | None = None,
               tree_size: int | None = None, fused_chain: bool = True, device_rounds: bool | None = None,
               batch: int = 1) -> DecodeConfig:
        """A DecodeConfig with the manifest's defaults for whatever is left out. device_rounds None: on for up to
        DEVICE_ROUNDS_MAX_BATCH histories on CUDA device caches with static shapes, else off (H100: 9-15% less
        time per list than host rounds at batch 1 in sessions 16-17, 18-24% less at batch 8 in session 17's two
        runs and session 16's calibration; larger batches not timed with them: `calibrate` can choose them)."""
        lim = self.limits
        if speculate != "off" and "draft" not in self.backends:
            raise InputError("speculate: these engines have no draft | use speculate='off'")
        if device_rounds is None:
            device_rounds = self._device_rounds_default(batch)
        return DecodeConfig(speculate=speculate, draft_steps=draft_steps or lim["draft_steps"],
                            tree_topk=tree_topk or lim["tree_topk"], tree_size=tree_size or lim["tree_size"],
                            sampling=SamplingConfig(greedy, temperature, top_k, top_p), seed=seed,
                            fused_chain=fused_chain, device_rounds=device_rounds)

    def _device_rounds_default(self, batch: int) -> bool:
        return (batch <= DEVICE_ROUNDS_MAX_BATCH and self.device == "cuda" and bool(self.io_binding)
                and bool(self.static_shapes))

    def start(self, histories, n_items: int | None = None, exclude_history: bool = True, _reuse: bool = False,
              **options) -> DecodeSession:
        """A caller-owned decode: call `.step()` until `.done`, then `.result()`."""
        if not self.backends:
            raise BackendError("recommender: closed | create a new Recommender for these engines")
        histories = self._check_histories(histories)
        lim = self.limits
        n_items = lim["n_items"] if n_items is None else n_items
        if not isinstance(n_items, int) or not 1 <= n_items <= lim["max_items"]:
            raise InputError(f"n_items: got {n_items!r} | expected 1..{lim['max_items']}")
        if options.get("speculate") == "auto":
            from .adaptive import choose
            if not getattr(self, "plan", None):
                raise InputError("speculate='auto': no calibration | call Recommender.calibrate(histories) first")
            pick = choose(self.plan, len(histories))
            options = dict(options, speculate=pick.speculate, draft_steps=pick.draft_steps,
                           device_rounds=pick.device_rounds)
        cfg = self.config(**options, batch=len(histories))
        if cfg.device_rounds and not (self.io_binding and self.static_shapes):
            raise InputError("device_rounds: needs device caches with static shapes | Recommender(..., "
                             "io_binding=True, static_shapes=True) (the CUDA defaults)")
        constraint = ListConstraint(self.catalogue, n_items=n_items, exclude_history=exclude_history)
        prompts = [self.catalogue.prompt(h) for h in histories]
        need = max_cache_len(max(len(p) for p in prompts), constraint, cfg)
        if need > lim["max_seq_len"]:
            raise InputError(f"request needs {need} KV positions | the engines hold {lim['max_seq_len']}; use a "
                             "shorter history, fewer items or less speculation")
        B = len(prompts)
        target = self._runner("target", B, need, _reuse)
        draft = self._runner("draft", B, need, _reuse) if cfg.speculate != "off" else None
        try:
            session = DecodeSession(target, draft, prompts, histories, constraint, cfg)
        except BaseException:
            if self.io_binding and not _reuse:
                self._release([(g, r) for g, r in (("target", target), ("draft", draft)) if r is not None])
            raise
        if self.io_binding and not _reuse:  # the caches go back to the pool once the session is dropped
            weakref.finalize(session, self._release,
                             [(g, r) for g, r in (("target", target), ("draft", draft)) if r is not None])
        return session

    def recommend(self, histories, n_items: int | None = None, exclude_history: bool = True,
                  **options) -> RecommendResult:
        """One list per history. options: speculate (off|chain|tree|auto), greedy, temperature, top_k, top_p, seed,
        draft_steps, tree_topk, tree_size, fused_chain (default on: greedy chain rounds with the exported K run
        the draft_chain graph, one draft call per round), device_rounds (each fused-chain round queues the next
        round's chain on the device behind its verify pass, `rounds.DeviceRounds`; needs io_binding and static
        shapes; default: on with those on CUDA for up to 8 histories, off elsewhere)."""
        with self._lock:
            session = self.start(histories, n_items, exclude_history, _reuse=True, **options)
            while not session.done:
                session.step()
            g = session.result()
        lists = []
        cat = self.catalogue
        for toks in g.tokens:
            items = cat.decode_list(toks)
            idx = cat.index_of(items)
            titles = [cat.titles[i] for i in idx] if cat.titles is not None else None
            lists.append(Recommendation(items, cat.sids[idx].tolist(), titles, [int(t) for t in toks]))
        return RecommendResult(lists, g.tau, g.rounds, g.committed,
                               {"total": g.time_total_s, "draft": g.time_draft_s, "verify": g.time_verify_s,
                                "host": g.time_host_s})
