"""The layout ablation's arithmetic: chain rounds from per-position acceptance, acceptance by draft depth and by
item slot, and seed statistics (mean, sd, the PAD-Rec gain over EAGLE paired by seed). Pure numpy.

Per-position acceptance: for each output position p of a greedy list (p >= 1; position 0 is the target's
first token, chosen at prefill), `accept_run[p - 1]` is how many draft tokens the target accepts when a chain
round starts at p, up to the probe's depth. The draft's state at a round start depends only on the committed
tokens (it catches up on the target's features of each committed position), so a chain of depth K starting
at p accepts min(accept_run[p - 1], K): the rounds of a chain decode with any K <= the probe's depth follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Round:
    """One greedy chain round of one list."""

    start: int  # output position of the round's first draft token (>= 1)
    proposed: int  # draft tokens in the chain (K)
    accepted: int  # of them, accepted by the target
    committed: int  # tokens the round commits: accepted + the bonus token, none after the list's end


def simulate_chain(accept_run, K: int) -> list:
    """The rounds a greedy chain of depth K makes over one list, from its per-position acceptance."""
    rounds, j, n = [], 0, len(accept_run)
    while j < n:
        a = min(int(accept_run[j]), K, n - j)
        committed = a if a == n - j else a + 1  # the list's last token accepted: the list is done, no bonus
        rounds.append(Round(j + 1, K, a, committed))
        j += committed
    return rounds


def tau(rounds_per_list: list) -> float:
    """Mean tokens committed per verify pass over every round of every list."""
    flat = [r.committed for rounds in rounds_per_list for r in rounds]
    return float(np.mean(flat)) if flat else 0.0


@dataclass
class AcceptanceCounts:
    """Draft tokens the target verified (reached) and accepted, by draft depth (1..K) and by item slot."""

    reached_by_depth: np.ndarray
    accepted_by_depth: np.ndarray
    reached_by_slot: np.ndarray
    accepted_by_slot: np.ndarray

    @classmethod
    def zeros(cls, depth: int, n_slots: int) -> "AcceptanceCounts":
        return cls(*(np.zeros(n, np.int64) for n in (depth, depth, n_slots, n_slots)))

    def add(self, rounds: list, slots) -> None:
        """Count one list's rounds; slots[p]: the item slot of output position p (the draft's slot input)."""
        for r in rounds:
            rejected = r.committed == r.accepted + 1 and r.accepted < r.proposed  # the bonus replaced a draft
            for d in range(1, r.accepted + 1 + rejected):  # depths the target saw
                ok = d <= r.accepted
                s = int(slots[r.start + d - 1])
                self.reached_by_depth[d - 1] += 1
                self.accepted_by_depth[d - 1] += ok
                self.reached_by_slot[s] += 1
                self.accepted_by_slot[s] += ok

    def to_json(self) -> dict:
        return {k: getattr(self, k).tolist() for k in
                ("reached_by_depth", "accepted_by_depth", "reached_by_slot", "accepted_by_slot")}


def rates(accepted, reached) -> list:
    """accepted / reached per entry, None where nothing was reached."""
    return [float(a) / r if r else None for a, r in zip(accepted, reached)]


def mean_sd(values) -> dict:
    """Mean, sample sd (ddof 1; 0 for one value) and count."""
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "n": int(len(x))}


def paired_gain(variant: dict, baseline: dict) -> dict:
    """The variant's gain over the baseline in percent, paired by seed (dicts seed -> value; common seeds only):
    per-seed gains, their mean and sd, the baseline's own seed spread (sd / mean, percent), and whether the mean
    gain is beyond both the baseline's seed spread and the gain's own sd."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return {"seeds": [], "n": 0}
    gains = [100.0 * (variant[s] / baseline[s] - 1.0) for s in seeds]
    g = mean_sd(gains)
    base = mean_sd([baseline[s] for s in seeds])
    spread = 100.0 * base["sd"] / base["mean"]
    t = g["mean"] / (g["sd"] / np.sqrt(g["n"])) if g["n"] > 1 and g["sd"] > 0 else None
    return {"seeds": seeds, "gain_pct": gains, "gain_pct_mean": g["mean"], "gain_pct_sd": g["sd"], "n": g["n"],
            "baseline_seed_spread_pct": spread, "paired_t": t,
            "beyond_seed_spread": bool(g["n"] > 1 and abs(g["mean"]) > max(spread, g["sd"]))}


def _metrics(variant: dict) -> dict:
    """metric name -> tau of one variant in one cell: chain_K<k> for every simulated K, and tree."""
    out = {f"chain_K{k}": v for k, v in variant["tau_chain"].items()}
    out["tree"] = variant["tau_tree"]
    return out


def _acceptance(records: list) -> dict:
    """Acceptance by depth and slot pooled over seeds (and the per-seed rates' sd by depth)."""
    counts = [r["acceptance"] for r in records]
    total = {k: np.sum([c[k] for c in counts], axis=0) for k in counts[0]}
    per_seed = [rates(c["accepted_by_depth"], c["reached_by_depth"]) for c in counts]
    seen = [[p[d] for p in per_seed if p[d] is not None] for d in range(len(per_seed[0]))]
    sd = [mean_sd(x)["sd"] if x else 0.0 for x in seen]
    return {"by_depth": rates(total["accepted_by_depth"], total["reached_by_depth"]), "by_depth_sd": sd,
            "by_slot": rates(total["accepted_by_slot"], total["reached_by_slot"]),
            "reached_by_depth": total["reached_by_depth"].tolist(),
            "reached_by_slot": total["reached_by_slot"].tolist()}


def summarize_group(cells: list, baseline: str = "eagle") -> dict:
    """One layout x data set over its seeds: tau mean +- sd per variant and metric, every variant's gain over
    the baseline paired by seed, acceptance by depth and slot, and recommendation quality."""
    by_seed = {c["seed"]: c for c in cells}
    variants = list(cells[0]["variants"])
    tau = {v: {m: {s: _metrics(c["variants"][v])[m] for s, c in by_seed.items() if v in c["variants"]}
               for m in _metrics(cells[0]["variants"][v])} for v in variants}
    out = {"seeds": sorted(by_seed), "tau": {v: {m: mean_sd(list(x.values())) for m, x in ms.items()}
                                              for v, ms in tau.items()}}
    if baseline in tau:
        out["gain_vs_" + baseline] = {v: {m: paired_gain(tau[v][m], tau[baseline][m]) for m in tau[v]}
                                      for v in variants if v != baseline}
    out["acceptance"] = {v: _acceptance([c["variants"][v] for c in cells]) for v in variants}
    target = [c["target"]["quality"] for c in cells]
    quality = {"target": {k: mean_sd([q[k] for q in target]) for k in target[0]}}
    quality.update(cells[0]["baselines"])  # the same users and lists in every cell of a data set
    out["quality"] = quality
    return out


def summarize(cells: list) -> dict:
    """Every layout x data set that has cells: `summarize_group` under "<layout>/<dataset>"."""
    groups: dict = {}
    for c in cells:
        groups.setdefault(f"{c['layout']}/{c['dataset']}", []).append(c)
    return {k: summarize_group(sorted(v, key=lambda c: c["seed"])) for k, v in sorted(groups.items())}
