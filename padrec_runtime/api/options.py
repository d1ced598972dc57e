"""Settings, each resolved once: `RuntimeOptions` (how engines run) and `DecodeParams` (how lists are decoded).

Both are frozen dataclasses checked field by field against one table of rules when made, so a bad value is an
`InputError` naming the field, what was got and what is expected - never a TypeError deep in the loop.
`resolve_runtime` turns RuntimeOptions into `Settings` for one engine directory and device (every tri-state
decided, one error per impossible combination); `DecodeParams.plan` turns a request's parameters into the
loop's `DecodeConfig` with the manifest's defaults.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, fields

import numpy as np

from ..errors import BackendError, InputError
from ..loop.sampling import SamplingConfig
from ..loop.session import DecodeConfig

BACKENDS = ("onnxruntime", "tensorrt")
DEVICES = ("cpu", "cuda")
SPECULATE = ("off", "chain", "tree", "auto")
TRT_MODULES = ("tensorrt", "tensorrt_lean", "tensorrt_rtx")
GRAPH_SESSIONS = ("per_graph", "per_shape", "single", "pair")
GEMM_TUNING = ("session", "apart", "off")


def _check(owner: str, name: str, value, kind: str, lo=None, hi=None, choices=None, optional=False):
    """The one rule table's check: value of `kind` (bool | int | float | str) within lo..hi or choices.
    numpy scalars count as their Python kind; bools are never numbers. Returns the value as a Python type."""
    where = f"{owner}.{name}"
    if value is None:
        if optional:
            return None
        raise InputError(f"{where}: got None | expected {kind} | pass a value or leave the field out")
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise InputError(f"{where}: got {value!r} | expected True or False")
        return bool(value)
    if kind == "str":
        if not isinstance(value, str) or (choices and value not in choices):
            raise InputError(f"{where}: got {value!r} | expected one of {', '.join(choices)}")
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer) if kind == "int"
                                                              else (int, float, np.integer, np.floating)):
        expected = "an integer" if kind == "int" else "a number"
        raise InputError(f"{where}: got {value!r} ({type(value).__name__}) | expected {expected}{_range(lo, hi)}")
    if kind == "int":
        value = int(value)
    elif isinstance(value, int) and abs(value) > sys.float_info.max:  # out of any range, not an OverflowError
        value = math.inf if value > 0 else -math.inf
    else:
        value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InputError(f"{where}: got {value!r} | expected {'an integer' if kind == 'int' else 'a finite number'}"
                         f"{_range(lo, hi)}")
    return value


def _range(lo, hi) -> str:
    if lo is None and hi is None:
        return ""
    return f" in {lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"


def checked_fields(cls):
    """A frozen dataclass whose constructor names unknown keywords and extra positional values as an InputError
    listing its fields (Python's own TypeError would not say which fields there are)."""
    init, names = cls.__init__, [f.name for f in fields(cls)]

    def __init__(self, *args, **kwargs):
        unknown = sorted(map(str, set(kwargs) - set(names)))
        if unknown or len(args) > len(names):
            got = f"unknown {unknown}" if unknown else f"{len(args)} positional values"
            raise InputError(f"{cls.__name__}: got {got} | its fields are {', '.join(names)}")
        init(self, *args, **kwargs)
    __init__.__doc__ = init.__doc__
    cls.__init__ = __init__
    return cls


def _validate(obj, rules: dict) -> None:
    """Check and normalise every field of a frozen dataclass against its rules (name -> _check keywords)."""
    owner = type(obj).__name__
    for f in fields(obj):
        value = _check(owner, f.name, getattr(obj, f.name), **rules[f.name])
        object.__setattr__(obj, f.name, value)


@checked_fields
@dataclass(frozen=True)
class RuntimeOptions:
    """How a Recommender runs its engines. None: decided from the device and the engines (see `resolve_runtime`)."""

    threads: int | None = 1  # ONNX Runtime intra-op threads on CPU (None: ONNX Runtime's default)
    device_cache: bool | None = None  # KV cache resident on the engine's device (ONNX Runtime IO binding); CUDA default
    static_shapes: bool | None = None  # calls padded to fixed token buckets, one session each; CUDA default
    cuda_graphs: bool | None = None  # bucket sessions replay CUDA graphs; CUDA default
    # buckets of more tokens than this (prefill) run without a graph on one shared CUDA arena, which a prompt's
    # prefill hands back when it ends: a graphed session keeps an arena of its own, which at 7B would hold a prefill's
    # activations (~1 GB) for good; None: every bucket
    cuda_graph_max_tokens: int | None = None
    # per_graph: one CUDA-graph session per engine graph, each bucket a graph of its own in it (one arena and one
    # cuBLAS / cuDNN state per engine graph; buckets above cuda_graph_max_tokens keep a session per shape, on the
    # shared arena); pair: as per_graph, the buckets above cuda_graph_max_tokens on one dynamic-shape session per
    # engine graph, on the shared arena (no session per prefill shape; without CUDA graphs, as per_graph); single:
    # as per_graph, the buckets above cuda_graph_max_tokens too, outside any graph (their activations stay in the
    # graphed session's arena: smaller only at batch 1, 1.5B on an H100); per_shape: a session per (batch, bucket)
    # shape (the default)
    graph_sessions: str = "per_shape"
    # causal calls on the in-place graphs (target_gqa, draft_chain_gqa); None: where the cache is on the device and
    # the engines have them (fp16 exports), fp32 on CUDA excepted
    in_place: bool | None = None
    # cuBLAS's workspace per handle, in MiB, for the whole process (CUBLAS_WORKSPACE_CONFIG; every CUDA session makes
    # its own handles, 32 MiB each on Hopper by default): 4 held a 1.5B pair's memory 0.25-0.5 GB lower (H100; its
    # speed cost at batch 32 is not settled). None: whatever the process has (cuBLAS's default, the environment's
    # value, or the cap an earlier Recommender of this process set)
    cublas_workspace_mib: int | None = None
    # where ONNX Runtime's GEMM tuning (per MatMul shape, cuBLAS against its GEMV kernels) runs on CUDA: session (in
    # each session; a graphed session's arena keeps the tuning's L2-eviction scratch, ~100 MB on an H100), apart (a
    # graphed bucket's first call also runs in a throwaway twin of its session, which takes the scratch with it:
    # 0.22-0.41 GB less for a 1.5B pair, the first calls at each new batch size 4-5 s slower at 1.5B and
    # 26-28 s slower at 7B; H100) or off (cuBLAS only: the memory of apart, and each batch size's first request
    # without the twin's 0.11-0.18 GB lift at 1.5B; slower from batch 8 at 1.5B)
    gemm_tuning: str = "session"
    # a prompt's prefill runs at most this many rows at a time, over windows of the device cache: its activations
    # (and the arena holding them) stay at this batch's size, and its sessions serve every larger batch (at 7B a
    # 64-row prefill of 128-token prompts would take ~2 GB at once)
    prefill_rows: int = 8
    device_rounds_max_batch: int = 8  # greedy chain rounds queued on the device up to this batch (timed faster there)
    max_request_tokens: int = 131072  # budget: histories x list tokens x tokens verified per round (see `request_cost`)
    trt_module: str | None = None  # tensorrt | tensorrt_lean | tensorrt_rtx; None: the plans' builder's runtime
    allow_host_code: bool = False  # load TensorRT plans that embed host code (version-compatible builds)

    def __post_init__(self):
        _validate(self, {"threads": dict(kind="int", lo=1, hi=1024, optional=True),
                         "device_cache": dict(kind="bool", optional=True),
                         "static_shapes": dict(kind="bool", optional=True),
                         "cuda_graphs": dict(kind="bool", optional=True),
                         "cuda_graph_max_tokens": dict(kind="int", lo=1, hi=1 << 20, optional=True),
                         "graph_sessions": dict(kind="str", choices=GRAPH_SESSIONS),
                         "in_place": dict(kind="bool", optional=True),
                         "cublas_workspace_mib": dict(kind="int", lo=1, hi=1 << 12, optional=True),
                         "gemm_tuning": dict(kind="str", choices=GEMM_TUNING),
                         "prefill_rows": dict(kind="int", lo=1, hi=1 << 16),
                         "device_rounds_max_batch": dict(kind="int", lo=0, hi=1 << 16),
                         "max_request_tokens": dict(kind="int", lo=1),
                         "trt_module": dict(kind="str", choices=TRT_MODULES, optional=True),
                         "allow_host_code": dict(kind="bool")})


@dataclass(frozen=True)
class Settings:
    """RuntimeOptions resolved for one engine directory, backend and device: every choice made."""

    backend: str
    device: str
    threads: int | None
    device_cache: bool
    static_shapes: bool
    cuda_graphs: bool
    cuda_graph_max_tokens: int | None
    graph_sessions: str
    in_place: bool
    cublas_workspace_mib: int | None
    gemm_tuning: str
    prefill_rows: int
    device_rounds_max_batch: int
    max_request_tokens: int
    trt_module: str
    allow_host_code: bool


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_runtime(options: RuntimeOptions, backend: str, device: str, precision: str, has_in_place: bool,
                    trt_builder: str | None = None) -> Settings:
    """Decide every setting once; raises BackendError naming the impossible combination and the way out.
    trt_builder: the package that built the engines' TensorRT plans (manifest `tensorrt.builder`), if any."""
    backend = _check("Recommender", "backend", backend, "str", choices=BACKENDS)
    device = _check("Recommender", "device", device, "str", choices=DEVICES)
    o, cuda, ort = options, device == "cuda", backend == "onnxruntime"
    cores = usable_cores()
    if ort and o.threads is not None and o.threads > cores:  # more spin-waiting threads than cores slow every call
        raise BackendError(f"threads: {o.threads} on a process that may use {cores} CPU cores | pass threads={cores} "
                           f"(--threads {cores}) or fewer (RuntimeOptions: None for ONNX Runtime's default)")
    device_cache = (cuda and ort) if o.device_cache is None else o.device_cache
    if device_cache and not ort:
        raise BackendError("device_cache: only the onnxruntime backend binds device buffers | drop device_cache "
                           "(TensorRT keeps the KV cache on the host)")
    static = (device_cache and cuda) if o.static_shapes is None else o.static_shapes
    if static and not device_cache:
        raise BackendError("static_shapes: needs device_cache (fixed buffers) | pass device_cache=True "
                           "(--device-cache)")
    graphs = (static and cuda) if o.cuda_graphs is None else o.cuda_graphs
    if graphs and not (static and cuda):
        raise BackendError("cuda_graphs: needs device='cuda' and static_shapes | drop cuda_graphs")
    if o.cuda_graph_max_tokens is not None and not graphs:
        raise BackendError(f"cuda_graph_max_tokens: {o.cuda_graph_max_tokens} without CUDA graphs | drop it "
                           "(--cuda-graph-max-tokens), or keep "
                           "cuda_graphs on (device='cuda' with static shapes, cuda_graphs not False)")
    # ONNX Runtime's CUDA GroupQueryAttention has fp16 / bf16 kernels only: an fp32 one would run on the CPU
    cuda_fp32 = cuda and precision == "fp32"
    in_place = (device_cache and has_in_place and not cuda_fp32) if o.in_place is None else o.in_place
    if in_place and not (device_cache and has_in_place):
        raise BackendError("in_place: needs device_cache (the graph writes the bound cache in place) and engines "
                           "with a target_gqa graph | drop in_place (--standard-graphs) or re-export without "
                           "--no-in-place")
    if in_place and cuda_fp32:
        raise BackendError("in_place: fp32 engines | ONNX Runtime's CUDA GroupQueryAttention runs fp16 / bf16 only; "
                           "export fp16 engines or drop in_place (--standard-graphs)")
    if o.cublas_workspace_mib is not None and not (cuda and ort):
        raise BackendError(f"cublas_workspace_mib: {o.cublas_workspace_mib} sizes cuBLAS's workspace for ONNX "
                           f"Runtime's CUDA sessions | drop it (--cublas-workspace-mib) on backend={backend}, "
                           f"device={device}")
    if o.gemm_tuning != "session" and not (cuda and ort):
        raise BackendError(f"gemm_tuning: {o.gemm_tuning} places ONNX Runtime's CUDA GEMM tuning | drop it "
                           f"(--gemm-tuning) on backend={backend}, device={device}")
    if o.gemm_tuning == "apart" and not graphs:
        raise BackendError("gemm_tuning: apart keeps the tuning out of CUDA-graph sessions, and there are none | "
                           "drop it (--gemm-tuning), or keep CUDA graphs on (device='cuda' with static shapes: "
                           "--static-shapes --device-cache; cuda_graphs not False)")
    if (o.trt_module is not None or o.allow_host_code) and backend != "tensorrt":
        raise BackendError(f"{'trt_module' if o.trt_module is not None else 'allow_host_code'}: a TensorRT setting "
                           f"on backend={backend} | drop it (--trt-module / --allow-host-code), or pass "
                           "backend='tensorrt' (--backend tensorrt)")
    # RTX-built plans run only on TensorRT for RTX's runtime, the others on TensorRT's (lean: asked for by name)
    trt_module = o.trt_module or ("tensorrt_rtx" if trt_builder == "tensorrt_rtx" else "tensorrt")
    resolved = dict(backend=backend, device=device, device_cache=device_cache, static_shapes=static,
                    cuda_graphs=graphs, in_place=in_place, trt_module=trt_module)
    # every other setting is the option as given
    return Settings(**{f.name: resolved[f.name] if f.name in resolved else getattr(o, f.name)
                       for f in fields(Settings)})


@checked_fields
@dataclass(frozen=True)
class DecodeParams:
    """How one request's lists are decoded. None: the engines' default (manifest) or the runtime's rule."""

    speculate: str = "chain"  # off (AR) | chain | tree | auto (the calibrated fastest, see Recommender.calibrate)
    draft_steps: int | None = None  # K: draft tokens per round (chain), tree depth (tree)
    tree_topk: int | None = None  # tree: children per expanded node and nodes expanded per depth
    tree_size: int | None = None  # tree: draft tokens verified per round
    greedy: bool = True  # False: sample (temperature, top_k, top_p, seed)
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every allowed token
    top_p: float = 1.0  # 1.0 keeps every allowed token
    seed: int = 0
    fused_chain: bool = True  # greedy chain rounds at the exported K run the one-call draft_chain graph
    device_rounds: bool | None = None  # fused chain rounds queued on the device (None: the runtime's rule)
    deadline_s: float | None = None  # cut the request with a DeadlineError past this many seconds

    def __post_init__(self):
        _validate(self, {"speculate": dict(kind="str", choices=SPECULATE),
                         "draft_steps": dict(kind="int", lo=1, hi=16, optional=True),
                         "tree_topk": dict(kind="int", lo=1, hi=64, optional=True),
                         "tree_size": dict(kind="int", lo=1, hi=1024, optional=True),
                         "greedy": dict(kind="bool"),
                         "temperature": dict(kind="float", lo=1e-4, hi=1e4),
                         "top_k": dict(kind="int", lo=0, hi=1 << 20),
                         "top_p": dict(kind="float", lo=1e-6, hi=1.0),
                         "seed": dict(kind="int", lo=0, hi=(1 << 63) - 1),
                         "fused_chain": dict(kind="bool"),
                         "device_rounds": dict(kind="bool", optional=True),
                         "deadline_s": dict(kind="float", lo=1e-6, optional=True)})

    def plan(self, limits: dict, device_rounds_default: bool) -> DecodeConfig:
        """The loop's DecodeConfig: the manifest's defaults for what is left out (`auto` resolved before)."""
        if self.speculate == "auto":
            raise InputError("speculate='auto': resolved by Recommender from its calibration | call "
                             "Recommender.recommend, not DecodeParams.plan")
        return DecodeConfig(speculate=self.speculate, draft_steps=self.draft_steps or limits["draft_steps"],
                            tree_topk=self.tree_topk or limits["tree_topk"],
                            tree_size=self.tree_size or limits["tree_size"],
                            sampling=SamplingConfig(self.greedy, self.temperature, self.top_k, self.top_p),
                            seed=self.seed, fused_chain=self.fused_chain,
                            device_rounds=device_rounds_default if self.device_rounds is None else self.device_rounds)


def request_cost(batch: int, list_tokens: int, cfg: DecodeConfig) -> int:
    """Upper bound of the tokens the target processes for a request: every row, every list token, each round
    verifying its root plus its draft tokens (a chain: K, a tree: tree_size)."""
    width = 1 if cfg.speculate == "off" else 1 + (cfg.tree_size if cfg.speculate == "tree" else cfg.draft_steps)
    return batch * list_tokens * width
