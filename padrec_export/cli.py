"""The `padrec` command: demo, export, build (torch side) and the runtime's recommend."""
from __future__ import annotations

import click

from padrec_runtime.api.cli import PadrecGroup, recommend
from padrec_serve.cli import client, serve


@click.group(cls=PadrecGroup)
def main():
    """padrec: PAD-Rec speculative decoding for generative recommendation — export, build, run."""


main.add_command(recommend)
main.add_command(serve)
main.add_command(client)


@main.command()
@click.option("--target", "target_dir", required=True, type=click.Path(), help="target checkpoint directory")
@click.option("--draft", "draft_dir", type=click.Path(), default=None, help="draft checkpoint directory")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="engine directory to write")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32")
@click.option("--max-seq-len", type=int, default=512)
@click.option("--max-history", type=int, default=50)
@click.option("--max-batch", type=int, default=64)
@click.option("--draft-steps", type=click.IntRange(1, 16), default=4, show_default=True,
              help="default K, and the K of draft_chain.onnx (a greedy chain round's draft in one call)")
@click.option("--no-fused-chain", is_flag=True, help="skip draft_chain.onnx (chain rounds then call the draft K times)")
@click.option("--no-in-place", is_flag=True,
              help="skip target_gqa.onnx and draft_chain_gqa.onnx (ONNX Runtime-only graphs writing the KV cache in "
                   "place; the CUDA runtime's default for fp16 engines)")
@click.option("--external-data", is_flag=True,
              help="every graph's weights in a <graph>.onnx.data file beside it (default: only graphs past 2 GB)")
def export(target_dir, draft_dir, out_dir, precision, max_seq_len, max_history, max_batch, draft_steps,
           no_fused_chain, no_in_place, external_data):
    """Export target (and draft) checkpoints to ONNX with a manifest."""
    from .pipeline import export_checkpoints
    m = export_checkpoints(target_dir, draft_dir, out_dir, precision, max_seq_len, max_history, max_batch,
                           draft_steps, not no_fused_chain, not no_in_place, external_data or None)
    click.echo(f"wrote {m.root} ({', '.join(m.data['files'])})")


@main.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path())
@click.option("--builder", type=click.Choice(["tensorrt", "tensorrt_rtx"]), default="tensorrt")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="must match the exported graphs (networks are strongly typed); default: the manifest's")
@click.option("--version-compatible", is_flag=True, help="plans for the lean runtime; they embed host code")
@click.option("--hardware-compatibility", type=click.Choice(["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]),
              default="NONE")
@click.option("--timing-cache", type=click.Path(), default=None)
@click.option("--compute-capability", default=None, help="tensorrt_rtx only, e.g. SM89")
def build(engine_dir, builder, precision, version_compatible, hardware_compatibility, timing_cache, compute_capability):
    """Build TensorRT engines from an engine directory's ONNX graphs."""
    from .build import BuildOptions, build_engines
    m = build_engines(engine_dir, BuildOptions(builder, version_compatible, hardware_compatibility, timing_cache,
                                               compute_capability, precision=precision))
    click.echo(f"built {', '.join(m.tensorrt['plans'].values())} with {builder} {m.tensorrt['builder_version']}")


@main.command()
@click.option("--users", type=int, default=3, help="how many held-out users to show")
@click.option("--engines", "engine_dir", type=click.Path(), default=None,
              help="engine directory (default: the embedded default model, exported on first use)")
@click.option("--speculate", type=click.Choice(["chain", "tree"]), default="chain")
def demo(users, engine_dir, speculate):
    """Recommend for a few users with the embedded default model: lists, tau, AR vs speculative time."""
    from .demo import run_demo
    run_demo(users, engine_dir, speculate)


@main.command()
@click.option("--dataset", type=click.Choice(["ml-100k", "ml-9k"]), default="ml-100k")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="directory for catalogue and checkpoints")
@click.option("--epochs", type=int, default=30, help="target epochs")
@click.option("--draft-epochs", type=int, default=10)
@click.option("--batch-size", type=int, default=256)
@click.option("--lr", type=float, default=3e-3)
@click.option("--seed", type=int, default=0)
@click.option("--device", default="cpu", help="cpu, cuda, cuda:0 ...")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast on GPU")
@click.option("--hidden", type=int, default=256)
@click.option("--layers", type=int, default=4)
@click.option("--heads", type=int, default=None, help="default: hidden / 32")
@click.option("--kv-heads", type=int, default=2)
@click.option("--intermediate", type=int, default=None, help="SwiGLU width (default: about 2.7 x hidden)")
@click.option("--codebook", type=int, default=64)
@click.option("--levels", type=int, default=4)
@click.option("--users", type=int, default=None, help="train on the first N users only (smoke runs)")
@click.option("--dropout", type=float, default=0.0, help="target dropout while training (embeddings, residuals)")
@click.option("--stride", type=int, default=5, help="items between consecutive training windows of a user")
def train(dataset, out_dir, epochs, draft_epochs, batch_size, lr, seed, device, bf16, hidden, layers, heads, kv_heads,
          intermediate, codebook, levels, users, dropout, stride):
    """Semantic IDs, target and both drafts (PAD-Rec, plain EAGLE) on MovieLens."""
    import json as _json

    from .pipeline import ModelSize, TrainConfig, train_all
    dtype = "bfloat16" if bf16 else "float32"
    size = ModelSize(hidden=hidden, layers=layers, heads=heads or max(1, hidden // 32), kv_heads=kv_heads,
                     intermediate=intermediate or int(hidden * 2.6875 / 8) * 8)
    report = train_all(dataset, out_dir, size,
                       TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, dtype=dtype,
                                   dropout=dropout),
                       TrainConfig(epochs=draft_epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                   dtype=dtype),
                       levels=levels, codebook=codebook, users=users, stride=stride)
    click.echo(_json.dumps(report, indent=2))


@main.command("train-draft")
@click.option("--target", "target_dir", required=True, type=click.Path(file_okay=False),
              help="target checkpoint directory (Hugging Face Llama / Qwen2 + padrec.json + catalogue.json)")
@click.option("--dataset", type=click.Choice(["ml-100k", "ml-9k"]), required=True,
              help="interactions to train on (items must be in the target's catalogue)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="draft directory to write; rerunning with the same settings continues its training")
@click.option("--kind", type=click.Choice(["padrec", "eagle"]), default="padrec", show_default=True,
              help="padrec: slot and step signals; eagle: the plain EAGLE draft (the ablation baseline)")
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True,
              help="total epochs (a resumed run trains the ones still missing)")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True)
