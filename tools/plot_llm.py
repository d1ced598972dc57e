"""Plot the LLM-sized results of one card: batch-1 ms per list of the trained pairs (ours and torch.compile, AR and
speculation), the target step against torch.compile and the weight floor, and GPU memory by batch against
the ceiling weights + KV caches + 25%.

    python tools/plot_llm.py                 # benchmarks/results/*_h200.json -> benchmarks/results/llm_h200.png
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHAPES = {"qwen-0.5b": "0.5B", "qwen-1.5b": "1.5B", "qwen-7b": "7B"}


def legend(ax, size: float = 7) -> None:
    """A legend where the panel drew something; otherwise the panel says its results are missing."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size)
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)


def load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def step_ms(shape: dict) -> tuple:
    """(ours, torch.compile reduce-overhead, floor) for a 1-token step; None where not measured."""
    ours = shape.get("padrec_ms", {}).get("T1") or shape.get("padrec", {}).get("T1", {}).get("ms")
    tc = shape.get("torch_compile", {}).get("reduce-overhead", {}).get("step_ms_1")
    return ours, tc, shape.get("floor_ms")


def b1_bars(bench: dict) -> list:
    """(label, ms, color) bars of a trained pair at batch 1: ours against torch.compile where one process measured
    both, else the alternating AR / speculation headline."""
    if "b1_against_baselines" in bench:
        b = bench["b1_against_baselines"]
        return [("ours AR", b["ours_ar"], "tab:gray"), ("torch.compile AR", b["torch_compile_reduce_overhead_ar"],
                                                         "tab:orange"),
                ("torch.compile, same loop", b["torch_compile_reduce_overhead_same_chain_loop"], "tab:red"),
                ("ours PAD-Rec", b["ours_speculation_chain_device_rounds"], "tab:blue")]
    h = bench["headline_b1"]
    return [("ours AR", h["ar_ms"], "tab:gray"), ("ours PAD-Rec", h["sd_ms"], "tab:blue")]


def plot_headlines(ax, benches: dict) -> None:
    names = [n for n, b in benches.items() if b and ("headline_b1" in b or "b1_against_baselines" in b)]
    seen = set()
    for i, name in enumerate(names):
        bars = b1_bars(benches[name])
        w = 0.8 / len(bars)
        for j, (label, ms, color) in enumerate(bars):
            x = i - 0.4 + w * (j + 0.5)
            ax.bar(x, ms, w, color=color, label=None if label in seen else label)
            seen.add(label)
        ax.text(i + 0.4 - w / 2, bars[-1][1], f"{bars[0][1] / bars[-1][1]:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), [SHAPES[n] for n in names])
    ax.set_ylabel("ms per 10-item list, batch 1")
    ax.set_title("trained pairs at batch 1 (where torch.compile is shown: one process)", fontsize=8)
    legend(ax, 6.5)


def bench_step_ms(bench: dict) -> tuple:
    """(ours, torch.compile, floor) from a trained pair's bench: our AR round (its share of the prefill included)
    in the process that timed torch.compile's 1-token step."""
    ar = next(r for r in bench["rows"] if r["engine"] == "padrec-ort-cuda" and r["mode"] == "off")
    tc = bench["torch_compiled"]["reduce-overhead"]["step_ms_1"]
    return ar["verify_ms_per_round"], tc, bench["floor"]["floor_ms_per_target_step"]


def plot_steps(ax, steps: dict, benches: dict) -> None:
    """Random-weight steps where measured (llm_steps_CARD.json), else the trained pairs' benches."""
    per_shape = {s: step_ms(steps["shapes"][s]) for s in SHAPES if s in steps.get("shapes", {})}
    source = "random weights, fp16"
    if not per_shape:
        per_shape = {s: bench_step_ms(b) for s, b in benches.items() if b and "torch_compiled" in b and "floor" in b}
        source = "trained pairs, fp16; ours: an AR round with its share of the prefill"
    shapes = list(per_shape)
    for i, s in enumerate(shapes):
        ours, tc, floor = per_shape[s]
        for dx, v, color, label in ((-0.25, ours, "tab:blue", "ours"), (0.0, tc, "tab:orange", "torch.compile"),
                                    (0.25, floor, "tab:green", "weight floor")):
            if v is not None:
                ax.bar(i + dx, v, 0.25, color=color, label=label if i == 0 else None)
    ax.set_xticks(range(len(shapes)), [SHAPES[s] for s in shapes])
    ax.set_ylabel("target step, 1 token, batch 1 (ms)")
    ax.set_title(f"target step ({source})", fontsize=8)
    legend(ax)


def plot_memory(ax, memory: dict) -> None:
    for k, (s, shape) in enumerate(memory.get("shapes", {}).items()):
        for name, v in shape["variants"].items():
            if name != "per_graph_graph_max_16":
                continue
            b = sorted(v["batches"], key=int)
            used = [v["batches"][x]["gpu_used_gb"] for x in b]
            ceiling = [1.25 * (v["batches"][x]["weights_gb"] + v["batches"][x]["kv_caches_gb"]) for x in b]
            color = plt.cm.tab10(k)
            peak = [v["batches"][x].get("peak_steady_gb") for x in b]
            when = "" if all(p is not None for p in peak) else " (before prefill windows)"  # measured before peaks were
            ax.plot([int(x) for x in b], used, "o-", color=color, label=f"{SHAPES[s]} in use{when}")
            if all(p is not None for p in peak):
                ax.plot([int(x) for x in b], peak, "^:", color=color, label=f"{SHAPES[s]} peak in a request")
            ax.plot([int(x) for x in b], ceiling, "--", color=color, label=f"{SHAPES[s]} ceiling")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("GPU memory of the process (GB)")
    ax.set_title("memory, graph_sessions=per_graph, cuda_graph_max_tokens=16", fontsize=8)
    legend(ax, 6.5)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--card", default="h200")
    ap.add_argument("--out", default=None, help="default: RESULTS/llm_CARD.png")
    args = ap.parse_args(argv)
    res = Path(args.results)
    benches = {s: load(res / f"gpu_bench_{s}_{args.card}.json") for s in ("qwen-1.5b", "qwen-7b")}
    steps = load(res / f"llm_steps_{args.card}.json") or {}
    memory = load(res / f"gpu_memory_{args.card}.json") or {}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    plot_headlines(axes[0], benches)
    plot_steps(axes[1], steps, benches)
    plot_memory(axes[2], memory)
    gpu = steps.get("gpu") or memory.get("gpu") or "?"
    fig.suptitle(f"{gpu}: Qwen2.5-shaped targets over semantic-ID tokens", fontsize=9)
    fig.tight_layout()
    out = Path(args.out or res / f"llm_{args.card}.png")
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
