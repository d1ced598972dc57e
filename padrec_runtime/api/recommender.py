"""The service API: a Recommender opened on an engine directory writes recommendation lists."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from ..backends import open_backends
from ..errors import BackendError, DeadlineError, InputError, ManifestError
from ..grammar import Catalogue, ListConstraint
from ..loop import DecodeSession, max_cache_len
from ..manifest import IN_PLACE, load_manifest
from .caches import CacheStore
from .options import DecodeParams, RuntimeOptions, request_cost, resolve_runtime


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


def describe(catalogue: Catalogue, tokens) -> Recommendation:
    """A token list (complete or not) as items: ids, semantic IDs and titles of every complete item."""
    items = catalogue.decode_list(tokens)
    idx = catalogue.index_of(items)
    titles = [catalogue.titles[i] for i in idx] if catalogue.titles is not None else None
    return Recommendation(items, catalogue.sids[idx].tolist(), titles, [int(t) for t in tokens])


class Stream:
    """A caller-owned decode for services that stream lists as they grow: `step()` until `done`; `partial()`
    gives every row's complete items so far, `result()` the finished lists."""

    def __init__(self, session: DecodeSession, catalogue: Catalogue):
        self.session, self.catalogue = session, catalogue
        self.failed: str | None = None  # why a round failed: its caches and drafts are half-updated, so no more

    @property
    def done(self) -> bool:
        return self.session.done

    def step(self) -> list:
        """Run one round; returns the tokens each row committed in it."""
        if self.failed is not None:
            raise InputError(f"stream: a round failed earlier ({self.failed}) | start a new request")
        if self.done:
            raise InputError("stream: every list is complete | read them with result()")
        try:
            return self.session.step()
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {str(exc)[:200]}"
            raise

    def partial(self) -> list:
        """Per row, a Recommendation of the items completed so far."""
        return [describe(self.catalogue, toks) for toks in self.session.out.tokens]

    def result(self) -> RecommendResult:
        if not self.done:
            raise InputError(f"stream: not done after {self.session.out.rounds} rounds | step() until done, or read "
                             "the complete items so far with partial()")
        g = self.session.result()
        return RecommendResult([describe(self.catalogue, toks) for toks in g.tokens], g.tau, g.rounds, g.committed,
                               {"total": g.time_total_s, "draft": g.time_draft_s, "verify": g.time_verify_s,
                                "host": g.time_host_s})


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


def _as_params(params) -> DecodeParams:
    """A request's DecodeParams (None: the defaults; a dict: its fields, unknown keys named)."""
    if params is None:
        return DecodeParams()
    if isinstance(params, DecodeParams):
        return params
    if isinstance(params, dict):
        known = {f.name for f in dataclasses.fields(DecodeParams)}
        unknown = sorted(map(repr, set(params) - known))
        if unknown:
            raise InputError(f"params: unknown keys {', '.join(unknown)} | DecodeParams fields: "
                             f"{', '.join(sorted(known))}")
        return DecodeParams(**params)
    raise InputError(f"params: got {type(params).__name__} | expected DecodeParams(...) or a dict of its fields")


