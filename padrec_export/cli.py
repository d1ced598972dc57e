"""The `padrec` command: demo, export, build, train, evaluate, parity, bench (torch side) and the runtime's
recommend."""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import click

from padrec_runtime.api.cli import ENGINE, PadrecGroup, recommend
from padrec_runtime.errors import BackendError, InputError
from padrec_runtime.grammar import LAYOUT_KINDS, TokenLayout
from padrec_serve.cli import client, serve

from .data import DATASETS
from .sizes import RECIPES, SIZES

EXPORT_MODULES = ("torch", "onnx", "safetensors")  # what the [export] extra brings and the commands below import


def require_export_extra(command: str, modules=EXPORT_MODULES) -> None:
    """Refuse a torch-side command in a runtime-only install with one line naming the extra to install."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or broken package counts as absent
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise BackendError(f"padrec {command}: needs {', '.join(missing)}, not installed (a runtime-only install) | "
                           "expected the export extra | pip install '.[export]' (in the padrec checkout)")


class IntList(click.ParamType):
    """Comma-separated positive integers, e.g. 1,8,32."""

    name = "N,N,..."

    def __init__(self, what: str):
        self.what = what

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:  # an empty field ("1,,2") is refused, not dropped: the user meant some number there
            out = [int(x) for x in str(value).replace(" ", "").split(",")]
        except ValueError:
            out = []
        if not out or min(out) < 1:
            empty = ", an empty field" if "" in str(value).replace(" ", "").split(",") else ""
            self.fail(f"got {value!r}{empty} | expected comma-separated positive {self.what}, e.g. 1,8,32", param,
                      ctx)
        return out


def _probe_dir(base: Path) -> None:
    """Make and remove a directory in `base`: the one test that holds for root too (os.access says a root
    process may write in /proc, where mkdir fails)."""
    os.rmdir(tempfile.mkdtemp(dir=base, prefix=".padrec-probe-"))


def check_writable(path, flag: str, kind: str) -> None:
    """Refuse an output path (kind "dir" or "file") that cannot be written, in one line, before the work that
    would write it: an export, a training run or a bench runs for minutes before its first write there."""
    p = Path(path).absolute()
    if kind == "file" and (p.is_dir() or str(path).endswith(("/", os.sep))):
        raise InputError(f"{flag}: got {path}, a directory | expected a file path | name a file in it, e.g. "
                         f"{flag} {os.path.join(path, 'FILE')}")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise InputError(f"{flag}: got {path}, a file | expected a directory to write | pick another path")
    base = p
    while not base.exists():  # the nearest existing ancestor: where the missing directories are made
        base = base.parent
    if base != p and not base.is_dir():
        raise InputError(f"{flag}: got {path}; {base} is a file, not a directory | expected a path under a "
                         "directory | pick another path")
    try:
        if base.is_dir():
            _probe_dir(base)
        else:  # an existing --json file (or /dev/null): opened for appending, closed unwritten, left as it was
            with open(base, "a"):
                pass
    except OSError as exc:
        raise InputError(f"{flag}: cannot write {path} ({exc.strerror or exc} in {base}) | expected a writable "
                         "location | pick another path") from None


def check_export_room(target_dir, with_draft: bool, max_seq_len: int, max_history: int, draft_steps: int) -> None:
    """Refuse a --max-seq-len that cannot hold the default request: a --max-history-item history, the default
    list and one round of the default speculation, counted as the runtime counts a request's KV positions
    (max_cache_len, Recommender._check_budget). Engines that small would refuse that request on every call, and
    below the shapes export traces the export itself crashes."""
    from padrec_runtime.grammar import Catalogue, ListConstraint
    from padrec_runtime.loop import DecodeConfig
    from padrec_runtime.loop.session import max_cache_len

    from .onnx_export import ExportLimits
    from .checkpoint import read_json_object
    from .pipeline import read_layout
    meta_path = Path(target_dir) / "padrec.json"
    cat_path = next((d / "catalogue.json" for d in (Path(target_dir), Path(target_dir).parent)
                     if (d / "catalogue.json").exists()), None)  # where load_target_dir looks for it
    if not meta_path.exists() or cat_path is None:
        return  # export_checkpoints names the missing file
    cat = Catalogue.load(cat_path, read_layout(read_json_object(meta_path, "padrec.json"), meta_path))
    n_items = ExportLimits().n_items
    prompt = 1 + max_history * (cat.max_depth + 1)  # <bos>, then each item's tokens and its separator
    cfg = DecodeConfig(speculate="chain" if with_draft else "off", draft_steps=draft_steps)
    need = max_cache_len(prompt, ListConstraint(cat, n_items=n_items), cfg)
    step = f"one chain round of K={draft_steps}" if with_draft else "one target step"
    if max_seq_len < need:
        raise InputError(f"--max-seq-len: got {max_seq_len} | expected at least {need}: a {max_history}-item "
                         f"history ({prompt} prompt tokens), the default {n_items}-item list and {step} need that "
                         f"many KV positions | pass --max-seq-len {need} or a smaller --max-history")


EXISTING_DIR = click.Path(exists=True, file_okay=False)


class OutputPath(click.Path):
    """A path to write: an empty one is refused (a variable left unset in a script would otherwise write into the
    working directory, or nowhere without a word)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("empty | expected a path to write", param, ctx)
        return super().convert(value, param, ctx)


