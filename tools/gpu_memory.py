"""GPU memory of the runtime by component, per way of holding its CUDA-graph sessions, on one engine directory
(e.g. one that `tools/gpu_llm.py --export-only` left in --work). Each variant runs in a process of its own (ONNX
Runtime's shared arena never shrinks, so variants in one process would count each other's): the recommender as a
user loads it, AR and chain at batch 1, 8, 32 and 64 in turn, and after each the GPU memory in use beyond the
weights and KV caches, against the ceiling weights + KV caches + 25%, both after the request and at its peak
(sampled while the batch's first AR and chain requests ran: sessions opened, graphs captured, prefills). Every
session opened is logged with the memory it took, and so is the first run of each session and CUDA graph id
(`first_runs`) and, per session and kind (`run_kind`: outside any graph, capture, replay, a plain session's first
or later run, a tuning twin's), what the runs of a batch's first requests added (`run_sums`; by cause in
`by_cause_so_far`), and what those requests added outside every run (`<mode>_first_outside_runs_mb`); the lists
of every variant and mode are checked against the first variant's AR lists (by digest). `--device cpu` is a smoke
run over the GPU's code path (no memory figures).

    PYTHONPATH=/tmp/gpusite:$PWD python3 tools/gpu_memory.py --engines /tmp/w7/qwen-7b --out "$OUT"

Writes OUT/gpu_memory_<engine dir name>.json (after every variant).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_timing import log  # noqa: E402

HEADROOM = 1.25  # the ceiling: weights + KV caches + 25%
@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of holding the runtime's memory: RuntimeOptions keywords, the child process's environment, and CUDA
    provider options for the sessions that capture CUDA graphs (an experiment's hook, not a runtime setting)."""

    options: dict
    env: dict = dataclasses.field(default_factory=dict)
    graph_cuda: dict = dataclasses.field(default_factory=dict)


