"""The runtime's CLI (no torch): `padrec recommend`, and the option groups every engine-running command shares."""
from __future__ import annotations

import json
import math
import re

import click

from ..errors import InputError, PadrecError
from .options import BACKENDS, DEVICES, GEMM_TUNING, GRAPH_SESSIONS, TRT_MODULES, DecodeParams, RuntimeOptions

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
_ID = re.compile(r"[0-9]+", re.ASCII)
INT64_MAX = 2**63 - 1  # ids and seeds travel as int64 (numpy, Triton)
INT32_MAX = 2**31 - 1


class PadrecGroup(click.Group):
    """A click group that prints a PadrecError's message and exits 1, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PadrecError as exc:
            raise click.ClickException(str(exc)) from None


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: nan passes every range comparison, so a plain FloatRange
    lets it through (a nan wait loops forever, a nan deadline fails every request)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"got {value!r} | expected a finite number in {self._describe_range()}", param, ctx)
        return rv


class OptionGroup:
    """Options several commands share (Polygraphy's argument groups): `add` decorates a command with them,
    `parse` takes their values out of the command's keyword arguments and builds the settings object."""

    names: tuple = ()  # the keyword arguments its options give the command
    options: tuple = ()  # click.option decorators

    def add(self, command):
        for option in reversed(self.options):
            command = option(command)
        return command

    def take(self, kwargs: dict) -> dict:
        return {k: kwargs.pop(k) for k in self.names}


class CudaMemoryArgs(OptionGroup):
    """How CUDA sessions hold GPU memory (RuntimeOptions): shared by the commands that run engines and by
    `padrec serve`."""

    names = ("cuda_graph_max_tokens", "graph_sessions", "cublas_workspace_mib", "gemm_tuning", "prefill_rows")
    options = (
        click.option("--cuda-graph-max-tokens", type=click.IntRange(1), default=None, show_default="every bucket",
                     help="CUDA: graphs only for static buckets of at most N tokens a row (decode steps, verifies); "
                          "prefill buckets share one arena instead (less GPU memory at LLM sizes)"),
        click.option("--graph-sessions", type=click.Choice(GRAPH_SESSIONS), default=None,
                     show_default=RuntimeOptions().graph_sessions,
                     help="CUDA graphs: a session per bucket shape (per_shape), one per engine graph (per_graph: "
                          "less GPU memory; pair: and one dynamic-shape session for its prefill buckets), or one for "
                          "every bucket (single)"),
        click.option("--cublas-workspace-mib", type=click.IntRange(1, 4096), default=None,
                     show_default="cuBLAS's: 32 a handle on Hopper",
                     help="CUDA: cuBLAS's workspace per handle for this process; 4 saves 0.25-0.5 GB at 1.5B"),
        click.option("--gemm-tuning", type=click.Choice(GEMM_TUNING), default=None,
                     show_default=RuntimeOptions().gemm_tuning,
                     help="CUDA: where ONNX Runtime tunes its GEMMs: in each session, apart (graphed sessions keep "
                          "no tuning scratch: 0.22-0.41 GB less at 1.5B, slower first calls), or off (the same, "
                          "and no first-request lift)"),
        click.option("--prefill-rows", type=click.IntRange(1, 1 << 16), default=None,
                     show_default=str(RuntimeOptions().prefill_rows),  # click shows no int beside a None default
                     help="device cache: a prompt's prefill runs at most N rows at a time (2-4: less GPU memory "
                          "at 1.5B batch 64, more prefill calls)"),
    )

    def parse(self, kwargs: dict) -> dict:
        """The RuntimeOptions keywords given (the rest stay the runtime's defaults)."""
        return {k: v for k, v in self.take(kwargs).items() if v is not None}


CUDA_MEMORY = CudaMemoryArgs()


class EngineArgs(OptionGroup):
    """Where and how engines run: --engines, --backend, --device and the RuntimeOptions."""

    names = ("engine_dir", "backend", "device", "threads", "trt_module", "allow_host_code", "device_cache",
             "static_shapes", "in_place", *CUDA_MEMORY.names)
    options = (
        click.option("--engines", "engine_dir", required=True, type=click.Path(),
                     help="engine directory written by `padrec export`"),
        click.option("--backend", type=click.Choice(BACKENDS), default="onnxruntime", help="inference backend"),
        click.option("--device", type=click.Choice(DEVICES), default="cpu", help="where the engines run"),
        click.option("--threads", type=click.IntRange(1, 1024), default=1,
                     help="ONNX Runtime CPU threads, at most the cores this process may use"),
        click.option("--trt-module", type=click.Choice(TRT_MODULES), default=None,
                     show_default="the plans' builder's: tensorrt_rtx for RTX-built plans, else tensorrt",
                     help="TensorRT runtime package (--backend tensorrt)"),
        click.option("--allow-host-code", is_flag=True, help="load TensorRT plans that embed host code"),
        click.option("--device-cache/--host-cache", default=None, show_default="device on CUDA",
                     help="KV cache on the engine's device (ONNX Runtime IO binding) or on the host"),
        click.option("--static-shapes/--dynamic-shapes", default=None, show_default="static on CUDA",
                     help="CUDA: fixed-shape bucket sessions replaying CUDA graphs (fastest for a service) or one "
                          "dynamic session (opens faster)"),
        click.option("--in-place/--standard-graphs", default=None,
                     show_default="in place with a device cache, where the engines have in-place graphs (not fp32 on "
                                  "CUDA)",
                     help="run causal calls on the in-place graphs (target_gqa, draft_chain_gqa) or the standard "
                          "graphs only"),
        *CUDA_MEMORY.options,
    )

    def parse(self, kwargs: dict) -> dict:
        """Recommender(**result): engine_dir, device, backend and options."""
        v = self.take(kwargs)
        device_cache = v["device_cache"]
        if device_cache is None and (v["static_shapes"] or v["in_place"]):
            device_cache = True  # both need the device cache: asking for them asks for it
        options = RuntimeOptions(threads=v["threads"], device_cache=device_cache, static_shapes=v["static_shapes"],
                                 in_place=v["in_place"], trt_module=v["trt_module"],
                                 allow_host_code=v["allow_host_code"], **CUDA_MEMORY.parse(v))
        return {"engine_dir": v["engine_dir"], "device": v["device"], "backend": v["backend"], "options": options}


class DecodeArgs(OptionGroup):
    """How lists are decoded: DecodeParams."""

    names = ("speculate", "draft_steps", "tree_topk", "tree_size", "mode", "temperature", "top_k", "top_p", "seed",
             "device_rounds")
    options = (
        click.option("--speculate", type=click.Choice(["off", "chain", "tree"]), default="chain",
                     help="off: target only (AR); chain or tree speculation"),
        click.option("--draft-steps", type=click.IntRange(1, 16), default=None, show_default="the engines' K",
                     help="draft tokens per round (K)"),
        click.option("--tree-topk", type=click.IntRange(1, 64), default=None, show_default="the engines'",
                     help="tree: children per expanded node"),
        click.option("--tree-size", type=click.IntRange(1, 1024), default=None, show_default="the engines'",
                     help="tree: draft tokens verified per round"),
        click.option("--mode", type=click.Choice(["greedy", "sample"]), default="greedy",
                     help="greedy lists, or sampled with the options below"),
        click.option("--temperature", type=FiniteFloatRange(1e-4, 1e4), default=1.0, help="sampling temperature"),
        click.option("--top-k", type=click.IntRange(0), default=0, help="sample among the k best (0: all)"),
        click.option("--top-p", type=FiniteFloatRange(1e-6, 1.0), default=1.0, help="nucleus sampling mass"),
        click.option("--seed", type=click.IntRange(0), default=0, help="sampling seed"),
        click.option("--device-rounds/--host-rounds", default=None, show_default="device up to 8 histories on CUDA",
                     help="greedy chain: queue each round's next draft chain on the device behind its verify pass"),
    )

    def parse(self, kwargs: dict) -> DecodeParams:
        v = self.take(kwargs)
        return DecodeParams(speculate=v["speculate"], draft_steps=v["draft_steps"], tree_topk=v["tree_topk"],
                            tree_size=v["tree_size"], greedy=v["mode"] == "greedy", temperature=v["temperature"],
                            top_k=v["top_k"], top_p=v["top_p"], seed=v["seed"], device_rounds=v["device_rounds"])


ENGINE, DECODE = EngineArgs(), DecodeArgs()


def parse_ids(text: str, what: str = "history") -> list:
    """Comma-separated ASCII integers ("12,7,301"); anything else, an empty field included ("1,,2": a dropped id
    would change the request silently), is an InputError naming the option and the value."""
    example = "12,7,301" if what == "history" else "1,8,32"
    parts = [x.strip() for x in text.split(",")]
    if not text.strip():
        raise InputError(f"--{what}: empty | expected comma-separated non-negative integers, e.g. {example}")
    if "" in parts:
        raise InputError(f"--{what}: got {text!r}, an empty field | expected comma-separated non-negative integers, "
                         f"e.g. {example} | remove the extra comma")
    if not all(_ID.fullmatch(x) for x in parts):
        raise InputError(f"--{what}: got {text!r} | expected comma-separated non-negative integers, e.g. {example}")
    big = [x for x in parts if len(x) > 19 or int(x) > INT64_MAX]  # the length first: int() of 5000 digits raises
    if big:
        raise InputError(f"--{what}: got {big[0][:30]}{'...' if len(big[0]) > 30 else ''} | expected integers up to "
                         f"{INT64_MAX} (int64), e.g. {example}")
    return [int(x) for x in parts]


def print_result(result, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"lists": [r.__dict__ for r in result.lists], "tau": result.tau,
                               "rounds": result.rounds, "time_s": result.time_s}))
        return
    for b, rec in enumerate(result.lists):
        click.echo(f"list {b}:")
        for rank, item in enumerate(rec.item_ids):
            title = f"  {rec.titles[rank]}" if rec.titles else ""
            click.echo(f"  {rank + 1:2d}. item {item:<6d} sid {rec.sids[rank]}{title}")
    t = result.time_s
    click.echo(f"tau {result.tau:.2f} | rounds {result.rounds} | {t['total'] * 1e3:.1f} ms "
               f"(draft {t['draft'] * 1e3:.1f}, verify {t['verify'] * 1e3:.1f}, host {t['host'] * 1e3:.1f})")


@click.command(context_settings=CONTEXT)
@ENGINE.add
@click.option("--history", "histories", required=True, multiple=True,
              help="comma-separated item ids, oldest first; repeat for a batch")
@click.option("--n-items", type=click.IntRange(1), default=None, show_default="the engines'", help="list length")
@DECODE.add
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def recommend(histories, n_items, as_json, **kwargs):
    """Write recommendation lists for one or more histories."""
    from .recommender import Recommender
    engine, params = ENGINE.parse(kwargs), DECODE.parse(kwargs)
    requests = [parse_ids(h) for h in histories]  # before the engines load: a typo costs no load
    rec = Recommender(**engine)
    print_result(rec.recommend(requests, n_items=n_items, params=params), as_json)
