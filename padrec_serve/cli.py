"""`padrec serve` and `padrec client`: thin click commands over padrec_serve."""
from __future__ import annotations

import json
import sys

import click

from padrec_runtime.api.cli import CUDA_MEMORY, INT32_MAX, INT64_MAX, FiniteFloatRange, parse_ids

PORT = click.IntRange(1, 65535)  # Triton takes any int and wraps it modulo 65536: refused here instead


def check_ports(ports: dict) -> None:
    """The three ports must differ: Triton would bind the second listener to a port its first one holds."""
    seen: dict = {}
    for option, port in ports.items():
        if port in seen:
            raise click.BadParameter(f"got {port}, the port of {seen[port]} too | expected three different ports | "
                                     f"pick another for {option}", param_hint=f"'{option}'")
        seen[port] = option


@click.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path(exists=True), help="engine directory")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="where every instance runs its engines")
@click.option("--http-port", type=PORT, default=8000, show_default=True, help="KServe v2 over HTTP")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, help="KServe v2 over gRPC")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True,
              help="Prometheus metrics (Triton's and padrec's)")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="requests per dynamic batch (decoded in chunks of the engines' max batch)")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=2000, show_default=True,
              help="how long the batcher waits for more requests")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="model instances, each a process with its own engines; with --device cuda: on each GPU")
@click.option("--devices", default=None, metavar="IDS",
              help="GPU ids for the instances, e.g. 0,1 (--device cuda; default: every GPU Triton sees)")
@click.option("--deadline-s", type=FiniteFloatRange(min=0.001), default=None,
              help="cut a request decoding longer than this (DeadlineError)")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="time AR against speculation per batch size at start, for speculate=auto")
@CUDA_MEMORY.add
def serve(engine_dir, device, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us, instances,
          devices, deadline_s, calibrate, **kwargs):
    """Serve recommendation lists over KServe v2 (HTTP and gRPC) with Triton Inference Server."""
    from .server import ServeConfig, serve as run
    check_ports({"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    gpus = None if devices is None else tuple(parse_ids(devices, "devices"))
    sys.exit(run(ServeConfig(engine_dir, device, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                             max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances,
                             devices=gpus, deadline_s=deadline_s, calibrate=calibrate,
                             runtime_options=CUDA_MEMORY.parse(kwargs))))


@click.command()
@click.option("--url", default=None, show_default="localhost:8000 (http), localhost:8001 (grpc)",
              help="host:port of the server, no scheme")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="KServe v2 over HTTP (--url port 8000) or gRPC (port 8001)")
@click.option("--history", "histories", required=True, multiple=True,
              help="comma-separated item ids, oldest first; repeat for more requests")
@click.option("--n-items", type=click.IntRange(1, INT32_MAX), default=None, show_default="the engines' list length",
              help="items per list")
@click.option("--speculate", type=click.Choice(["auto", "off", "chain", "tree"]), default=None,
              show_default="auto (chain where the server runs --no-calibrate)", help="how the server decodes")
@click.option("--mode", type=click.Choice(["greedy", "sample"]), default="greedy", show_default=True,
              help="greedy lists, or sampled with the options below")
# the ranges of `padrec recommend` (DecodeArgs): refused here, not after a round trip to the server
@click.option("--temperature", type=FiniteFloatRange(1e-4, 1e4), default=None, show_default="1.0",
              help="sampling temperature")
@click.option("--top-k", type=click.IntRange(0, INT32_MAX), default=None, show_default="0: all", help="sample among the k best")
@click.option("--top-p", type=FiniteFloatRange(1e-6, 1.0), default=None, show_default="1.0",
              help="nucleus sampling mass")
@click.option("--seed", type=click.IntRange(0, INT64_MAX), default=None, show_default="0", help="sampling seed")
@click.option("--wait-s", type=FiniteFloatRange(min=0), default=0, help="wait this long for the server to be ready")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def client(url, protocol, histories, n_items, speculate, mode, temperature, top_k, top_p, seed, wait_s, as_json):
    """Ask a running `padrec serve` for lists."""
    from .client import DEFAULT_URLS, Client
    requests = [parse_ids(h) for h in histories]  # before waiting for a server: a typo is told at once
    with Client(url or DEFAULT_URLS[protocol], protocol) as c:
        if wait_s:  # on stderr: --json's stdout stays the lists alone
            click.echo(f"waiting up to {wait_s:g} s for {url or DEFAULT_URLS[protocol]} to be ready (calibration runs "
                       "first) ...", err=True)
            c.wait_ready(wait_s)
        lists = c.recommend(requests, n_items, speculate=speculate, greedy=mode == "greedy",
                            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if as_json:
        click.echo(json.dumps([x.__dict__ for x in lists]))
        return
    for b, x in enumerate(lists):
        click.echo(f"list {b} (tau {x.tau:.2f}):")
        for rank, item in enumerate(x.item_ids):
            title = f"  {x.titles[rank]}" if x.titles[rank] else ""
            click.echo(f"  {rank + 1:2d}. item {item:<6d} sid {x.sids[rank]}{title}")
