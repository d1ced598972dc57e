"""One-call GPU benchmark: train (or reuse) an LLM-scale target and its drafts on MovieLens,
export fp16 engines, then time our runtime (ONNX Runtime CUDA, device-resident KV) against PyTorch eager, the
strongest PyTorch a user would write (static KV cache + `torch.compile`, CUDA graphs: tools/torch_compiled.py),
Hugging Face `generate`, and the weight-bandwidth floor, all on one card. This file drives the run and holds our
runtime's sections; the PyTorch baselines are in tools/gpu_baselines.py.

    bash tools/gpu_bench.sh          # on the GPU machine (see the script); results -> $OUT/gpu_bench.json|png

`--size` picks the target's shape (qwen-0.5b, qwen-1.5b, qwen-7b: padrec_export/sizes.py). Stages (target, drafts,
export, bench) skip what `--work` already holds, and training pauses before `--budget-s` runs out, so a 7B pair is
made over several calls of the same command (docs/llm_pairs.md). `--small` runs the whole thing on CPU with a tiny
model (a smoke test of this script, not a benchmark).
"""
import argparse
import cProfile
import dataclasses
import faulthandler
import io
import json
import pstats
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from padrec_export.bench import hardware
from padrec_export.data import load_dataset, make_split
from padrec_export.pipeline import DRAFTS, export_checkpoints
from padrec_export.sizes import RECIPES, SIZES
from padrec_export.quantize import parse_quantize
from padrec_export.stages import ExportPlan, Job, engine_dirs, run_stages
from padrec_export.trainer import Budget
from padrec_runtime.api.adaptive import choose
from padrec_runtime import DecodeParams, PadrecError, Recommender, RuntimeOptions
from padrec_runtime.api.recommender import RecommendResult
from padrec_runtime.trace import CallCounter
from bench_timing import alternate, log, timed
from gpu_baselines import bench_baselines


def job_from_args(args) -> tuple[Job, ExportPlan]:
    """The pair this call works on (shape by --size, the size's recipe with the options given) and its engines."""
    name = "tiny" if args.small else args.size
    overrides = {"lr": args.lr, "draft_lr": args.draft_lr, "weights": args.weights, "batch_tokens": args.batch_tokens,
                 "micro_batch": args.micro_batch, "checkpointing": args.checkpointing}
    recipe = dataclasses.replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
    job = Job(Path(args.work), name, recipe, epochs=args.epochs, draft_epochs=args.draft_epochs,
              draft_train_steps=args.draft_train_steps, device="cpu" if args.small else "cuda",
              users=40 if args.small else None, drafts=tuple(getattr(args, "drafts", DRAFTS)))
    precision = args.precision or ("fp32" if args.small else "fp16")
    quantization = parse_quantize(args.quantize, args.quantize_block, args.quantize_draft)
    return job, ExportPlan(precision, max_seq_len=256, max_history=20, max_batch=64, draft_steps=args.draft_steps,
                           quantization=quantization)


def close(*recs) -> None:
    """Free recommenders' engines and device caches now (their queued device work finishes first)."""
    for rec in recs:
        if rec is not None:
            rec.close()


def each(rec, hists: list, **opts):
    """Recommend for `hists` one request per history (batch 1 over several users); the results merged:
    every list, tau over all rounds, rounds and phase times summed."""
    res = [rec.recommend([h], params=DecodeParams(**opts)) for h in hists]
    committed = [c for r in res for c in r.committed]
    flat = [n for row in committed for n in row]
    time_s = {k: sum(r.time_s[k] for r in res) for k in res[0].time_s}
    return RecommendResult([r.lists[0] for r in res], float(np.mean(flat)), sum(r.rounds for r in res), committed,
                           time_s)


def first_differences(lists: list, ar_lists: list) -> list:
    """Where each list that differs from AR's first leaves it: row (= index into the histories), position,
    AR's token there, the list's token, and AR's tokens before it."""
    out = []
    for row, (got, ar) in enumerate(zip(lists, ar_lists)):
        if got != ar:
            at = next((i for i, (a, b) in enumerate(zip(got, ar)) if a != b), min(len(got), len(ar)))
            out.append({"row": row, "at": at, "ar": ar[at] if at < len(ar) else None,
                        "got": got[at] if at < len(got) else None, "prefix": ar[:at]})
    return out


