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

from padrec_export.figures import save_png  # noqa: E402

SHAPES = {"qwen-0.5b": "0.5B", "qwen-1.5b": "1.5B", "qwen-7b": "7B"}


def legend(ax, size: float = 7, **where) -> None:
    """A legend where the panel drew something; otherwise the panel says its results are missing."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=size, **where)
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


def paired_bars(paired: dict) -> list:
    """Bars of a shape's paired step (tools/paired_steps.py): every side timed back to back in alternating rounds;
    ours with GEMM tuning (the runtime's default) and without (the memory settings), where each was timed."""
    modes = paired["steps_paired"]
    first = next(iter(modes.values()))["methods"]["back_to_back"]["T1"]
    bars = [(label, first[key], color) for key, label, color in
            (("padrec_ms", "ours fp16 (paired, back to back)", "tab:blue"),
             ("padrec_tuning_off_ms", "ours fp16, GEMM tuning off (paired, back to back)", "tab:cyan"))
            if key in first]
    bars += [(f"torch.compile {mode} (paired)", m["methods"]["back_to_back"]["T1"]["torch_compile_ms"], color)
             for (mode, m), color in zip(modes.items(), ("tab:orange", "tab:red"))]
    return bars + [("fp16 weight floor", paired["floor_ms"], "tab:green")]


def step_bars(steps: dict, benches: dict) -> dict:
    """shape -> [(label, ms, color)] of the 1-token step: the paired timing where measured, else random-weight steps
    (llm_steps_CARD.json), else the trained pair's bench (an AR round with its share of the prefill); quantized
    rows beside their shape's."""
    rows, paired = steps.get("shapes", {}), steps.get("paired", {}).get("shapes", {})
    out = {}
    for s in SHAPES:
        quantized = [(f"ours {q}", step_ms(rows[f"{s}_{q}"])[0], color) for q, color in
                     (("int4", "tab:olive"), ("int8", "tab:purple")) if f"{s}_{q}" in rows]
        if s in paired:
            out[s] = paired_bars(paired[s]) + quantized
            continue
        if s in rows:
            ours, tc, floor = step_ms(rows[s])
            bars = [("ours fp16", ours, "tab:blue")] + quantized
        elif benches.get(s) and "torch_compiled" in benches[s] and "floor" in benches[s]:
            ours, tc, floor = bench_step_ms(benches[s])
            bars = [("ours fp16 (trained pair: AR round)", ours, "tab:blue")]
        else:
            continue
        out[s] = bars + [("torch.compile fp16", tc, "tab:orange"), ("fp16 weight floor", floor, "tab:green")]
    return out


def plot_steps(ax, steps: dict, benches: dict) -> None:
    per_shape, seen = step_bars(steps, benches), set()
    for i, (s, bars) in enumerate(per_shape.items()):
        w = 0.8 / len(bars)
        for j, (label, ms, color) in enumerate(bars):
            if ms is not None:
                ax.bar(i - 0.4 + w * (j + 0.5), ms, w, color=color, label=None if label in seen else label)
                seen.add(label)
    ax.set_xticks(range(len(per_shape)), [SHAPES[s] for s in per_shape])
    ax.set_ylabel("target step, 1 token, batch 1 (ms)")
    ax.set_title("target step (random weights where measured, else the trained pair;\n"
                 "paired: each mode beside ours, back to back; ours: beside the first)", fontsize=7)
    tallest = max((ms for bars in per_shape.values() for _, ms, _ in bars if ms is not None), default=None)
    if tallest:
        ax.set_ylim(0, 1.8 * tallest)  # the legend above the bars, not over 7B's
    legend(ax, 6.5, loc="upper left")


# levers file runs drawn as lines: (run, shape, variant, marker, label)
CAPPED = (("qwen-7b_random", "qwen-7b", "per_graph_graph_max_16_cublas_4mb", "s-.", "cuBLAS capped"),
          ("qwen-1.5b_random_gemm_tuning", "qwen-1.5b", "per_graph_graph_max_16_cublas_option_tune_apart", "D-",
           "capped, GEMM tuning apart"),
          ("qwen-1.5b_random_pair", "qwen-1.5b", "pair_graph_max_16_cublas_option_tune_apart_rows_4", "P-",
           "pair, tuning apart, 4-row windows"),
          ("qwen-1.5b_random_tune_off", "qwen-1.5b", "pair_graph_max_16_cublas_option_tune_off_rows_2", "*-",
           "the memory settings (pair, tuning off, 2-row windows)"),
          ("qwen-7b_random_pair", "qwen-7b", "pair_graph_max_16_cublas_option_tune_apart", "P-",
           "pair, capped, tuning apart"),
          ("qwen-7b_random_gate_up", "qwen-7b", "per_graph_graph_max_16", "o-", "no levers, gate|up as one MatMul"),
          ("qwen-1.5b_random_quiet", "qwen-1.5b", "per_graph_graph_max_16_cublas_option_tune_apart", "D-",
           "capped, GEMM tuning apart"),
          ("qwen-1.5b_random_quiet", "qwen-1.5b", "pair_graph_max_16_cublas_option_tune_apart_rows_4", "P-",
           "pair, tuning apart, 4-row windows"))
PEAKS = {"qwen-1.5b_random_tune_off"}  # runs whose peaks are drawn too (every request's, the first included)


def peak_ratio(v: dict) -> tuple:
    """(batches, the most held during any request of each batch, first or later, as a share of its ceiling)."""
    b = sorted(v["batches"], key=int)
    return [int(x) for x in b], [max(v["batches"][x]["peak_first_gb"], v["batches"][x]["peak_steady_gb"]) /
                                 v["batches"][x]["ceiling_gb"] for x in b]


def ratio(v: dict) -> tuple:
    """(batches, GPU memory in use after each batch as a share of its ceiling, weights + KV caches + 25%)."""
    b = sorted(v["batches"], key=int)
    return [int(x) for x in b], [v["batches"][x]["gpu_used_gb"] / v["batches"][x]["ceiling_gb"] for x in b]


def plot_memory(ax, memory: dict, levers: dict) -> None:
    """Each run's memory as a share of its ceiling (1.0: weights + KV caches + 25%): the base runs of
    gpu_memory_CARD.json, then the lever runs of gpu_memory_levers_CARD.json, in their shape's color."""
    colors = {}
    for k, (s, shape) in enumerate(memory.get("shapes", {}).items()):
        colors[s] = plt.cm.tab10(k)
        v = shape["variants"].get("per_graph_graph_max_16")
        if v is not None and all("ceiling_gb" in x for x in v["batches"].values()):
            weights = "random" if str(shape.get("engines", "")).startswith("random") else "trained"
            ax.plot(*ratio(v), "o:", color=colors[s], label=f"{SHAPES[s]}, no levers ({weights} weights)")
    for run, s, variant, marker, label in CAPPED:
        v = levers.get("runs", {}).get(run, {}).get("variants", {}).get(variant)
        if v is not None:
            color = colors.get(s, plt.cm.tab10(list(SHAPES).index(s) % 10))
            ax.plot(*ratio(v), marker, color=color, label=f"{SHAPES[s]}, {label} (random weights)")
            if run in PEAKS:
                ax.plot(*peak_ratio(v), marker[0] + ":", color=color, label=f"{SHAPES[s]}, {label}: peaks")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0.7, 1.6)  # the 0.5B run without levers (2-2.7x) lies above: its row in gpu_memory_CARD.json
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch")
    ax.set_ylabel("in use after the batch / ((weights + KV) x 1.25)")
    ax.set_title("memory against the ceiling (cuda_graph_max_tokens=16)", fontsize=8)
    legend(ax, 5.5, loc="upper left")  # above the lines, which lie at 0.8-1.2


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
    plot_memory(axes[2], memory, load(res / f"gpu_memory_levers_{args.card}.json") or {})
    gpu = steps.get("gpu") or memory.get("gpu") or "?"
    fig.suptitle(f"{gpu}: Qwen2.5-shaped targets over semantic-ID tokens", fontsize=9)
    fig.tight_layout()
    out = Path(args.out or res / f"llm_{args.card}.png")
    save_png(fig, out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