OUTPUT = OutputPath()


@click.group(cls=PadrecGroup, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="padrec", prog_name="padrec")
def main():
    """padrec: PAD-Rec speculative decoding for generative recommendation — export, build, run."""


main.add_command(recommend)
main.add_command(serve)
main.add_command(client)


@main.command()
@click.option("--target", "target_dir", required=True, type=EXISTING_DIR,
              help="target checkpoint directory (config.json, model.safetensors, padrec.json)")
@click.option("--draft", "draft_dir", type=EXISTING_DIR, default=None,
              help="draft checkpoint directory (none: AR-only engines)")
@click.option("--out", "out_dir", required=True, type=OUTPUT, help="engine directory to write")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              help="weights and KV cache precision of the graphs (logits stay fp32)")
# upper bounds: the manifest's (padrec_runtime/manifest.py `_model`), checked here rather than after the export
@click.option("--max-seq-len", type=click.IntRange(8, 1 << 20), default=512,
              help="KV positions per row the engines are built for: prompt + list + a round of speculation")
@click.option("--max-history", type=click.IntRange(1, 1 << 16), default=50, help="longest history (items) accepted")
@click.option("--max-batch", type=click.IntRange(1, 1 << 16), default=64, help="most histories in one call")
@click.option("--draft-steps", type=click.IntRange(1, 16), default=4,
              help="default K, and the K of draft_chain.onnx (a greedy chain round's draft in one call)")
@click.option("--no-fused-chain", is_flag=True, help="skip draft_chain.onnx (chain rounds then call the draft K times)")
@click.option("--no-in-place", is_flag=True,
              help="skip target_gqa.onnx and draft_chain_gqa.onnx (ONNX Runtime-only graphs writing the KV cache in "
                   "place; the CUDA runtime's default for fp16 engines)")
@click.option("--external-data/--embedded-data", default=None,
              help="every graph's weights in a <graph>.onnx.data file beside it, or inside the graph (default: "
                   "external for fp16 / bf16, whose sessions then share one device copy of the weights; embedded "
                   "for fp32 unless a graph passes 2 GB)")
@click.option("--quantize", type=click.Choice(["none", "int4", "int8"]), default="none",
              help="weight-only quantization of the target's decoder layers (ONNX Runtime's MatMulNBits; fp32 / fp16 "
                   "engines): fewer weight bytes read per step; speculation stays lossless with respect to the "
                   "quantized target")
@click.option("--quantize-block", type=click.Choice(["16", "32", "64", "128", "256"]), default="32",
              help="weights along a projection's input sharing one scale and zero point")
@click.option("--quantize-draft", is_flag=True,
              help="also quantize the draft's decoder layer (changes only how often its tokens are accepted)")
def export(target_dir, draft_dir, out_dir, precision, max_seq_len, max_history, max_batch, draft_steps,
           no_fused_chain, no_in_place, external_data, quantize, quantize_block, quantize_draft):
    """Export target (and draft) checkpoints to ONNX with a manifest."""
    require_export_extra("export")
    check_export_room(target_dir, draft_dir is not None, max_seq_len, max_history, draft_steps)
    check_writable(out_dir, "--out", "dir")
    from .onnx_export import earlier_export
    earlier = earlier_export(out_dir)  # files move in only once the whole export is written
    from .pipeline import export_checkpoints
    from .quantize import parse_quantize
    quantization = parse_quantize(quantize, int(quantize_block), quantize_draft)
    m = export_checkpoints(target_dir, draft_dir, out_dir, precision, max_seq_len, max_history, max_batch,
                           draft_steps, not no_fused_chain, not no_in_place, external_data,
                           quantization=quantization)
    click.echo(f"wrote {m.root} ({', '.join(m.data['files'])})" + (", replacing an earlier export" if earlier else ""))


