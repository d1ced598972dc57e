"""The layout ablation's arithmetic (chain rounds from per-position acceptance, acceptance by depth and slot,
seed statistics and the paired gain) on hand-made traces, and its probe against a real chain decode."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
from ablation_stats import (AcceptanceCounts, Round, mean_sd, paired_gain, rates, simulate_chain,  # noqa: E402
                            summarize_group, tau)


def test_chain_rounds_follow_the_per_position_acceptance():
    # output positions 1..9 of a 10-token list; accept_run[p - 1]: draft tokens accepted from a round at p
    run = [2, 0, 5, 1, 0, 3, 2, 1, 0]
    assert simulate_chain(run, 3) == [Round(1, 3, 2, 3), Round(4, 3, 1, 2), Round(6, 3, 3, 4)]
    assert simulate_chain(run, 1) == [Round(1, 1, 1, 2), Round(3, 1, 1, 2), Round(5, 1, 0, 1), Round(6, 1, 1, 2),
                                      Round(8, 1, 1, 2)]
    # the list's last token accepted ends it: that round has no bonus token
    assert simulate_chain([1, 2, 1], 4) == [Round(1, 4, 1, 2), Round(3, 4, 1, 1)]
    assert tau([simulate_chain([1, 2, 1], 4)]) == pytest.approx(1.5)
    # every token is committed exactly once, whatever K
    for K in range(1, 9):
        assert sum(r.committed for r in simulate_chain(run, K)) == len(run)


def test_acceptance_is_counted_by_depth_and_by_the_slot_of_each_verified_draft_token():
    slots = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # slot of output positions 0..9 (2 = separator, 3 unused)
    counts = AcceptanceCounts.zeros(3, 4)
    counts.add([Round(1, 3, 2, 3), Round(4, 3, 1, 2), Round(6, 3, 3, 4)], slots)
    # round at 1: depths 1, 2 accepted (slots 1, 2), depth 3 rejected (slot 0); round at 4: depth 1 accepted
    # (slot 1), depth 2 rejected (slot 2); round at 6: all three accepted (slots 0, 1, 2), no rejection
    assert counts.reached_by_depth.tolist() == [3, 3, 2]
    assert counts.accepted_by_depth.tolist() == [3, 2, 1]
    assert counts.reached_by_slot.tolist() == [2, 3, 3, 0]
    assert counts.accepted_by_slot.tolist() == [1, 3, 2, 0]
    assert rates(counts.accepted_by_slot, counts.reached_by_slot) == [0.5, 1.0, pytest.approx(2 / 3), None]
    end = AcceptanceCounts.zeros(4, 4)
    end.add([Round(3, 4, 1, 1)], slots)  # the list ended after one accepted token: nothing was rejected
    assert end.reached_by_depth.tolist() == [1, 0, 0, 0] and end.accepted_by_depth.tolist() == [1, 0, 0, 0]


def test_mean_sd_and_the_gain_paired_by_seed():
    assert mean_sd([1.0, 2.0, 3.0]) == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert mean_sd([4.0]) == {"mean": 4.0, "sd": 0.0, "n": 1}
    eagle = {0: 4.0, 1: 4.1, 2: 3.9}
    g = paired_gain({0: 4.2, 1: 4.3, 2: 4.1, 7: 9.9}, eagle)  # seed 7 has no EAGLE pair: left out
    assert g["seeds"] == [0, 1, 2]
    assert g["gain_pct"] == pytest.approx([5.0, 100 * (4.3 / 4.1 - 1), 100 * (4.1 / 3.9 - 1)])
    assert g["gain_pct_mean"] == pytest.approx(np.mean(g["gain_pct"]))
    assert g["gain_pct_sd"] == pytest.approx(np.std(g["gain_pct"], ddof=1))
    assert g["baseline_seed_spread_pct"] == pytest.approx(2.5)  # sd 0.1 over mean 4.0
    assert g["beyond_seed_spread"]
    small = paired_gain({0: 4.01, 1: 4.09, 2: 3.92}, eagle)  # +0.25, -0.24, +0.51 %: inside the 2.5 % spread
    assert not small["beyond_seed_spread"] and small["gain_pct_mean"] == pytest.approx(0.1737, abs=1e-3)
    noisy = paired_gain({0: 4.2, 1: 4.1, 2: 4.3}, {0: 4.0, 1: 4.0, 2: 4.0})  # no baseline spread, gain sd 2.5 %
    assert noisy["baseline_seed_spread_pct"] == 0.0 and noisy["beyond_seed_spread"]
    assert not paired_gain({0: 4.2, 1: 3.7}, {0: 4.0, 1: 4.0})["beyond_seed_spread"]  # +5 %, -7.5 %: sd 8.8 %


def _cell(seed, eagle_k4, padrec_k4, accepted):
    counts = {"reached_by_depth": [4, 2], "accepted_by_depth": [accepted, 1], "reached_by_slot": [3, 3],
              "accepted_by_slot": [accepted, 1]}
    variant = lambda k4: {"tau_chain": {"4": k4}, "tau_tree": k4 + 1, "acceptance": counts}  # noqa: E731
    return {"seed": seed, "variants": {"eagle": variant(eagle_k4), "padrec": variant(padrec_k4)},
            "target": {"quality": {"recall@10": 0.1 * (seed + 1)}}, "baselines": {"popularity": {"recall@10": 0.05}}}


def test_a_layout_summary_pools_seeds():
    s = summarize_group([_cell(0, 3.0, 3.3, 2), _cell(1, 3.2, 3.2, 4)])
    assert s["seeds"] == [0, 1]
    assert s["tau"]["eagle"]["chain_K4"] == pytest.approx({"mean": 3.1, "sd": 0.1414, "n": 2}, abs=1e-4)
    assert s["tau"]["padrec"]["tree"]["mean"] == pytest.approx(4.25)
    gain = s["gain_vs_eagle"]["padrec"]["chain_K4"]
    assert gain["gain_pct"] == pytest.approx([10.0, 0.0])
    acc = s["acceptance"]["eagle"]
    assert acc["by_depth"] == [0.75, 0.5]  # (2 + 4) / 8, (1 + 1) / 4
    assert acc["by_depth_sd"][0] == pytest.approx(np.std([0.5, 1.0], ddof=1))
    assert acc["by_slot"] == [1.0, pytest.approx(1 / 3)]
    assert s["quality"]["target"]["recall@10"]["mean"] == pytest.approx(0.15)
    assert s["quality"]["popularity"] == {"recall@10": 0.05}


def test_the_probe_gives_the_rounds_of_real_chain_decodes():
    """The probe commits one token a round and records how far the chain would have been accepted; the rounds
    it implies for each K are the rounds a real greedy chain decode with that K makes (CPU, fp32: exactly)."""
    pytest.importorskip("torch")
    from ablation_cell import decode, probe_acceptance
    from padrec_export.tiny import TinySpec, tiny_setup
    from padrec_runtime.grammar import ListConstraint
    cat, target, draft = tiny_setup(TinySpec(seed=1, levels=3, codebook=8, heads=4, kv_heads=2))
    con = ListConstraint(cat, n_items=6)
    rng = np.random.default_rng(7)
    hist = [rng.choice(cat.item_ids, size=n, replace=False).tolist() for n in (1, 3, 6, 9)]
    runs, tokens = probe_acceptance(target, draft, hist, con, depth=6, batch=4)
    ar, _ = decode(target, None, hist, con, 4, speculate="off")
    assert tokens == ar and [len(r) for r in runs] == [len(t) - 1 for t in tokens]
    assert max(max(r) for r in runs) >= 2  # some chains were accepted two deep: the check exercises acceptance
    for K in (1, 3, 5):
        _, committed = decode(target, draft, hist, con, 4, speculate="chain", draft_steps=K)
        assert [[x.committed for x in simulate_chain(r, K)] for r in runs] == committed, K


def test_records_are_reused_only_with_the_same_settings_and_the_report_names_what_is_missing(tmp_path):
    pytest.importorskip("torch")
    import json
    from ablation_cell import GridConfig
    from ablation_layouts import load_records, write_report
    cfg = GridConfig.quick()
    mine = {**_cell(0, 3.0, 3.3, 2), "layout": "per_level", "dataset": "ml-100k", "settings": cfg.cell_settings()}
    other = {**mine, "layout": "shared", "settings": {**cfg.cell_settings(), "draft_epochs": 9}}
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / "per_level_ml-100k_s0.json").write_text(json.dumps(mine))
    (tmp_path / "cells" / "shared_ml-100k_s0.json").write_text(json.dumps(other))
    records = load_records(tmp_path, None, cfg)
    assert list(records) == ["per_level_ml-100k_s0"]
    records["digits_ml-100k_s0"] = {"skipped": "no digits layout here"}
    write_report(tmp_path, cfg, records, {}, None)
    report = json.loads((tmp_path / "ablation_layouts.json").read_text())
    assert list(report["cells"]) == ["per_level_ml-100k_s0"] and list(report["summary"]) == ["per_level/ml-100k"]
    assert report["missing"] == {"shared_ml-100k_s0": {"skipped": "not run"},
                                 "digits_ml-100k_s0": {"skipped": "no digits layout here"}}


def test_wall_clock_of_cells_trained_by_an_earlier_run_is_kept(tmp_path):
    """A resumed run has no engines for the cells it did not train: their timing is the earlier report's, and a key
    with neither engines nor an earlier timing says why it is missing."""
    pytest.importorskip("torch")
    from ablation_cell import GridConfig
    from ablation_layouts import wallclock
    timed = {"ar": {"ms_per_list_median": 31.7}, "eagle": {"ms_per_list_median": 27.8}}
    summary = {"per_level/ml-100k": {}, "shared/ml-100k": {}}
    out = wallclock(GridConfig.quick(), tmp_path, summary, deadline=0.0,
                    earlier={"per_level/ml-100k": timed, "shared/ml-100k": {"skipped": "no time left"}})
    assert out["per_level/ml-100k"] == timed
    assert "no seed-0 engines" in out["shared/ml-100k"]["skipped"]


def test_wall_clock_cut_short_by_the_budget_keeps_the_earlier_timing(tmp_path):
    """Past --budget-s, a key whose engines are here is not timed: it keeps the earlier report's timing where there
    is one, and says that time ran out where there is none."""
    pytest.importorskip("torch")
    from ablation_cell import Cell, GridConfig
    from ablation_layouts import wallclock
    cfg = GridConfig.quick()
    for layout in ("per_level", "shared"):
        for draft in ("padrec", "eagle"):
            (tmp_path / "engines" / Cell(layout, "ml-100k", min(cfg.seeds)).name / draft).mkdir(parents=True)
    timed = {"ar": {"ms_per_list_median": 31.7}, "eagle": {"ms_per_list_median": 27.8}}
    out = wallclock(cfg, tmp_path, {"per_level/ml-100k": {}, "shared/ml-100k": {}}, deadline=0.0,
                    earlier={"per_level/ml-100k": timed})
    assert out["per_level/ml-100k"] == timed
    assert out["shared/ml-100k"] == {"skipped": "no time left within --budget-s"}
