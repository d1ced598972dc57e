"""Plot benchmarks/results/gpu_bench_h200.json: ms per list by engine and batch size (log scale)."""
import json
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from padrec_export.figures import save_png  # noqa: E402


def main(path="benchmarks/results/gpu_bench_h200.json", out="benchmarks/results/gpu_bench_h200.png"):
    d = json.load(open(path))
    series = {}
    for r in d["rows"]:
        if "/eagle" in r["engine"] or "-static" in r["engine"]:  # in the JSON; the plot keeps to the comparison
            continue
        label = f"{r['engine']} {r['mode']}".replace("padrec-ort-cuda-dynamic", "ours, no CUDA graphs").replace(
            "padrec-ort-cuda-standard-target", "ours, standard target").replace(
            "padrec-ort-cuda", "ours (ORT CUDA graphs)").replace("/padrec", "").replace("/auto auto", " auto")
        series.setdefault(label, {})[r["batch"]] = r["ms_per_list"]
    batches = sorted({r["batch"] for r in d["rows"]})
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(series)
    for k, (label, pts) in enumerate(sorted(series.items())):
        ax.bar(np.arange(len(batches)) + k * width, [pts.get(b, np.nan) for b in batches], width, label=label,
               color=plt.cm.tab20(k % 20))
    ax.set_xticks(np.arange(len(batches)) + 0.4 - width / 2, [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("ms per list (median; batch 1: users in turn)")
    floor = d.get("floor", {}).get("floor_ms_per_target_step")
    ax.set_title(f"{d.get('gpu', '?')}: Qwen2.5-0.5B-shaped target (fp16), 10-item lists (50 tokens); "
                 f"weight floor {floor:.2f} ms/step", fontsize=9)
    ax.legend(fontsize=6.5, ncol=3)
    fig.tight_layout()
    save_png(fig, out, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