LEAN = {"graph_sessions": "per_graph", "cuda_graph_max_tokens": 16}  # the memory runs' base settings
CAP = {"cublas_workspace_mib": 4}
# every session opened took 72-178 MB at creation whatever the model's size, about what cuBLAS's default workspace on
# Hopper (32 MiB a handle) and its cuBLASLt twin would make: the _cublas variants cap it (their ms per list say what
# the cap costs: split-K GEMMs use the workspace), through the environment (_4mb) or the runtime's setting (_option)
CUBLAS_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"}
VARIANTS = {
    "per_shape": Variant({}),
    "per_shape_graph_max_16": Variant({"cuda_graph_max_tokens": 16}),
    "per_graph": Variant({"graph_sessions": "per_graph"}),
    "per_graph_graph_max_16": Variant(LEAN),
    "per_graph_graph_max_16_cublas_4mb": Variant(LEAN, env=CUBLAS_ENV),
    "single_graph_max_16": Variant({"graph_sessions": "single", "cuda_graph_max_tokens": 16}),
    # the standard graphs alone: no second graph family (ONNX Runtime's GroupQueryAttention refuses several new
    # tokens a row for a batch above 1, so the in-place graphs serve only part of a batch's calls)
    "per_graph_graph_max_16_standard": Variant({**LEAN, "in_place": False}),
    "per_graph_graph_max_16_standard_cublas_4mb": Variant({**LEAN, "in_place": False}, env=CUBLAS_ENV),
    "per_graph_graph_max_16_cublas_option": Variant({**LEAN, **CAP}),
    # graphed arenas grown by what is asked instead of in doubling regions (their first runs took 128-164 MB a
    # session at batch 1, 1.5B pair, H100)
    "per_graph_graph_max_16_cublas_option_exact_arena": Variant(
        {**LEAN, **CAP}, graph_cuda={"arena_extend_strategy": "kSameAsRequested"}),
    # ONNX Runtime's GEMM tuning (RuntimeOptions.gemm_tuning): off, or apart from the graphed sessions' arenas
    "per_graph_graph_max_16_cublas_option_tune_off": Variant({**LEAN, **CAP, "gemm_tuning": "off"}),
    "per_graph_graph_max_16_cublas_option_tune_apart": Variant({**LEAN, **CAP, "gemm_tuning": "apart"}),
    "per_graph_graph_max_16_tune_apart": Variant({**LEAN, "gemm_tuning": "apart"}),
    # no plain prefill sessions (prefill runs in the graphed sessions, outside any graph), tuning kept out of them
    "single_graph_max_16_cublas_option_tune_apart": Variant({"graph_sessions": "single", "cuda_graph_max_tokens": 16,
                                                             **CAP, "gemm_tuning": "apart"}),
    # prefill windows of 4 rows: half the windows' buffers and prefill activations, twice the prefill calls
    "per_graph_graph_max_16_cublas_option_tune_apart_rows_4": Variant({**LEAN, **CAP, "gemm_tuning": "apart",
                                                                       "prefill_rows": 4}),
    "single_graph_max_16_cublas_option_tune_apart_rows_4": Variant({"graph_sessions": "single",
                                                                    "cuda_graph_max_tokens": 16, **CAP,
                                                                    "gemm_tuning": "apart", "prefill_rows": 4}),
    # prefill buckets on one dynamic-shape session per graph (no plain session per prefill shape), on the shared arena
    "pair_graph_max_16_cublas_option_tune_apart": Variant({"graph_sessions": "pair", "cuda_graph_max_tokens": 16,
                                                           **CAP, "gemm_tuning": "apart"}),
    "pair_graph_max_16_cublas_option_tune_apart_rows_4": Variant({"graph_sessions": "pair",
                                                                  "cuda_graph_max_tokens": 16, **CAP,
                                                                  "gemm_tuning": "apart", "prefill_rows": 4}),
    "pair_graph_max_16_cublas_option_tune_apart_rows_2": Variant({"graph_sessions": "pair",
                                                                  "cuda_graph_max_tokens": 16, **CAP,
                                                                  "gemm_tuning": "apart", "prefill_rows": 2}),
    # no GEMM tuning: no tuning twin, whose arena (the tuning's scratch) lifts a batch's first request
    "pair_graph_max_16_cublas_option_tune_off_rows_2": Variant({"graph_sessions": "pair", "cuda_graph_max_tokens": 16,
                                                                **CAP, "gemm_tuning": "off", "prefill_rows": 2}),
    "pair_graph_max_16_cublas_option_tune_off_rows_4": Variant({"graph_sessions": "pair", "cuda_graph_max_tokens": 16,
                                                                **CAP, "gemm_tuning": "off", "prefill_rows": 4}),
    # fewer graphed buckets (calls of 9-16 tokens a row run on the shared arena)
    "per_graph_graph_max_8_cublas_option_tune_apart": Variant({**LEAN, "cuda_graph_max_tokens": 8, **CAP,
                                                               "gemm_tuning": "apart"}),
}


DEVICE = "cuda"  # --device cpu: a smoke run of this script (no memory figures)


SOURCES: set = set()  # where device_used read its figures: "process" (NVML, this process) or "device" (all)


def device_used() -> int:
    """Bytes this process holds on the GPU (NVML's per-process figure: other work on the card, e.g. training
    in the background, does not count), or all the card's used bytes where NVML does not list this process;
    0 on the CPU. Call `cuda_context()` first, so that the process is on the card from the first reading."""
    if DEVICE == "cpu":
        return 0
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        mine = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid() and p.usedGpuMemory]
        if mine:
            SOURCES.add("process")
            return int(mine[0])
    except Exception:  # no NVML here (pynvml raises its own types): the card's figure
        pass
    from cupy.cuda import runtime
    free, total = runtime.memGetInfo()
    SOURCES.add("device")
    return total - free


def cuda_context() -> None:
    """Put this process on the card (a CUDA context) before the first memory reading."""
    if DEVICE == "cuda":
        import cupy
        cupy.zeros(1)


WATCH = {"on": False, "mb": 0.0}  # every run measured while on (a batch's first requests); mb: what those runs added


def run_kind(graphed: bool, graph_id, n: int, twin: bool = False) -> str:
    """What the n-th run of (session, graph id) is: a tuning twin's one run (gemm_tuning="apart"; the twin goes
    after it, and its memory with it); on a CUDA-graph session a run outside any graph (id -1: every bucket's
    warm-up, and under graph_sessions="single" every prefill run), a capture (an id's first run) or a replay; on
    a plain session its first run or a later one."""
    if twin:
        return "twin"
    if not graphed:
        return "plain_first" if n == 1 else "plain_later"
    return "outside_graph" if graph_id == -1 else "capture" if n == 1 else "replay"