@main.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path(), help="engine directory from `padrec export`")
@click.option("--builder", type=click.Choice(["tensorrt_rtx", "tensorrt"]), default="tensorrt_rtx",
              help="tensorrt_rtx: pip install tensorrt-rtx-cu13; tensorrt: NVIDIA's TensorRT (pip install tensorrt)")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="must match the exported graphs (networks are strongly typed); default: the manifest's")
@click.option("--version-compatible", is_flag=True, help="plans for the lean runtime; they embed host code")
@click.option("--hardware-compatibility", type=click.Choice(["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"]),
              default="NONE", help="tensorrt: build plans that also run on other GPU generations")
@click.option("--timing-cache", type=OUTPUT, default=None, help="file to read and update: faster rebuilds")
@click.option("--compute-capability", default=None, help="tensorrt_rtx only, e.g. SM89")
def build(engine_dir, builder, precision, version_compatible, hardware_compatibility, timing_cache, compute_capability):
    """Build TensorRT engines from an engine directory's ONNX graphs."""
    from .build import BuildOptions, build_engines
    m = build_engines(engine_dir, BuildOptions(builder, version_compatible, hardware_compatibility, timing_cache,
                                               compute_capability, precision=precision))
    click.echo(f"built {', '.join(m.tensorrt['plans'].values())} with {builder} {m.tensorrt['builder_version']}")


@main.command()
@click.option("--users", type=click.IntRange(1), default=3, help="how many held-out users to show")
@click.option("--engines", "engine_dir", type=click.Path(), default=None,
              help="engine directory (default: the embedded default model, exported once and cached)")
@click.option("--speculate", type=click.Choice(["chain", "tree"]), default="chain", help="speculation mode to time")
def demo(users, engine_dir, speculate):
    """Recommend for a few users with the embedded default model: lists, tau, AR vs speculative time."""
    from .demo import run_demo
    run_demo(users, engine_dir, speculate)


@main.command()
@click.option("--dataset", type=click.Choice(DATASETS), default="ml-100k", help="MovieLens data set")
@click.option("--out", "out_dir", required=True, type=OUTPUT, help="directory for catalogue and checkpoints")
@click.option("--epochs", type=click.IntRange(1), default=30, help="target epochs")
@click.option("--draft-epochs", type=click.IntRange(1), default=10, help="epochs of each draft")
@click.option("--drafts", type=click.Choice(["padrec", "eagle", "both"]), default="both",
              help="drafts to train: PAD-Rec, the plain EAGLE baseline, or both (evaluate compares both)")
@click.option("--batch-size", type=click.IntRange(1), default=256, help="sequences per optimiser step")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="peak learning rate (AdamW)  [default: 3e-3, or the --size recipe's]")
@click.option("--seed", type=int, default=0, help="random seed (semantic IDs, init, batch order)")
@click.option("--device", default="cpu", help="torch device: cpu, cuda, cuda:0 ...")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast on GPU")
@click.option("--size", type=click.Choice(list(SIZES)), default=None,
              help="a named target shape (replaces --hidden ... --intermediate) with its recipe: bf16 weights without "
                   "fp32 copies, activation checkpointing and batches of tokens where the size needs them "
                   "(docs/llm_pairs.md)")
@click.option("--hidden", type=click.IntRange(8), default=256, help="model width")
@click.option("--layers", type=click.IntRange(1), default=4, help="target decoder layers")
@click.option("--heads", type=click.IntRange(1), default=None, help="attention heads  [default: hidden / 32]")
@click.option("--kv-heads", type=click.IntRange(1), default=None,
              help="KV heads, dividing --heads (== heads: plain multi-head attention)  [default: 2 where it divides "
                   "the heads, else 1]")
@click.option("--intermediate", type=click.IntRange(1), default=None,
              help="SwiGLU width  [default: about 2.7 x hidden]")