@click.option("--draft-steps", type=click.IntRange(1, 16), default=4, show_default=True,
              help="K: draft steps unrolled in training")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:0 ...")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast on GPU")
@click.option("--users", type=click.IntRange(1), default=None, help="the first N users only (smoke runs)")
def train_draft(target_dir, dataset, out_dir, kind, epochs, batch_size, lr, draft_steps, seed, device, bf16, users):
    """Train a draft against an existing target checkpoint (progress bar; resumable per epoch)."""
    import json as _json

    from .own_target import TrainConfig, train_draft_for
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, draft_steps=draft_steps, device=device,
                      dtype="bfloat16" if bf16 else "float32")
    click.echo(_json.dumps(train_draft_for(target_dir, dataset, out_dir, kind, cfg, users), indent=2))


@main.command()
@click.option("--models", "model_dir", required=True, type=click.Path(), help="directory written by `padrec train`")
@click.option("--dataset", type=click.Choice(["ml-100k", "ml-9k"]), default="ml-100k")
@click.option("--users", type=int, default=None)
@click.option("--json", "json_path", type=click.Path(), default=None)
def evaluate(model_dir, dataset, users, json_path):
    """Recall/NDCG of the target vs baselines and tau of both drafts, on held-out users."""
    import json as _json
    from pathlib import Path

    from .pipeline import evaluate as run
    report = run(model_dir, dataset, users=users)
    text = _json.dumps(report, indent=2)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    click.echo(text)


@main.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path())
@click.option("--target", "target_dir", required=True, type=click.Path(), help="target checkpoint the engines came from")
@click.option("--draft", "draft_dir", type=click.Path(), default=None, help="draft checkpoint")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--histories", "n_histories", type=int, default=32, help="random histories for tiers 2 and 3")
@click.option("--report", "report_path", type=click.Path(), default=None, help="JSON report (and .md beside it)")
def parity(engine_dir, target_dir, draft_dir, backend, device, n_histories, report_path):
    """QA: engines vs PyTorch — per-graph tensors, greedy lists, acceptance. Exits 1 on failure."""
    import json as _json
    from pathlib import Path

    from .parity import parity_markdown, parity_summary, run_parity
    report = run_parity(engine_dir, target_dir, draft_dir, backend, device, n_histories=n_histories)
    if report_path:
        path = Path(report_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(parity_markdown(report))
    click.echo(parity_summary(report))
    if not report["ok"]:
        raise SystemExit(1)


@main.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path())
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--batch", "batches", default="1,8,32", help="comma-separated batch sizes")
@click.option("--repeats", type=int, default=5)
@click.option("--target", "target_dir", type=click.Path(), default=None, help="also time PyTorch eager on this target")
@click.option("--draft", "draft_dir", type=click.Path(), default=None)
@click.option("--dataset", default="ml-100k", help="held-out histories from this data set when installed")
@click.option("--json", "json_path", type=click.Path(), default=None)
@click.option("--plot", "plot_path", type=click.Path(), default=None, help="PNG")
def bench(engine_dir, backend, device, batches, repeats, target_dir, draft_dir, dataset, json_path, plot_path):
    """AR vs chain vs tree speculation on one backend (and PyTorch eager): latency, throughput, tau."""
    import json as _json
    from pathlib import Path

    from padrec_runtime.api.cli import parse_ids

    from .bench import bench_plot, bench_table, run_bench
    report = run_bench(engine_dir, backend, device, parse_ids(batches, "batch"), repeats, target_dir, draft_dir, dataset)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(_json.dumps(report, indent=2) + "\n")
    if plot_path:
        bench_plot(report, plot_path)
    click.echo(bench_table(report))


if __name__ == "__main__":
    main()