def watch_sessions(opened: list, first_runs: list, run_sums: list) -> None:
    """Log every ONNX Runtime session the backends open, with the device memory its creation took; the first run
    of each (session, CUDA graph id) with what it added; and per session and kind of run (`run_kind`) the sum of
    what its runs added, every run measured while WATCH is on (a batch's first requests) and each id's first run
    always. Together they split the memory beyond weights and KV caches by cause. An entry says whether its
    session is still held (`alive`, see `mark_alive`): a backend drops its load-time dynamic session once its
    buckets are set, and a tuning twin after its one run."""
    from padrec_runtime.backends.onnxruntime import OrtBackend
    open_session, run_bound, tuning_twin = OrtBackend._open, OrtBackend.run_bound, OrtBackend.tuning_twin
    made = weakref.WeakKeyDictionary()  # session -> its entry in `opened`
    runs = weakref.WeakKeyDictionary()  # session -> {CUDA graph id: runs so far}
    sums = weakref.WeakKeyDictionary()  # session -> {kind: its entry in run_sums}

    def _open(self, dims=None, cuda_graph=False):
        before = device_used()
        session = open_session(self, dims, cuda_graph)
        opened.append({"graph": self.graph_name, "dims": dims, "cuda_graph": cuda_graph,
                       "mb": (device_used() - before) / 2**20, "ref": weakref.ref(session)})
        made[session] = opened[-1]
        return session

    def _run_bound(self, graph, session, binding, options):
        graph_id = int(options.get_run_config_entry("gpu_graph_id")) if options is not None else None
        counts = runs.setdefault(session, {})
        n = counts[graph_id] = counts.get(graph_id, 0) + 1
        if n > 1 and not WATCH["on"]:
            return run_bound(self, graph, session, binding, options)
        before = device_used()
        run_bound(self, graph, session, binding, options)
        mb = (device_used() - before) / 2**20
        entry = made.get(session, {})
        graphed, twin = bool(entry.get("cuda_graph")), bool(entry.get("twin"))
        WATCH["mb"] += mb if WATCH["on"] and not twin else 0.0  # a twin's run goes back with the twin
        if n == 1:
            first_runs.append({"graph": graph, "dims": entry.get("dims"), "session_graphed": graphed,
                               "gpu_graph_id": graph_id, "mb": mb, "ref": weakref.ref(session)})
        kind, mine = run_kind(graphed, graph_id, n, twin), sums.setdefault(session, {})
        if kind not in mine:
            mine[kind] = {"graph": graph, "dims": entry.get("dims"), "kind": kind, "runs": 0, "mb": 0.0,
                          "ref": weakref.ref(session)}
            run_sums.append(mine[kind])
        mine[kind]["runs"] += 1
        mine[kind]["mb"] += mb

    def _tuning_twin(self, session, call):
        twin = tuning_twin(self, session, call)
        if twin is not None:
            made[twin]["twin"] = True
        return twin
    OrtBackend._open, OrtBackend.run_bound, OrtBackend.tuning_twin = _open, _run_bound, _tuning_twin


def mark_alive(*logs: list) -> None:
    """Set each logged entry's `alive` (its session still held by the runtime); JSON-ready: the weak references
    go."""
    for entries in logs:
        for e in entries:
            e["alive"] = e.pop("ref")() is not None


RUN_KINDS = ("outside_graph", "capture", "replay", "plain_first", "plain_later", "twin")


def by_cause(opened: list, run_sums: list) -> dict:
    """MB by cause: sessions held (graphed or plain; a session dropped gave its memory back), and what each kind
    of run (`run_kind`) added on the sessions held."""
    held = [s for s in opened if s["ref"]() is not None]  # during the run: mark_alive replaces the references
    live = [r for r in run_sums if r["ref"]() is not None]
    return {"sessions_graphed_mb": sum(s["mb"] for s in held if s["cuda_graph"]),
            "sessions_plain_mb": sum(s["mb"] for s in held if not s["cuda_graph"]),
            **{f"runs_{k}_mb": sum(r["mb"] for r in live if r["kind"] == k) for k in RUN_KINDS},
            "sessions_held": len(held)}


