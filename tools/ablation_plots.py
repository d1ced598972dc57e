"""The layout ablation's two figures, from its report: tau by draft variant per layout and data set, and
acceptance by draft depth and by item slot, plain EAGLE against PAD-Rec."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from padrec_export.figures import save_png  # noqa: E402

METRICS = (("chain_K4", "chain K=4"), ("chain_K8", "chain K=8"), ("tree", "tree"))
PAIR = (("eagle", "plain EAGLE", "C0"), ("padrec", "PAD-Rec", "C3"))


def _grid(report: dict, rows_per_dataset: int, width: float, height: float):
    summary = report["summary"]
    layouts = [x for x in report["config"]["layouts"] if any(k.startswith(x + "/") for k in summary)]
    datasets = [x for x in report["config"]["datasets"] if any(k.endswith("/" + x) for k in summary)]
    fig, axes = plt.subplots(rows_per_dataset * len(datasets), len(layouts), squeeze=False,
                             figsize=(max(8.0, width * len(layouts)), 0.6 + height * rows_per_dataset * len(datasets)))
    return fig, axes, layouts, datasets, summary


def _title(report: dict) -> str:
    hw = report.get("hardware", {})
    card = ", ".join(hw.get("gpus", [])) or hw.get("cpu", "?")
    c = report["config"]
    return (f"{card}\ntarget {c['layers']} layers x {c['hidden']}, {c['target_epochs']} epochs; drafts "
            f"{c['draft_epochs']} epochs, unroll {c['unroll']}; {c['eval_users']} held-out users; mean +- sd over "
            "seeds")


def plot_tau(report: dict, path) -> None:
    """Bars: tau (chain K=4, K=8, tree) of every variant, a panel per layout (columns) and data set (rows),
    each panel titled with PAD-Rec's gain over EAGLE at chain K=4 (paired by seed)."""
    fig, axes, layouts, datasets, summary = _grid(report, 1, 4.6, 3.6)
    for r, ds in enumerate(datasets):
        for c, lay in enumerate(layouts):
            ax, group = axes[r][c], summary.get(f"{lay}/{ds}")
            if group is None:
                ax.set_axis_off()
                continue
            variants = list(group["tau"])
            for m, (key, label) in enumerate(METRICS):
                xs = [i + (m - 1) * 0.27 for i in range(len(variants))]
                ys = [group["tau"][v][key]["mean"] for v in variants]
                ax.bar(xs, ys, 0.27, yerr=[group["tau"][v][key]["sd"] for v in variants], label=label, capsize=2)
            ax.set_xticks(range(len(variants)), variants, rotation=30, fontsize=7)
            lo = min(group["tau"][v]["chain_K4"]["mean"] for v in variants)
            ax.set_ylim(0.8 * lo, None)
            g = group.get("gain_vs_eagle", {}).get("padrec", {}).get("chain_K4", {})
            gain = f"PAD-Rec {g['gain_pct_mean']:+.2f}% +- {g['gain_pct_sd']:.2f}" if g.get("n") else ""
            ax.set_title(f"{lay} / {ds} ({len(group['seeds'])} seeds)\n{gain}", fontsize=8)
            ax.set_ylabel("tau (tokens per verify)", fontsize=7)
            ax.grid(True, axis="y", alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper right", fontsize=7)
    fig.suptitle(_title(report), fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def _slot_labels(n_slots: int) -> list:
    return [str(s) for s in range(n_slots - 2)] + ["sep", "other"]


def plot_acceptance(report: dict, path) -> None:
    """Per layout (columns) and data set: acceptance by draft depth (lines, +- sd over seeds) and by item slot
    (bars), plain EAGLE against PAD-Rec; chain rounds at the deepest K."""
    fig, axes, layouts, datasets, summary = _grid(report, 2, 4.4, 3.0)
    for r, ds in enumerate(datasets):
        for c, lay in enumerate(layouts):
            group = summary.get(f"{lay}/{ds}")
            depth_ax, slot_ax = axes[2 * r][c], axes[2 * r + 1][c]
            if group is None:
                depth_ax.set_axis_off(), slot_ax.set_axis_off()
                continue
            for k, (v, label, color) in enumerate(PAIR):
                acc = group["acceptance"].get(v)
                if acc is None:
                    continue
                depths = list(range(1, len(acc["by_depth"]) + 1))
                depth_ax.set_xticks(depths)
                depth_ax.errorbar(depths, [x if x is not None else float("nan") for x in acc["by_depth"]],
                                  yerr=acc["by_depth_sd"], label=label, color=color, marker="o", capsize=2)
                slots = [x if x is not None else 0.0 for x in acc["by_slot"]]
                slot_ax.bar([s + (k - 0.5) * 0.4 for s in range(len(slots))], slots, 0.4, label=label, color=color)
            n_slots = len(group["acceptance"]["eagle"]["by_slot"])
            slot_ax.set_xticks(range(n_slots), _slot_labels(n_slots), fontsize=7)
            depth_ax.set_title(f"{lay} / {ds}: by draft depth", fontsize=8)
            slot_ax.set_title(f"{lay} / {ds}: by item slot", fontsize=8)
            for ax in (depth_ax, slot_ax):
                ax.set_ylim(0, 1)
                ax.set_ylabel("acceptance", fontsize=7)
                ax.grid(True, alpha=0.3)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper right", fontsize=7)
    fig.suptitle(_title(report) + "\nacceptance = accepted / verified draft tokens (chain rounds at the deepest K)",
                 fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)