def union(spans: list) -> list:
    """Merged, sorted (start, end) intervals."""
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def gpu_timeline(fn) -> dict:
    """What the GPU did while fn ran (CUPTI through torch.profiler; it sees ONNX Runtime's and cupy's work,
    CUDA-graph replays included): wall ms, ms with at least one kernel or copy running, the rest idle."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(b - a for a, b in union(spans))  # us
    return {"wall_ms": wall_ms, "gpu_busy_ms": busy / 1e3, "gpu_idle_pct": 100 * (1 - busy / 1e3 / wall_ms),
            "gpu_ops": len(spans)}


# -- options ---------------------------------------------------------------------------------------------------------
def add_run_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("run")
    g.add_argument("--work", required=True, help="scratch directory for models and engines (reused across calls)")
    g.add_argument("--out", default="benchmarks/results")
    g.add_argument("--catalogue", default="padrec_export/default_models/ml-100k/catalogue.json")
    g.add_argument("--small", action="store_true", help="CPU smoke run with a tiny model (--size tiny on CPU)")
    g.add_argument("--size", choices=list(SIZES), default="qwen-0.5b", help="target shape (sizes.SIZES)")
    g.add_argument("--stages", default="train,export,bench")
    g.add_argument("--drafts", type=drafts_arg, default=",".join(DRAFTS),
                   help=f"the drafts trained, exported and benched, of {', '.join(DRAFTS)} (padrec first); "
                        "the eagle section needs both")


def add_train_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("training (default: the size's recipe, padrec_export/sizes.py)")
    g.add_argument("--epochs", type=int, default=2, help="target epochs")
    g.add_argument("--draft-epochs", type=int, default=8, help="epochs of each draft (PAD-Rec and EAGLE alike)")
    g.add_argument("--budget-s", type=float, default=None,
                   help="seconds this call may train before it saves its state and stops (a device call's limit, "
                        "less the saving); rerun the same command to continue  [default: 540, none with --small]")
    g.add_argument("--lr", type=float, help="target's peak learning rate (default: the size's recipe)")
    g.add_argument("--draft-lr", type=float, help="drafts' peak learning rate (default: the size's recipe)")
    g.add_argument("--weights", choices=["float32", "bfloat16"], help="target weights while training")
    g.add_argument("--batch-tokens", type=int, help="tokens per optimizer step")
    g.add_argument("--micro-batch", type=int, help="sequences per target forward (gradients accumulated)")
    g.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each target layer in backward")
    g.add_argument("--draft-train-steps", type=int, default=8, help="steps the drafts are unrolled in training")


def add_export_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("export")
    g.add_argument("--precision", choices=["fp16", "bf16", "fp32"], help="engines' precision (default fp16; "
                                                                         "fp32 with --small)")
    g.add_argument("--draft-steps", type=int, default=7, help="K of the engines (and of the fused chain graph)")
    g.add_argument("--quantize", choices=["none", "int4", "int8"], default="none",
                   help="weight-only quantization of the target's decoder layers (engines in eng_<draft>_<kind>)")
    g.add_argument("--quantize-block", type=int, default=32, help="weights per scale of --quantize")
    g.add_argument("--quantize-draft", action="store_true", help="also quantize the draft's decoder layer")


def add_bench_options(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("bench")
    g.add_argument("--batches", default="1,8,32,64")
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--b1-users", type=int, default=8, help="batch-1 rows: requests from this many users in turn")
    g.add_argument("--depths", default="6,8", help="fused-chain depths compared at batch 1 with the default K "
                                                   "(engines exported for each; '' for none)")
    g.add_argument("--compile-modes", default="reduce-overhead,max-autotune",
                   help="torch.compile modes of the static-KV PyTorch baseline ('eager': none); CPU runs eager")
    g.add_argument("--quick", action="store_true",
                   help="only the default runtime configuration (no dynamic / static-without-graphs rows)")
    g.add_argument("--sections", type=sections_arg, default=",".join(SECTIONS),
                   help="what the bench runs, of: " + "; ".join(f"{k}: {v}" for k, v in SECTIONS.items())
                        + ". A 7B pair's 10-minute call holds headline,batches, or pytorch alone "
                          "(its load and compile: ~4 min)")


SECTIONS = {  # --sections: name -> what it runs (main, in this order)
    "configs": "the runtime configurations at batch 1 and 8 (without it: the default one's AR and chain rows)",
    "headline": "AR against the default speculation at batch 1, alternating",
    "host": "graph op counts, launch times, GPU timeline and host profiles at batch 1",
    "eager": "PyTorch eager, the same loop",
    "pytorch": "torch.compile static-KV AR and chain, Hugging Face generate, the weight floor",
    "batches": "every draft at every batch, then speculate='auto'",
    "depths": "other chain depths at batch 1",
    "eagle": "PAD-Rec against EAGLE at batch 1, alternating"}


def drafts_arg(text: str) -> list:
    got = [d for d in text.split(",") if d]
    if not got or set(got) - set(DRAFTS) or got[0] != "padrec" or len(set(got)) < len(got):
        raise argparse.ArgumentTypeError(f"got {text!r} | expected padrec, then any others of {', '.join(DRAFTS)}")
    return got


def sections_arg(text: str) -> set:
    got = {s for s in text.split(",") if s}
    if not got or got - set(SECTIONS):
        raise argparse.ArgumentTypeError(f"got {text!r} | expected a comma-separated subset of {', '.join(SECTIONS)}")
    return got


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    for add in (add_run_options, add_train_options, add_export_options, add_bench_options):
        add(ap)
    args = ap.parse_args(argv)
    if "bench" in args.stages.split(",") and "eagle" in args.sections and "eagle" not in args.drafts:
        ap.error("--sections eagle: compares PAD-Rec with EAGLE | add eagle to --drafts, or drop the section")
    return args


# -- the pair: training and export stages ----------------------------------------------------------------------------
def start_report(job: Job) -> dict:
    """The report's head: the machine, the target's shape and, on CUDA, the card."""
    report = {"hardware": hardware(), "size": SIZES[job.size].__dict__, "size_name": job.size}
    if job.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
        log("gpu", report["gpu"])
    return report


def make_pair(args, job: Job, plan: ExportPlan, report: dict) -> bool:
    """Run the training and export stages of --stages (each skips what --work holds; training pauses before
    --budget-s runs out) and add their train report to `report`. True when the bench should run: nothing
    paused and --stages names it."""
    job.models.mkdir(parents=True, exist_ok=True)
    if not (job.models / "catalogue.json").exists():
        shutil.copy(args.catalogue, job.models / "catalogue.json")
    stages = args.stages.split(",")
    try:
        budget = Budget(args.budget_s if args.budget_s or args.small else 540)
        done = run_stages(job, plan, stages, budget, log)
    except PadrecError as exc:  # out of GPU memory, a stage run out of order: one line, exit 1
        log(f"error: {exc}")
        raise SystemExit(1)
    if (job.models / "train_report.json").exists():
        report["train"] = json.loads((job.models / "train_report.json").read_text())
    return not done["paused"] and "bench" in stages


# -- what every bench section shares ---------------------------------------------------------------------------------
def mode_opts(mode) -> dict:
    """recommend() options of a bench mode: chain runs fused chain rounds from the host (device_rounds off),
    chain-dev with device_rounds (the runtime's CUDA default, as in every other speculative row), chain-loop
    the chain's draft step by step (K engine calls), not the fused graph."""
    return {"chain": dict(speculate="chain", device_rounds=False),
            "chain-loop": dict(speculate="chain", fused_chain=False, device_rounds=False),
            "chain-dev": dict(speculate="chain", device_rounds=True)}.get(mode, dict(speculate=mode))


def call_name(key) -> str:
    """A CallCounter key as the report names it: graph/T<bucket> (TNone: the dynamic session)."""
    _, graph, bucket = key
    return f"{graph}/T{bucket}"


@dataclasses.dataclass
class Bench:
    """The bench's shared state: where results go, the histories every section runs, the report and its rows
    (the JSON is rewritten after every row, so a run cut short keeps what it measured)."""

    out: Path  # results directory: gpu_bench.json, profile_b1_<mode>.txt
    device: str  # cuda | cpu
    users: list  # batch 1: one request per user, in turn; times are per list
    hist_all: list  # batch B: the first B of these in one request
    repeats: int  # timed rounds (at least 5 or 9 where the section says)
    report: dict  # filled section by section; ar_tokens (AR's lists per batch) is dropped when written
    rows: list = dataclasses.field(default_factory=list)  # one per engine, mode and batch
    counters: dict = dataclasses.field(default_factory=dict)  # id(Recommender) -> its CallCounter

    def add(self, engine, mode, batch, ms, tau=None, extra=None) -> None:
        """One result row, logged; the JSON rewritten with it. ms: per request (batch 1: one user's request,
        the users in turn; batch B: one request of B histories), as are the row's other times, samples and
        rounds; ms_per_list and lists_per_s count each of a request's lists."""
        row = {"engine": engine, "mode": mode, "batch": batch, "ms_per_request": ms, "ms_per_list": ms / batch,
               "lists_per_s": batch / ms * 1e3, "tau": tau, **(extra or {})}
        self.rows.append(row)
        log(json.dumps(row))
        self.save()

    def save(self) -> None:
        """Write the report as it stands (after every row and every section's entry)."""
        (self.out / "gpu_bench.json").write_text(json.dumps(
            {**{k: v for k, v in self.report.items() if k != "ar_tokens"}, "rows": self.rows}, indent=2) + "\n")

    @property
    def sync(self):
        return torch.cuda.synchronize if self.device == "cuda" else None

    def gpu_used_mib(self):
        if self.device != "cuda":
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20

    def open_rec(self, eng, **opts) -> Recommender:
        """A Recommender on the card with device caches (opts: RuntimeOptions fields), its engine calls counted."""
        counter = CallCounter()
        rec = Recommender(eng, device=self.device, options=RuntimeOptions(device_cache=True, **opts), tracer=counter)
        self.counters[id(rec)] = counter
        return rec

    def per_request(self, batch) -> int:
        """Requests in one timed pass: one per user at batch 1, one at batch B."""
        return len(self.users) if batch == 1 else 1

    def request(self, rec, batch, **opts):
        """One batch call, or at batch 1 one call per user (the time per list is then / len(users))."""
        if batch == 1:
            return each(rec, self.users, **opts)
        return rec.recommend(self.hist_all[:batch], params=DecodeParams(**opts))

    def same_as_ar(self, batch: int, lists: list) -> bool:
        return lists == self.report["ar_tokens"][batch]


def bench_histories(n: int) -> list:
    """The last 20 items of the first n ml-100k test histories at least that long."""
    test = [h for _, h, _ in make_split(load_dataset("ml-100k")).test]
    return [h[-20:] for h in test if len(h) >= 20][:n]


def run_modes(bench: Bench, rec, engine: str, name: str, batch: int, modes) -> None:
    """Time `modes` in turn (`alternate`: a slow spell of the machine hits them alike), after one pass of
    each that warms it up and counts the engine calls a list makes; a row each."""
    calls = {}
    counter = bench.counters[id(rec)]
    for mode in modes:
        counter.clear()
        bench.request(rec, batch, **mode_opts(mode))
        calls[mode] = {call_name(key): n / bench.per_request(batch) for key, n in counter.calls.items()}
    t, last = alternate({mode: (lambda o=mode_opts(mode): bench.request(rec, batch, **o)) for mode in modes},
                        bench.repeats)
    for mode in modes:
        res, ms = last[mode], float(np.median(t[mode])) / bench.per_request(batch)
        same = check_against_ar(bench, [r.tokens for r in res.lists], engine, name, mode, batch)
        split_ms = {k: v * 1e3 / bench.per_request(batch) for k, v in res.time_s.items()}
        rounds = res.rounds / bench.per_request(batch)
        bench.add(f"{engine}/{name}" if mode != "off" else engine, mode, batch, ms, res.tau,
                  {"identical_to_ar": same, "rounds": rounds, "split_ms": split_ms,
                   "verify_ms_per_round": split_ms["verify"] / (rounds + 1),
                   "host_ms_per_round": split_ms["host"] / max(rounds, 1), "engine_calls_per_request": calls[mode]})


def check_against_ar(bench: Bench, toks: list, engine: str, name: str, mode: str, batch: int) -> bool:
    """Whether lists equal AR's at this batch (the first AR lists of a batch are the reference); where they
    differ, the report's `mismatches` says where each list leaves AR's."""
    if mode == "off":
        bench.report.setdefault("ar_tokens", {}).setdefault(batch, toks)
    ar_tokens = bench.report["ar_tokens"]
    if toks == ar_tokens[batch]:
        return True
    bench.report.setdefault("mismatches", []).append(
        {"engine": engine, "draft": name, "mode": mode, "batch": batch,
         "rows": first_differences(toks, ar_tokens[batch]),
         "same_as_batch1_ar": toks == ar_tokens.get(1) if batch == len(bench.users) else None})
    log("lists differ from AR", json.dumps(bench.report["mismatches"][-1]))
    return False


# -- the bench's sections --------------------------------------------------------------------------------------------
def graph_ops(path: Path, work: Path, device: str) -> dict:
    """Node counts of a graph as exported and as ONNX Runtime's CUDA provider runs it (batch 1, 8 tokens)."""
    import collections

    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(work / "optimized.onnx")
    for dim, n in {"batch": 1, "seq": 8, "past": 256, "past_plus_seq": 264, "max_seq_len": 256}.items():
        so.add_free_dimension_override_by_name(dim, n)
    ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider"] if device == "cuda" else None)
    count = lambda m: dict(collections.Counter(n.op_type for n in m.graph.node).most_common())  # noqa: E731
    res = {"exported": count(onnx.load(str(path), load_external_data=False)),
           "optimized": count(onnx.load(str(work / "optimized.onnx"), load_external_data=False))}
    (work / "optimized.onnx").unlink()
    return res


def graph_op_counts(engine_dir: Path, work: Path, device: str) -> dict:
    """graph_ops of each graph of the engines (a graph that fails is logged and left out: a diagnostic only)."""
    out = {}
    for g in ("target", "target_gqa", "draft", "draft_chain", "draft_chain_gqa"):
        try:
            out[g] = graph_ops(engine_dir / f"{g}.onnx", work, device)
            log(g, "ops", json.dumps({k: sum(v.values()) for k, v in out[g].items()}), json.dumps(out[g]["optimized"]))
        except Exception as exc:  # a diagnostic only
            log(g, "ops: failed", exc)
    return out


def bench_runtime_configs(bench: Bench, engine_dir: Path, batches: list, quick: bool) -> tuple[str, dict]:
    """Our runtime, ONNX Runtime CUDA with device-resident KV, three ways: dynamic shapes (one session), static
    buckets without CUDA graphs, static buckets replaying CUDA graphs (the default on CUDA); each with the fused
    target (target_gqa, the default) but one: the standard target's graph, CUDA graphs. Every mode at batch 1
    and 8, the graph notes and GPU memory of each. Returns the last configuration that ran: (name, options)."""
    configs = {"padrec-ort-cuda-dynamic": dict(static_shapes=False),
               "padrec-ort-cuda-static": dict(static_shapes=True, cuda_graphs=False),
               "padrec-ort-cuda-standard-target": dict(in_place=False),
               "padrec-ort-cuda": dict()}
    if bench.device != "cuda":
        configs = {k: dict(v, static_shapes=True) for k, v in configs.items() if k.endswith(("cuda", "target"))}
    if quick:
        configs = {k: v for k, v in configs.items() if k.endswith(("cuda", "target"))}
    report = bench.report
    report["graph_notes"], report["gpu_mem_mib"] = {}, {}
    best = rec = None
    for engine, opts in configs.items():
        try:
            rec = bench.open_rec(engine_dir, **opts)
            for batch in [b for b in (1, 8) if b in batches]:
                run_modes(bench, rec, engine, "padrec", batch, ["off", "chain", "chain-dev", "chain-loop", "tree"])
            report["graph_notes"][engine] = [n for b in rec.backends.values() for n in b.graph_notes]
            report["gpu_mem_mib"][engine] = bench.gpu_used_mib()
            log(engine, report["graph_notes"][engine])
            best = (engine, opts)
        except Exception as exc:  # a configuration that fails on this card is reported, the others still run
            report["graph_notes"][engine] = [f"failed: {type(exc).__name__}: {str(exc)[:500]}"]
            log(engine, "FAILED", exc)
        rec = close(rec)
    return best


def bench_headline_b1(bench: Bench, rec) -> dict:
    """The headline at batch 1: AR and the default speculation (chain, device rounds) timed in turn, several
    rounds, so a slow spell of the machine hits both alike (the table's rows run one after the other)."""
    users = bench.users
    each(rec, users, speculate="chain")
    t, last = alternate({"ar": lambda: each(rec, users, speculate="off"),
                         "sd": lambda: each(rec, users, speculate="chain")}, max(9, bench.repeats))
    med = {k: float(np.median(v)) / len(users) for k, v in t.items()}
    headline = {"ar_ms": med["ar"], "sd_ms": med["sd"], "speedup": med["ar"] / med["sd"],
                "sd_tau": last["sd"].tau, "rounds_per_list": last["sd"].rounds / len(users),
                "identical_to_ar": bench.same_as_ar(1, [r.tokens for r in last["sd"].lists]),
                "samples_ms_per_list": {k: [x / len(users) for x in v] for k, v in t.items()}}
    log("headline b1", json.dumps({k: v for k, v in headline.items() if k != "samples_ms_per_list"}))
    return headline


def launch_ms(bench: Bench, rec, mode: str) -> dict:
    """Host ms of one engine run call (it returns once queued), per graph and bucket, over two passes."""
    each(rec, bench.users, **mode_opts(mode))
    counter = bench.counters[id(rec)]
    counter.clear()
    for _ in range(2):
        each(rec, bench.users, **mode_opts(mode))
    return {call_name(key): counter.launch_s[key] / n * 1e3 for key, n in counter.calls.items()}


def host_profile(bench: Bench, rec, mode: str) -> str:
    """cProfile of two batch-1 passes, the 30 costliest functions by own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2):
        each(rec, bench.users, **mode_opts(mode))
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()


def bench_host_critical_b1(bench: Bench, rec) -> None:
    """Where a batch-1 round's time goes, per mode: launch ms per engine call, on CUDA the GPU's busy and idle
    time, and for the speculative modes a cProfile of the host (text next to the JSON)."""
    bench.report["launch_ms_b1"] = {}
    for mode in ("off", "chain", "chain-dev", "tree"):
        bench.report["launch_ms_b1"][mode] = launch_ms(bench, rec, mode)
        log("launch ms", mode, json.dumps(bench.report["launch_ms_b1"][mode]))
        if bench.device == "cuda":
            try:
                timeline = gpu_timeline(lambda: each(rec, bench.users, **mode_opts(mode)))
            except Exception as exc:  # a diagnostic only
                timeline = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            bench.report.setdefault("gpu_timeline_b1", {})[mode] = timeline
            log("gpu timeline", mode, json.dumps(timeline))
        if mode != "off":
            (bench.out / f"profile_b1_{mode}.txt").write_text(host_profile(bench, rec, mode))


def bench_adaptive(bench: Bench, rec, engine: str, batches: list) -> None:
    """Adaptive speculation: calibrate on the bench's histories, then speculate="auto" and AR timed alternately
    (both see the same machine state) at each batch; a row each, with the plan's pick."""
    plan = rec.calibrate(bench.hist_all, batches, repeats=3)
    bench.report["adaptive_plan"] = [c.__dict__ for c in plan]
    for batch in batches:
        t, last = alternate({"auto": lambda: bench.request(rec, batch, speculate="auto"),
                             "ar": lambda: bench.request(rec, batch, speculate="off")}, max(9, bench.repeats))
        t_ar, res = [v / bench.per_request(batch) for v in t["ar"]], last["auto"]
        ms, ar = float(np.median(t["auto"])) / bench.per_request(batch), float(np.median(t_ar))
        pick = choose(plan, batch)
        noise = float(np.std(t_ar) / ar)
        bench.add(f"{engine}/auto", "auto", batch, ms, res.tau,
                  {"ar_ms": ar, "pick": [pick.speculate, pick.draft_steps, pick.device_rounds], "ar_rel_std": noise,
                   "not_slower_than_ar": ms <= ar * (1 + max(2 * noise, 0.01)),
                   "samples_ms": {"auto": [v / bench.per_request(batch) for v in t["auto"]], "ar": t_ar}})


def bench_batches(bench: Bench, engines: dict, engine: str, opts: dict, batches: list, padrec) -> None:
    """Every draft's engines in the chosen configuration at every batch (PAD-Rec's batch 1 and 8 ran with the
    configurations), then adaptive speculation on PAD-Rec's. padrec: PAD-Rec's open recommender."""
    for name, eng in engines.items():
        rec = padrec if name == "padrec" else bench.open_rec(eng, **opts)
        for batch in batches:
            if name == "padrec" and batch in (1, 8):
                continue  # measured with the configurations
            ar = name == "padrec" and batch not in bench.report.get("ar_tokens", {})  # not timed before the PyTorch rows
            run_modes(bench, rec, engine, name, batch, (["off"] if ar else []) + ["chain", "tree"])
        if name == "padrec":
            bench_adaptive(bench, rec, engine, batches)
        else:
            close(rec)


def bench_step_depths_b1(bench: Bench, rec, engine: str) -> None:
    """Other depths at batch 1, the draft step by step (trained with --draft-train-steps unrolled steps; deeper
    steps reuse the last step embedding); the default K ran the fused chain graph."""
    for K in (2, 4, 6):
        res, ms = timed(lambda: each(rec, bench.users, speculate="chain", draft_steps=K), bench.repeats)
        bench.add(f"{engine}/padrec", f"chain K={K}", 1, ms / len(bench.users), res.tau,
                  {"identical_to_ar": bench.same_as_ar(1, [r.tokens for r in res.lists]),
                   "rounds": res.rounds / len(bench.users)})


def export_depths(job: Job, plan: ExportPlan, depths: str) -> dict:
    """K -> PAD-Rec engines whose fused chain graph runs K steps: the default K's, and one exported (once, into
    --work) for each other K of --depths."""
    out = {plan.draft_steps: engine_dirs(job, plan)["padrec"]}
    for K in [int(k) for k in depths.split(",") if k]:
        if K != plan.draft_steps:
            out[K] = out[plan.draft_steps].with_name(f"{out[plan.draft_steps].name}_k{K}")
            if not (out[K] / "manifest.json").exists():
                export_checkpoints(job.models / "target", job.models / "draft_padrec", out[K], plan.precision,
                                   max_seq_len=plan.max_seq_len, max_history=plan.max_history,
                                   max_batch=plan.max_batch, draft_steps=K, quantization=plan.quantization)
    return out


def bench_fused_depths_b1(bench: Bench, depth: dict, opts: dict, padrec) -> dict:
    """The fused chain's depth at batch 1: the engines of each K timed alternately (padrec: the default K's open
    recommender, `depth`'s first entry), each warmed up first."""
    default = next(iter(depth))
    recs = {K: padrec if K == default else bench.open_rec(eng, **opts) for K, eng in depth.items()}
    for r in recs.values():
        each(r, bench.users, speculate="chain")
    t, last = alternate({K: (lambda r=r: each(r, bench.users, speculate="chain")) for K, r in recs.items()},
                        max(5, bench.repeats))
    res = {str(K): {"ms": float(np.median(t[K])) / len(bench.users), "tau": last[K].tau,
                    "identical_to_ar": bench.same_as_ar(1, [r.tokens for r in last[K].lists])} for K in recs}
    log("fused chain depth", json.dumps(res))
    close(*[r for K, r in recs.items() if K != default])
    return res


def bench_padrec_vs_eagle_b1(bench: Bench, engines: dict, opts: dict, padrec) -> dict:
    """PAD-Rec vs plain EAGLE wall time at batch 1: both loaded, timed alternately (same machine state).
    padrec: PAD-Rec's open recommender."""
    recs = {"padrec": padrec, "eagle": bench.open_rec(engines["eagle"], **opts)}
    res, ar = {}, bench.report.get("ar_tokens", {}).get(1)  # AR's lists where a section before timed them
    for mode in ("chain", "tree"):
        for r in recs.values():  # one untimed pass each: EAGLE's sessions are new, PAD-Rec's warm
            each(r, bench.users, speculate=mode)
        t, last = alternate({name: (lambda r=r: each(r, bench.users, speculate=mode)) for name, r in recs.items()},
                            max(5, bench.repeats))
        tau = {name: r.tau for name, r in last.items()}
        med = {name: float(np.median(v)) / len(bench.users) for name, v in t.items()}
        same = {name: None if ar is None else [x.tokens for x in r.lists] == ar for name, r in last.items()}
        res[mode] = {"ms": med, "tau": tau, "padrec_gain_pct": (med["eagle"] / med["padrec"] - 1) * 100,
                     "identical_to_ar": same}
        log("padrec vs eagle", mode, json.dumps(res[mode]))
    close(recs["eagle"])
    return res


def write_report(bench: Bench) -> None:
    bench.report["rows"] = bench.rows
    bench.report.pop("ar_tokens", None)
    (bench.out / "gpu_bench.json").write_text(json.dumps(bench.report, indent=2) + "\n")
    log("wrote", bench.out / "gpu_bench.json")


def main():
    faulthandler.enable()  # a crash inside a native library still names the Python line
    args = parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    job, plan = job_from_args(args)
    report = start_report(job)
    if not make_pair(args, job, plan, report):
        return
    missing = [str(eng) for eng in engine_dirs(job, plan).values() if not (eng / "manifest.json").exists()]
    if missing:
        raise SystemExit(f"bench: no engines in {', '.join(missing)} | run the export stage with the same --drafts, "
                         "or bench only the drafts exported (--drafts)")
    batches = [int(b) for b in args.batches.split(",")]
    hist_all = bench_histories(max(*batches, args.b1_users))  # batch 1 runs b1_users requests
    bench = Bench(Path(args.out), job.device, hist_all[:args.b1_users], hist_all, args.repeats, report)
    run_sections(bench, args, job, plan, batches)
    write_report(bench)


def run_sections(bench: Bench, args, job: Job, plan: ExportPlan, batches: list) -> None:
    """The bench's --sections in order (see SECTIONS); every one adds rows or a report entry. One recommender
    of the chosen configuration serves every section after the configurations: an LLM-sized engine directory
    takes a minute or more to load."""
    sections, report, engines = args.sections, bench.report, engine_dirs(job, plan)
    report["sections"] = sorted(sections)
    if "configs" in sections:
        engine, opts = bench_runtime_configs(bench, engines["padrec"], batches, args.quick)
        rec = bench.open_rec(engines["padrec"], **opts)
    else:  # the default configuration's rows at batch 1 and 8
        engine, opts = "padrec-ort-cuda", ({} if bench.device == "cuda" else dict(static_shapes=True))  # as configs
        rec = bench.open_rec(engines["padrec"], **opts)
        for batch in [b for b in (1, 8) if b in batches]:
            run_modes(bench, rec, engine, "padrec", batch, ["off", "chain", "chain-dev"])
        report["graph_notes"] = {engine: [n for b in rec.backends.values() for n in b.graph_notes]}
        report["gpu_mem_mib"] = {engine: bench.gpu_used_mib()}
    report["runtime"] = engine
    bench.save()
    if "headline" in sections:
        report["headline_b1"] = bench_headline_b1(bench, rec)
        bench.save()
    if "host" in sections:
        report["graph_ops"] = graph_op_counts(engines["padrec"], job.work, job.device)
        bench_host_critical_b1(bench, rec)
        bench.save()
    if sections & {"eager", "pytorch"}:
        bench_pytorch(bench, args, job, rec, engine, batches)
        bench.save()
    if "batches" in sections:
        bench_batches(bench, engines, engine, opts, batches, rec)
        bench.save()
    if "depths" in sections:
        bench_step_depths_b1(bench, rec, engine)
        depths = export_depths(job, plan, args.depths)
        report["fused_chain_depth_b1"] = bench_fused_depths_b1(bench, depths, opts, rec)
        bench.save()
    if "eagle" in sections:
        report["padrec_vs_eagle_b1"] = bench_padrec_vs_eagle_b1(bench, engines, opts, rec)
        bench.save()
    close(rec)


def bench_pytorch(bench: Bench, args, job: Job, rec, engine: str, batches: list) -> None:
    """PyTorch: eager, the strongest a user would write (static KV cache + torch.compile; eager on CPU smoke
    runs), Hugging Face generate, the weight-bandwidth floor; each checked against our AR lists (timed first
    where the sections before did not)."""
    for batch in [b for b in batches if b <= 8 and b not in bench.report.get("ar_tokens", {})]:
        run_modes(bench, rec, engine, "padrec", batch, ["off"])
    modes = [None if m == "eager" else m for m in args.compile_modes.split(",")] if job.device == "cuda" else [None]
    bench_baselines(bench, job.models, batches, args.draft_steps, modes if "pytorch" in args.sections else [],
                    eager="eager" in args.sections)

if __name__ == "__main__":
    main()