class Peak:
    """The most device_used() read while the block ran (NVML polled every 2 ms in a thread): a reading after a
    request misses what a prefill held on the shared arena before it shrank."""

    def __init__(self):
        self.bytes, self._stop = 0, threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, device_used())
            time.sleep(0.002)

    def __enter__(self):
        self.bytes = device_used()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.bytes = max(self.bytes, device_used())


def cupy_pool_bytes() -> tuple[int, int]:
    """Bytes cupy's default pool holds (KV caches, bound buffers and what their updates freed), and of those the
    bytes in use (the rest are freed blocks the pool keeps for reuse)."""
    if DEVICE == "cpu":
        return 0, 0
    import cupy
    pool = cupy.get_default_memory_pool()
    return pool.total_bytes(), pool.used_bytes()


def histories(cat, n: int, seed: int, length: int = 20) -> list:
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.choice(cat.item_ids, length, replace=False)] for _ in range(n)]


def graph_cuda_options(extra: dict) -> None:
    """Add `extra` to the CUDA provider options of every session that captures CUDA graphs."""
    from padrec_runtime.backends.onnxruntime import OrtBackend
    options = OrtBackend._options

    def _options(self, dims, cuda_graph):
        opts, providers = options(self, dims, cuda_graph)
        if cuda_graph and isinstance(providers[0], tuple):
            providers[0][1].update(extra)
        return opts, providers
    OrtBackend._options = _options


def run_variant(engines: Path, options: dict, batches: list, repeats: int = 1) -> dict:
    """One variant in this process: load, then AR and chain per batch; memory, ms per list (the median of
    `repeats` requests once everything is made) and lists."""
    from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
    opened, first_runs, run_sums = [], [], []
    watch_sessions(opened, first_runs, run_sums)
    cuda_context()
    base = device_used()
    t0 = time.perf_counter()
    if DEVICE == "cpu":  # the smoke run takes the GPU's code path: device caches (numpy) over static buckets
        options = {"device_cache": True, "static_shapes": True, **options}
    rec = Recommender(engines, device=DEVICE, options=RuntimeOptions(**options))
    out = {"options": options, "settings": dataclasses.asdict(rec.settings), "load_s": time.perf_counter() - t0,
           "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
           "after_load_gb": (device_used() - base) / 1e9, "batches": {}}
    for b in batches:
        hist = histories(rec.catalogue, b, b, min(20, rec.limits["max_history"]))
        row, peak = {}, {"first": 0, "steady": 0}
        for mode in ("off", "chain"):
            params = DecodeParams(speculate=mode)
            with Peak() as first:
                t0, before, WATCH["on"], WATCH["mb"] = time.perf_counter(), device_used(), True, 0.0
                rec.recommend(hist, params=params)  # sessions, captures
                # first_s includes an NVML reading around every run (WATCH): not comparable with reports before it
                row[f"{mode}_first_s"], WATCH["on"] = time.perf_counter() - t0, False
                # what the request added outside every engine run: sessions made, cupy's pool (buffers, KV caches)
                row[f"{mode}_first_outside_runs_mb"] = (device_used() - before) / 2**20 - WATCH["mb"]
            with Peak() as steady:  # requests once everything is made: what serving needs on top of the load
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    res = rec.recommend(hist, params=params)
                    times.append(time.perf_counter() - t0)
                row[f"{mode}_ms_per_list"] = float(np.median(times)) * 1e3 / b
            peak = {"first": max(peak["first"], first.bytes), "steady": max(peak["steady"], steady.bytes)}
            row[f"{mode}_tau"], row[f"{mode}_lists_sha256"] = res.tau, lists_digest([r.tokens for r in res.lists])
            row[f"after_{mode}_gb"] = (device_used() - base) / 1e9
        (mem, used), (pool, pool_used) = (rec.memory(), device_used() - base), cupy_pool_bytes()
        ceiling = HEADROOM * (mem["weights"] + mem["kv_caches"])
        row.update({"weights_gb": mem["weights"] / 1e9, "weights_allocated_gb": mem["weights_allocated"] / 1e9,
                    "kv_caches_gb": mem["kv_caches"] / 1e9,
                    "gpu_used_gb": used / 1e9, "rest_gb": (used - mem["weights"] - mem["kv_caches"]) / 1e9,
                    "cupy_pool_gb": pool / 1e9, "cupy_pool_used_gb": pool_used / 1e9, "ceiling_gb": ceiling / 1e9,
                    "peak_first_gb": (peak["first"] - base) / 1e9, "peak_steady_gb": (peak["steady"] - base) / 1e9,
                    "within_ceiling": used <= ceiling, "steady_peak_within_ceiling": peak["steady"] - base <= ceiling,
                    "sessions_so_far": len(opened), "by_cause_so_far": by_cause(opened, run_sums),
                    "buffers_mb": {k: round(v / 2**20, 1) for k, v in mem["cache_buffers"].items()}})
        out["batches"][b] = row
        log(b, json.dumps({k: v for k, v in row.items() if not k.endswith("_lists_sha256")}))
    mark_alive(opened, first_runs, run_sums)
    out["sessions"], out["first_runs"], out["run_sums"] = opened, first_runs, run_sums
    out["memory_source"] = sorted(SOURCES)
    out["graph_notes"] = [n for be in rec.backends.values() for n in getattr(be, "graph_notes", [])]
    rec.close()
    return out