class Recommender:
    """Loads engines once; `recommend` may be called from several threads (calls are serialised).

    device: cpu | cuda; backend: onnxruntime | tensorrt; options: how engines run (RuntimeOptions; its None
    fields are decided once here, see `settings`); tracer: told about every engine call (padrec_runtime.trace)."""

    def __init__(self, engine_dir, device: str = "cpu", backend: str = "onnxruntime",
                 options: RuntimeOptions | None = None, tracer=None):
        options = RuntimeOptions() if options is None else options
        if not isinstance(engine_dir, (str, os.PathLike)) or isinstance(engine_dir, bytes):
            raise InputError(f"engine_dir: got {type(engine_dir).__name__} | expected a path (str or pathlib.Path) "
                             "of an engine directory from `padrec export`")
        if not isinstance(options, RuntimeOptions):
            raise InputError(f"options: got {type(options).__name__} | expected RuntimeOptions(...)")
        if tracer is not None and not callable(getattr(tracer, "engine_call", None)):
            raise InputError(f"tracer: got {type(tracer).__name__} | expected an object with an engine_call(call) "
                             "method (padrec_runtime.trace.Tracer), or None")
        # each engine file is hashed once: as a backend or the catalogue reads it, the rest at the end of __init__
        self.manifest = m = load_manifest(engine_dir, verify=False)
        self.settings = resolve_runtime(options, backend, device, m.precision, "target_gqa" in m.data["graphs"],
                                        (m.tensorrt or {}).get("builder"))
        self.catalogue = m.load_catalogue()  # parsed from its checked bytes, matched with the chain graphs
        _check_pairing(m)
        self.stream = None  # one CUDA stream for the engines and the cache updates, in order
        if device == "cuda" and backend == "onnxruntime":
            from ..backends.onnxruntime import require_cuda
            require_cuda()  # before cupy and the stream: a machine without a GPU is told that, not about cupy
        if self.settings.device_cache and device == "cuda":
            from ..cache.device import array_module
            self.stream = array_module("cuda")[0].cuda.Stream(non_blocking=True)
        self.backends = open_backends(m, [g for g in m.data["graphs"] if g not in IN_PLACE or self.settings.in_place],
                                      self.settings, self.stream)
        m.verify_all()  # the files no backend read (other backends' plans, graphs this device leaves out)
        self.caches = CacheStore(m, self.backends, self.settings, self.stream, tracer)
        self.plan = None  # adaptive speculation's choices, once calibrated
        self._lock = threading.Lock()

    @property
    def limits(self) -> dict:
        """The engines' limits and defaults (manifest `model`)."""
        return self.manifest.model

    def memory(self) -> dict:
        """Bytes held by component: `weights` (one copy of each distinct weight tensor, shared by every session
        of every graph), `weights_allocated` (the device memory holding them: their bytes plus alignment),
        `weights_unshared` (what one copy per graph would hold: the saving is the difference; each static-shape
        session would have held another copy), `kv_caches` (device caches kept), `cache_buffers` (those caches'
        bound input, output and new-KV buffers and device tables, by kind). ONNX Runtime's own arenas and sessions
        are not counted (tools/gpu_memory.py measures them)."""
        pools = {id(p): p for p in (getattr(b, "weights", None) for b in self.backends.values()) if p is not None}
        return {"weights": sum(p.bytes for p in pools.values()),
                "weights_allocated": sum(p.device_bytes for p in pools.values()),
                "weights_unshared": sum(p.uses for p in pools.values()), "kv_caches": self.caches.kv_bytes(),
                "cache_buffers": self.caches.buffer_bytes()}

    def close(self) -> None:
        """Free the engines and device caches now (also on `with Recommender(...) as rec:` exit). Queued device
        work finishes first, so nothing the engines still use goes away under them."""
        self._free()
        import gc
        gc.collect()  # sessions held only by reference cycles go now, not at some later moment

    def _free(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.stream.synchronize()
        if hasattr(self, "caches"):
            self.caches.clear()
        if hasattr(self, "backends"):
            self.backends.clear()
        if getattr(self, "stream", None) is not None:
            import cupy
            cupy.cuda.Device().synchronize()  # the sessions' own cleanup work queued while they were freed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._free()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def calibrate(self, histories: list, batches=(1, 8, 32), repeats: int = 3) -> list:
        """Measure AR and speculation settings per batch size; `speculate="auto"` then uses the fastest."""
        from .adaptive import calibrate
        self.plan = calibrate(self, histories, batches, repeats)
        return self.plan

    def recommend(self, histories, n_items: int | None = None, params: DecodeParams | dict | None = None,
                  exclude_history: bool = True) -> RecommendResult:
        """One list per history (a list of item ids, oldest first). params: how to decode (DecodeParams)."""
        params, t0 = _as_params(params), time.perf_counter()  # the deadline counts the wait and the prefill too
        with self._lock:
            stream = Stream(self._session(histories, n_items, params, exclude_history, shared=True), self.catalogue)
            while not stream.done:
                stream.step()
                if params.deadline_s is not None and time.perf_counter() - t0 > params.deadline_s:
                    raise DeadlineError(f"request: past its deadline of {params.deadline_s:g} s after "
                                        f"{stream.session.out.rounds} rounds | raise deadline_s, or ask for fewer "
                                        "histories or items")
            return stream.result()

    def start(self, histories, n_items: int | None = None, params: DecodeParams | dict | None = None,
              exclude_history: bool = True) -> Stream:
        """A caller-owned decode (own caches, leased from a pool): call `.step()` until `.done`."""
        return Stream(self._session(histories, n_items, _as_params(params), exclude_history, shared=False),
                      self.catalogue)

    def _session(self, histories, n_items, params: DecodeParams, exclude_history: bool, shared: bool):
        if not self.backends:
            raise BackendError("recommender: closed | create a new Recommender for these engines")
        histories = self._check_histories(histories)
        n_items = self._check_n_items(n_items)
        if not isinstance(exclude_history, (bool, np.bool_)):
            raise InputError(f"exclude_history: got {exclude_history!r} | expected True or False")
        cfg = self.decode_config(params, len(histories))
        constraint = ListConstraint(self.catalogue, n_items=n_items, exclude_history=bool(exclude_history))
        prompts = [self.catalogue.prompt(h) for h in histories]
        self._check_budget(prompts, constraint, cfg)
        need = max_cache_len(max(len(p) for p in prompts), constraint, cfg)
        graphs = ("target",) if cfg.speculate == "off" else ("target", "draft")
        if not self.settings.device_cache:
            caches = [self.caches.host_cache(g, len(prompts), need) for g in graphs]
            return DecodeSession(caches[0], caches[1] if len(caches) > 1 else None, prompts, histories, constraint, cfg)
        take = self.caches.shared if shared else self.caches.lease
        leased = [(g, take(g, len(prompts))) for g in graphs]
        try:
            session = DecodeSession(leased[0][1], leased[1][1] if len(leased) > 1 else None, prompts, histories,
                                    constraint, cfg)
        except BaseException:
            if not shared:
                self.caches.give_back(leased)
            raise
        if not shared:  # the caches go back to the pool once the session is dropped
            weakref.finalize(session, self.caches.give_back, leased)
        return session

    def decode_config(self, params: DecodeParams, batch: int):
        """The loop's DecodeConfig for a request of `batch` histories (`auto` resolved from the calibration)."""
        if params.speculate == "auto":
            from .adaptive import choose
            if not self.plan:
                raise InputError("speculate='auto': no calibration | call Recommender.calibrate(histories) first")
            pick = choose(self.plan, batch)
            params = dataclasses.replace(params, speculate=pick.speculate, draft_steps=pick.draft_steps,
                                         device_rounds=pick.device_rounds)
        if params.speculate != "off" and "draft" not in self.backends:
            raise InputError("speculate: these engines have no draft | use speculate='off'")
        s = self.settings
        default_rounds = s.device == "cuda" and s.device_cache and s.static_shapes and batch <= s.device_rounds_max_batch
        cfg = params.plan(self.limits, default_rounds)
        if cfg.device_rounds and not (s.device_cache and s.static_shapes):
            raise InputError("device_rounds: needs device caches with static shapes | RuntimeOptions("
                             "device_cache=True, static_shapes=True) (--device-cache --static-shapes; the CUDA "
                             "defaults)")
        return cfg

    def _check_budget(self, prompts: list, constraint: ListConstraint, cfg) -> None:
        need = max_cache_len(max(len(p) for p in prompts), constraint, cfg)
        if need > self.limits["max_seq_len"]:
            raise InputError(f"request needs {need} KV positions | the engines hold {self.limits['max_seq_len']}; "
                             "use a shorter history, fewer items or less speculation")
        cost, budget = request_cost(len(prompts), constraint.list_length(), cfg), self.settings.max_request_tokens
        if cost > budget:
            raise InputError(f"request: up to {cost} verified tokens | the budget is {budget} "
                             "(RuntimeOptions.max_request_tokens) | split the batch or use a smaller tree_size")

    def _check_n_items(self, n_items) -> int:
        lim = self.limits["max_items"]
        if n_items is None:
            return self.limits["n_items"]
        if isinstance(n_items, (bool, np.bool_)) or not isinstance(n_items, (int, np.integer)) \
                or not 1 <= n_items <= lim:
            raise InputError(f"n_items: got {n_items!r} | expected an integer in 1..{lim}")
        return int(n_items)

    def _check_histories(self, histories) -> list:
        lim = self.limits
        if isinstance(histories, np.ndarray):
            histories = histories.tolist()
        if not isinstance(histories, (list, tuple)) or not histories:
            raise InputError("histories: expected a non-empty list of histories (lists of item ids)")
        if all(isinstance(h, (int, np.integer)) and not isinstance(h, (bool, np.bool_)) for h in histories):
            raise InputError(f"histories: got a flat list of item ids {list(histories)[:5]!r:.60} | wrap one user's "
                             "history in a list: [[12, 7, 301]]")
        if len(histories) > lim["max_batch"]:
            raise InputError(f"histories: batch of {len(histories)} | the engines take at most {lim['max_batch']}; "
                             "split the batch")
        return [self._check_history(b, h) for b, h in enumerate(histories)]

    def _check_history(self, b: int, h) -> list:
        lim = self.limits
        if isinstance(h, np.ndarray):
            h = h.tolist()
        if not isinstance(h, (list, tuple)) or not all(isinstance(i, (int, np.integer))
                                                       and not isinstance(i, (bool, np.bool_)) for i in h):
            raise InputError(f"histories[{b}]: expected a list of integer item ids, got {h!r:.80}")
        if not h:
            raise InputError(f"histories[{b}]: empty | give at least one item the user interacted with")
        if len(h) > lim["max_history"]:
            raise InputError(f"histories[{b}]: {len(h)} items | the engines take at most {lim['max_history']}; "
                             "keep the most recent ones")
        if len(set(h)) != len(h):
            raise InputError(f"histories[{b}]: item ids repeat | give each item once")
        self.catalogue.check_known(h, f"histories[{b}]")  # here, so the error names the row
        return [int(i) for i in h]