@click.option("--codebook", type=click.IntRange(2), default=64, help="semantic-ID codebook size per level")
@click.option("--levels", type=click.IntRange(1), default=4, help="semantic-ID levels (codes per item)")
@click.option("--layout", "kind", type=click.Choice(LAYOUT_KINDS), default="per_level",
              help="item tokens: per_level (each level its own codes), shared (one codebook at every level), "
                   "digits (codes as decimal digits)")
@click.option("--users", type=click.IntRange(1), default=None, help="train on the first N users only (quick runs)")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="target dropout while training (embeddings, residuals)")
@click.option("--stride", type=click.IntRange(1), default=5, help="items between consecutive training windows of a user")
def train(dataset, out_dir, epochs, draft_epochs, drafts, batch_size, lr, seed, device, bf16, size, hidden, layers,
          heads, kv_heads, intermediate, codebook, levels, kind, users, dropout, stride):
    """Semantic IDs, target and drafts (PAD-Rec, plain EAGLE) on MovieLens."""
    require_export_extra("train")
    import json as _json

    from .pipeline import ModelSize, TrainConfig, train_all
    from .train import check_device
    check_device(device)
    check_writable(out_dir, "--out", "dir")
    dtype = "bfloat16" if bf16 else "float32"
    heads = heads or max(1, hidden // 32)
    shape = ModelSize(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads or (2 if heads % 2 == 0 else 1),
                      intermediate=intermediate or int(hidden * 2.6875 / 8) * 8)
    target_extra, draft_extra, draft_lr = {}, {}, lr or 3e-3
    if size:  # a named shape and how it fits one GPU
        r = RECIPES[size]
        shape, lr, draft_lr = SIZES[size], lr or r.lr, lr or r.draft_lr
        target_extra = dict(weights=r.weights if device != "cpu" else "float32", checkpointing=r.checkpointing,
                            batch_tokens=r.batch_tokens, micro_batch=r.micro_batch, warmup_steps=r.warmup_steps)
        draft_extra = dict(batch_tokens=r.batch_tokens, micro_batch=r.draft_micro_batch, cache_features=True,
                           warmup_steps=r.warmup_steps)
    report = train_all(dataset, out_dir, shape,
                       TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr or 3e-3, seed=seed, device=device,
                                   dtype=dtype, dropout=dropout, **target_extra),
                       TrainConfig(epochs=draft_epochs, batch_size=batch_size, lr=draft_lr, seed=seed, device=device,
                                   dtype=dtype, **draft_extra),
                       layout=TokenLayout(levels, codebook, kind), users=users, stride=stride,
                       drafts=("padrec", "eagle") if drafts == "both" else (drafts,))
    click.echo(_json.dumps(report, indent=2))


@main.command("train-draft")
@click.option("--target", "target_dir", required=True, type=click.Path(file_okay=False),
              help="target checkpoint directory (Hugging Face Llama / Qwen2 + padrec.json; catalogue.json in it "
                   "or its parent)")
@click.option("--dataset", type=click.Choice(DATASETS), required=True,
              help="interactions to train on (items must be in the target's catalogue)")
@click.option("--out", "out_dir", required=True, type=OutputPath(file_okay=False),
              help="draft directory to write; rerunning with the same settings continues its training")
@click.option("--kind", type=click.Choice(["padrec", "eagle"]), default="padrec", show_default=True,
              help="padrec: slot and step signals; eagle: the plain EAGLE draft (the ablation baseline)")
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True,
              help="total epochs (a resumed run trains the ones still missing)")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="sequences per optimiser step")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-3, show_default=True,
              help="peak learning rate (AdamW)")
@click.option("--draft-steps", type=click.IntRange(1, 16), default=4, show_default=True,
              help="K: draft steps unrolled in training")
@click.option("--seed", type=int, default=0, show_default=True, help="random seed (init, batch order)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:0 ...")
@click.option("--bf16", is_flag=True, help="bfloat16 autocast on GPU")
@click.option("--users", type=click.IntRange(1), default=None, help="the first N users only (smoke runs)")
def train_draft(target_dir, dataset, out_dir, kind, epochs, batch_size, lr, draft_steps, seed, device, bf16, users):
    """Train a draft against an existing target checkpoint (progress bar; resumable per epoch)."""
    require_export_extra("train-draft")
    import json as _json

    from .train import check_device
    check_device(device)
    check_writable(out_dir, "--out", "dir")

    from .own_target import TrainConfig, train_draft_for
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, draft_steps=draft_steps, device=device,
                      dtype="bfloat16" if bf16 else "float32")
    click.echo(_json.dumps(train_draft_for(target_dir, dataset, out_dir, kind, cfg, users), indent=2))


