"""Runtime CLI commands (no torch): `padrec recommend`."""
from __future__ import annotations

import json

import click

from ..errors import InputError, PadrecError


class PadrecGroup(click.Group):
    """A click group that prints a PadrecError's message and exits 1, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PadrecError as exc:
            raise click.ClickException(str(exc)) from None


def parse_ids(text: str, what: str = "history") -> list:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--{what}: got {text!r} | expected comma-separated item ids, e.g. 12,7,301") from None


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


@click.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path(), help="engine directory")
@click.option("--history", "histories", required=True, multiple=True,
              help="comma-separated item ids, oldest first; repeat for a batch")
@click.option("--n-items", type=int, default=None, help="list length (default: the manifest's)")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--trt-module", type=click.Choice(["tensorrt", "tensorrt_lean", "tensorrt_rtx"]), default="tensorrt")
@click.option("--allow-host-code", is_flag=True, help="load TensorRT plans that embed host code")
@click.option("--mode", type=click.Choice(["greedy", "sample"]), default="greedy")
@click.option("--temperature", type=float, default=1.0)
@click.option("--top-k", type=int, default=0)
@click.option("--top-p", type=float, default=1.0)
@click.option("--seed", type=int, default=0)
@click.option("--speculate", type=click.Choice(["off", "chain", "tree"]), default="chain")
@click.option("--draft-steps", type=int, default=None, help="K (default: the manifest's)")
@click.option("--static-shapes/--dynamic-shapes", default=None,
              help="CUDA: fixed-shape bucket sessions with CUDA graphs (the default; fastest for a service) or one "
                   "dynamic session (opens faster: better for a single request)")
@click.option("--device-rounds/--host-rounds", default=None,
              help="greedy chain: queue each round's next draft chain on the device behind its verify pass (needs "
                   "static shapes; the default on CUDA with them for up to 8 histories) or start "
                   "each chain from the host")
@click.option("--in-place/--standard-graphs", "fused_target", default=None,
              help="CUDA: run causal calls on the engines' in-place graphs (target_gqa, draft_chain_gqa; the default "
                   "for fp16 engines that have them) or on the standard graphs only")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def recommend(engine_dir, histories, n_items, backend, device, trt_module, allow_host_code, mode, temperature,
              top_k, top_p, seed, speculate, draft_steps, static_shapes, device_rounds, fused_target, as_json):
    """Write recommendation lists for one or more histories."""
    from .recommender import Recommender
    rec = Recommender(engine_dir, backend=backend, device=device, trt_module=trt_module,
                      allow_host_code=allow_host_code, static_shapes=static_shapes,
                      io_binding=True if static_shapes or fused_target else None, fused_target=fused_target)
    result = rec.recommend([parse_ids(h) for h in histories], n_items=n_items, speculate=speculate,
                           greedy=mode == "greedy", temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           draft_steps=draft_steps, device_rounds=device_rounds)
    print_result(result, as_json)