def lists_digest(lists: list) -> str:
    """The sha256 of a batch's token lists: the report compares lists by it (the lists themselves made the
    committed reports megabytes)."""
    return hashlib.sha256(json.dumps(lists).encode()).hexdigest()


def check_lists(report: dict) -> dict:
    """Per variant: whether every list (AR and chain, every batch) equals the first variant's AR list."""
    variants = report["variants"]
    first = next(iter(variants.values()))
    same = {}
    for name, v in variants.items():
        same[name] = all(v["batches"][b][f"{mode}_lists_sha256"] == first["batches"][b]["off_lists_sha256"]
                         for b in v["batches"] for mode in ("off", "chain") if b in first["batches"])
    return same


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", required=True, type=Path)
    ap.add_argument("--out", default="benchmarks/results", type=Path)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke run of this script")
    ap.add_argument("--prefill-rows", type=int, default=None,
                    help="RuntimeOptions.prefill_rows for every variant (default: the runtime's); fewer lets small "
                         "engines take the windowed path")
    ap.add_argument("--repeats", type=int, default=1, help="timed requests per batch and mode (ms per list: median)")
    ap.add_argument("--tag", default="", help="added to the report's name (gpu_memory_<engines>[_<tag>].json)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one variant, print its JSON
    args = ap.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown} | choose from {', '.join(VARIANTS)}")
    batches = [int(b) for b in args.batches.split(",")]
    global DEVICE
    DEVICE = args.device
    if args.child:
        variant = VARIANTS[args.child]
        options = {**variant.options, **({"prefill_rows": args.prefill_rows} if args.prefill_rows else {})}
        graph_cuda_options(variant.graph_cuda)
        print("RESULT " + json.dumps(run_variant(args.engines, options, batches, args.repeats)))
        return
    gpu = "cpu"
    if DEVICE == "cuda":
        from cupy.cuda import runtime
        gpu = runtime.getDeviceProperties(0)["name"].decode()
    report = {"gpu": gpu, "engines": str(args.engines), "repeats": args.repeats, "variants": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_memory_{args.engines.name}{'_' + args.tag if args.tag else ''}.json"
    for name in args.variants.split(","):
        log(name, "start")
        proc = subprocess.run([sys.executable, __file__, "--engines", str(args.engines), "--batches", args.batches,
                               "--device", DEVICE, "--child", name, "--repeats", str(args.repeats),
                               *(["--prefill-rows", str(args.prefill_rows)] if args.prefill_rows else [])],
                              capture_output=True, text=True,
                              env={**os.environ, **VARIANTS[name].env})
        sys.stderr.write(proc.stderr[-3000:])
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        report["variants"][name] = (json.loads(lines[-1][7:]) if lines else
                                    {"failed": proc.returncode, "tail": (proc.stdout + proc.stderr)[-2000:]})
        done = {k: v for k, v in report["variants"].items() if "batches" in v}
        report["lists_equal_first_ar"] = check_lists({"variants": done}) if done else {}
        path.write_text(json.dumps(report, indent=1) + "\n")
        log(name, "done", json.dumps(report["lists_equal_first_ar"]))


if __name__ == "__main__":
    main()
