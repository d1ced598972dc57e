"""`padrec parity` passes on good engines and names the output of a perturbed graph; `padrec bench` reports."""
import json
import subprocess
import sys

import numpy as np
import pytest
import onnx
from onnx import numpy_helper

from padrec_export.bench import bench_plot, bench_table, run_bench
from padrec_export.checkpoint import save_draft, save_target
from padrec_runtime import Recommender, RuntimeOptions
from padrec_runtime.manifest import load_manifest, write_manifest
from tests.conftest import polygraphy_cli


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "padrec_export.cli", *args], capture_output=True, text=True)


def _checkpoints(tiny, tmp_path):
    cat, target, draft = tiny
    save_target(target, tmp_path / "target")
    save_draft(draft, tmp_path / "draft")
    return tmp_path / "target", tmp_path / "draft"


def test_parity_passes_then_fails_on_a_perturbed_graph(tiny, engines, tmp_path):
    t, d = _checkpoints(tiny, tmp_path)
    ok = _cli("parity", "--engines", str(engines), "--target", str(t), "--draft", str(d), "--histories", "8",
              "--report", str(tmp_path / "ok.json"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and json.loads((tmp_path / "ok.json").read_text())["ok"]
    assert (tmp_path / "ok.md").read_text().startswith("# padrec parity")
    rows = json.loads((tmp_path / "ok.json").read_text())["tiers"]["graphs"]["rows"]
    assert {r["case"] for r in rows if r["graph"] == "target_gqa"} == {"prompt", "verify_after_cache"}

    for graph in ("target", "target_gqa"):
        model = onnx.load(engines / f"{graph}.onnx")
        init = next(i for i in model.graph.initializer if "lm_head" in i.name or i.name.endswith("weight")
                    and len(i.dims) == 2)
        w = numpy_helper.to_array(init).copy()
        w[:, :4] += 0.05  # a small, real-looking corruption of one weight
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        onnx.save(model, engines / f"{graph}.onnx")
    write_manifest(engines, load_manifest(engines, verify=False).data)  # re-sign: only numbers can catch it now
    bad = _cli("parity", "--engines", str(engines), "--target", str(t), "--draft", str(d), "--histories", "8",
               "--report", str(tmp_path / "bad.json"))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL target/" in bad.stdout and "tier 1 graphs: FAIL" in bad.stdout
    report = json.loads((tmp_path / "bad.json").read_text())
    failed = {r["output"] for r in report["tiers"]["graphs"]["rows"] if not r["ok"]}
    assert failed and {r["graph"] for r in report["tiers"]["graphs"]["rows"] if not r["ok"]} == {"target", "target_gqa"}


def test_polygraphy_runs_with_the_shipped_data_loader(engines_master):
    out = subprocess.run([polygraphy_cli(), "run", str(engines_master / "draft.onnx"), "--onnxrt",
                          "--data-loader-script", "tools/polygraphy_loader.py:load_draft"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "PASSED" in out.stdout + out.stderr


def test_bench_histories_come_from_the_data_set_only_when_the_catalogue_holds_their_items(engines_master):
    """Held-out MovieLens users when the engines' catalogue has every item they name; engines of another catalogue
    (the tiny test engines: 60 items) get random histories of their own items instead of ids they would refuse,
    and the source says why."""
    import types

    from padrec_export.bench import bench_histories
    from padrec_export.data import load_dataset
    pytest.importorskip("recbole")
    load_dataset("ml-100k")  # the data package is there (else this test has nothing to compare)
    rec = Recommender(engines_master)
    hists, source = bench_histories(rec, 5, "ml-100k")
    assert "lacks" in source and source.startswith("random catalogue histories"), source
    assert len(hists) == 5 and all(set(h) <= {int(i) for i in rec.catalogue.item_ids} for h in hists)
    every_id = types.SimpleNamespace(catalogue=types.SimpleNamespace(item_ids=np.arange(1 << 17)), limits=rec.limits)
    hists, source = bench_histories(every_id, 5, "ml-100k")
    assert source == "ml-100k held-out users" and len(hists) == 5
    assert any(max(h) > 60 for h in hists)  # MovieLens ids, not the tiny catalogue's
    assert bench_histories(rec, 3, None)[1] == "random catalogue histories"


def test_bench_reports_every_mode_and_plots(tiny, engines_master, tmp_path):
    t, d = _checkpoints(tiny, tmp_path)
    report = run_bench(engines_master, batches=(1, 2), repeats=1, target_dir=t, draft_dir=d, dataset=None,
                       progress=False, options=RuntimeOptions(threads=2))
    assert report["runtime"]["threads"] == 2  # the options reach the runtime, and the report says so
    rows = report["rows"]
    assert {(r["backend"], r["mode"], r["batch"]) for r in rows} == {
        (e, m, b) for e in ("onnxruntime", "pytorch-eager") for m in ("off", "chain", "tree") for b in (1, 2)}
    assert all(r["ms_per_list_median"] > 0 and r["tau"] >= 1 for r in rows)
    # per list is the batch call's latency over its lists
    assert all(abs(r["ms_per_list_median"] * r["batch"] - r["ms_per_call_median"]) < 1e-9 for r in rows)
    table = bench_table(report).splitlines()
    assert "ms/call (median)" in table[0] and "ms/list" in table[0] and len(table) == 2 + len(rows)
    assert all(r["tau"] == 1 for r in rows if r["mode"] == "off")
    assert report["hardware"]["cpu_count"] >= 1 and "onnxruntime" in report["hardware"]
    bench_plot(report, tmp_path / "bench.png")
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert np.isfinite([r["speedup_vs_ar"] for r in rows]).all()


def test_bench_refuses_a_batch_past_the_engines_and_a_draft_without_its_target(engines_master, tmp_path):
    """Both before any history is drawn or any point is timed."""
    from padrec_runtime.errors import InputError
    too_many = load_manifest(engines_master, verify=False).model["max_batch"] + 1
    with pytest.raises(InputError, match=f"bench: batch {too_many} \\| the engines take at most {too_many - 1}"):
        run_bench(engines_master, batches=[1, too_many], repeats=1, progress=False)
    with pytest.raises(InputError, match="a draft checkpoint without --target"):
        run_bench(engines_master, batches=[1], repeats=1, draft_dir=tmp_path, progress=False)