@main.command()
@click.option("--models", "model_dir", required=True, type=EXISTING_DIR, help="directory written by `padrec train`")
@click.option("--dataset", type=click.Choice(DATASETS), default=None,
              show_default="the one the models were trained on", help="MovieLens data set")
@click.option("--users", type=click.IntRange(1), default=None, help="evaluate the first N held-out users only")
@click.option("--json", "json_path", type=OUTPUT, default=None, help="also write the report here")
def evaluate(model_dir, dataset, users, json_path):
    """Recall/NDCG of the target vs baselines and tau of the drafts, on held-out users."""
    require_export_extra("evaluate")
    import json as _json
    from pathlib import Path

    from .pipeline import evaluate as run
    if json_path:
        check_writable(json_path, "--json", "file")
    report = run(model_dir, dataset, users=users)
    text = _json.dumps(report, indent=2)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    click.echo(text)


@main.command()
@click.option("--engines", "engine_dir", required=True, type=click.Path(), help="engine directory to check")
@click.option("--target", "target_dir", required=True, type=EXISTING_DIR,
              help="target checkpoint the engines came from")
@click.option("--draft", "draft_dir", type=EXISTING_DIR, default=None, help="draft checkpoint the engines came from")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              help="runtime backend to check")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", help="runtime device")
@click.option("--histories", "n_histories", type=click.IntRange(1), default=32,
              help="random histories for tiers 2 and 3")
@click.option("--report", "report_path", type=OUTPUT, default=None, help="JSON report (and .md beside it)")
def parity(engine_dir, target_dir, draft_dir, backend, device, n_histories, report_path):
    """QA: engines vs PyTorch — per-graph tensors, greedy lists, acceptance. Exits 1 on failure."""
    require_export_extra("parity")
    import json as _json
    from pathlib import Path

    from .parity import parity_markdown, parity_summary, run_parity
    if report_path:
        check_writable(report_path, "--report", "file")
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
@ENGINE.add
@click.option("--batch", "batches", type=IntList("batch sizes"), default="1,8,32", help="comma-separated batch sizes")
@click.option("--repeats", type=click.IntRange(1), default=5, help="timed runs per point (after one warm-up)")
@click.option("--target", "target_dir", type=EXISTING_DIR, default=None, help="also time PyTorch eager on this target")
@click.option("--draft", "draft_dir", type=EXISTING_DIR, default=None, help="draft for the PyTorch eager timing")
@click.option("--dataset", type=click.Choice(DATASETS), default="ml-100k",
              help="held-out histories from this data set when installed (else random catalogue histories)")
@click.option("--json", "json_path", type=OUTPUT, default=None, help="write the report here")
@click.option("--plot", "plot_path", type=OUTPUT, default=None,
              help="PNG of latency, speed-up and tau (needs matplotlib: pip install '.[plot]' (in the padrec checkout))")
def bench(batches, repeats, target_dir, draft_dir, dataset, json_path, plot_path, **kwargs):
    """AR vs chain vs tree speculation on one backend (and PyTorch eager): latency, throughput, tau."""
    import json as _json
    from pathlib import Path

    from .bench import bench_plot, bench_table, require_plot, run_bench
    if plot_path:
        require_plot()  # before the run, not after it
    for path, flag in ((json_path, "--json"), (plot_path, "--plot")):
        if path:
            check_writable(path, flag, "file")
    if target_dir:
        require_export_extra("bench --target")
    report = run_bench(batches=batches, repeats=repeats, target_dir=target_dir, draft_dir=draft_dir, dataset=dataset,
                       **ENGINE.parse(kwargs))
    click.echo(f"histories: {report['histories']}")
    click.echo(bench_table(report))  # first: a file that cannot be written then loses nothing that was measured
    if json_path:
        try:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(_json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise InputError(f"--json {json_path}: cannot be written ({exc.strerror}) | the table above holds the "
                             "results; pass a path on a disk with room") from None
        click.echo(f"wrote {json_path}")
    if plot_path:
        bench_plot(report, plot_path)
        click.echo(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
