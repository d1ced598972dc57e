"""The GPU tools' own arithmetic (what they report comes from it): where lists leave AR's, and how a trace's
GPU idle gaps are split among the host's CUDA calls. The GPU runs themselves happen on the device machine."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from gpu_bench import Bench, bench_padrec_vs_eagle_b1, check_against_ar, first_differences  # noqa: E402
from gpu_trace import idle_report, union  # noqa: E402


def test_first_differences_names_row_position_and_tokens():
    ar = [[5, 6, 8, 2], [1, 2, 3, 2], [4, 4, 2]]
    got = [[5, 6, 7, 2], [1, 2, 3, 2], [4, 4]]
    assert first_differences(got, ar) == [
        {"row": 0, "at": 2, "ar": 8, "got": 7, "prefix": [5, 6]},
        {"row": 2, "at": 2, "ar": 2, "got": None, "prefix": [4, 4]}]
    assert first_differences(ar, ar) == []



class _FixedLists:
    """A recommender stand-in whose every list is `tokens`: what the comparison reads of a result."""

    def __init__(self, tokens):
        self.tokens = tokens

    def recommend(self, histories, params=None):
        from padrec_runtime.api.recommender import Recommendation, RecommendResult
        return RecommendResult([Recommendation([], [], None, list(self.tokens)) for _ in histories], 2.0, 1, [[2]],
                               {"total": 0.0})

    def close(self):
        pass


def test_padrec_against_eagle_says_whether_each_drafts_lists_are_ar_s(tmp_path):
    bench = Bench(tmp_path, "cpu", users=[[11], [12]], hist_all=[[11], [12]], repeats=1,
                  report={"ar_tokens": {1: [[5, 6, 2], [5, 6, 2]]}})
    bench.open_rec = lambda eng, **opts: _FixedLists([5, 7, 2])  # EAGLE's lists leave AR's at the second token
    res = bench_padrec_vs_eagle_b1(bench, {"eagle": "eng_eagle"}, {}, _FixedLists([5, 6, 2]))
    assert res["chain"]["identical_to_ar"] == res["tree"]["identical_to_ar"] == {"padrec": True, "eagle": False}
    bench.report.pop("ar_tokens")  # no section before timed AR: nothing to compare with
    assert bench_padrec_vs_eagle_b1(bench, {"eagle": "e"}, {}, _FixedLists([5, 6, 2]))["chain"]["identical_to_ar"] == {
        "padrec": None, "eagle": None}


def test_lists_are_checked_against_the_first_ar_lists_of_their_batch(tmp_path):
    bench = Bench(tmp_path, "cpu", users=[[11]], hist_all=[[11], [12]], repeats=1, report={})
    assert check_against_ar(bench, [[5, 6, 2]], "padrec-ort", "padrec", "off", 1)
    assert bench.report["ar_tokens"] == {1: [[5, 6, 2]]} and "mismatches" not in bench.report
    assert not check_against_ar(bench, [[5, 7, 2]], "padrec-ort", "padrec", "off", 1)  # a later AR run is checked
    assert bench.report["ar_tokens"] == {1: [[5, 6, 2]]}  # the first AR lists stay the reference
    assert not check_against_ar(bench, [[5, 6, 3]], "padrec-ort", "eagle", "chain", 1)
    assert bench.report["mismatches"][-1] == {
        "engine": "padrec-ort", "draft": "eagle", "mode": "chain", "batch": 1,
        "rows": [{"row": 0, "at": 2, "ar": 2, "got": 3, "prefix": [5, 6]}], "same_as_batch1_ar": False}
    assert len(bench.report["mismatches"]) == 2

def _event(start, end, device, name="kernel"):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device, name=name)


def test_idle_report_splits_gaps_among_cuda_calls():
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [_event(0, 100, cuda), _event(90, 150, cuda), _event(300, 400, cuda), _event(500, 520, cuda),
              _event(160, 250, cpu, "cudaEventSynchronize"), _event(260, 290, cpu, "cudaGraphLaunch"),
              _event(0, 10, cpu, "aten::add"),  # not a CUDA call: ignored
              # phases: step spans both gaps, verify nests in it over 170-280, Pending.result in verify 200-220
              _event(140, 480, cpu, "DecodeSession.step"), _event(170, 280, cpu, "DecodeSession._verify"),
              _event(200, 220, cpu, "Pending.result")]
    assert union([(0, 100), (90, 150), (300, 400)]) == [[0, 150], [300, 400]]
    r = idle_report(SimpleNamespace(events=lambda: events), wall_ms=1.0)
    assert r["gpu_busy_ms"] == pytest.approx(0.27)  # 150 + 100 + 20 us
    assert r["gaps"] == 2 and r["idle_in_gaps_ms"] == pytest.approx(0.25)  # 150-300, 400-500
    assert r["idle_gaps_by_cuda_call_ms"] == pytest.approx({"cudaEventSynchronize": 0.09, "cudaGraphLaunch": 0.03})
    assert r["idle_gaps_host_outside_cuda_calls_ms"] == pytest.approx(0.13)
    assert r["cuda_calls"]["cudaGraphLaunch"] == {"count": 1, "ms": pytest.approx(0.03)}
    # 150-300: step 150-170 and 280-300, verify 170-200 and 220-280, result 200-220; 400-480 step, 480-500 none
    assert r["idle_gaps_by_phase_ms"] == pytest.approx({"DecodeSession.step": 0.12, "DecodeSession._verify": 0.09,
                                                        "Pending.result": 0.02, "none": 0.02})


def test_verify_parity_compares_steps_and_one_pass_over_the_same_cache(tmp_path):
    """The step profile's parity check on CPU in fp32: 8 one-token steps over the in-place cache and one 8-token
    pass agree to float rounding (a harness that lost a step's KV or reused an output buffer would not)."""
    import numpy as np
    import gpu_step_profile as sp
    import padrec_export.models as models
    from padrec_export.fused import export_gqa_target
    cfg = models.TargetConfig(vocab_size=120, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=96, qkv_bias=True)
    torch.manual_seed(0)
    export_gqa_target(models.Target(cfg), "fp32", 48, tmp_path / "t.onnx")
    sp.DEVICE = "cpu"
    r = sp.verify_parity(tmp_path / "t.onnx", cfg, past=20, max_len=48, dtype=np.float32)
    assert r["T"] == 8 and r["argmax_equal_positions"] == 8
    assert r["logits"]["max_abs_diff"] < 1e-4 and r["hidden"]["max_abs_diff"] < 1e-4


def test_step_profile_shape_sets_the_profiled_layers():
    """--shape picks the layer shape from padrec_export/sizes.py (--layers its depth); a shape it lacks is refused."""
    import gpu_step_profile as sp
    from padrec_export.sizes import SIZES
    args = sp.parse_args(["--shape", "qwen-1.5b", "--layers", "1", "--cpu"])
    sp.DEVICE = "cpu"
    cfg, _ = sp.random_target(args.shape, args.layers, 64)
    s = SIZES["qwen-1.5b"]
    assert (cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.n_layers) == (
        s.hidden, s.heads, s.kv_heads, s.intermediate, 1)
    with pytest.raises(SystemExit):
        sp.parse_args(["--shape", "qwen-9b"])
    assert sp.parse_args(["--graphs", "gqa,compiled"]).graphs == "gqa,compiled"
    with pytest.raises(SystemExit):
        sp.parse_args(["--graphs", "gqa,eager"])


def test_step_profile_sessions_run_on_the_weights_they_are_given(tmp_path):
    """device_weights puts a graph's initializers on the device once; a session given them (VARIANT "weights")
    computes with those, not with its own copy from the file: with the head's weights zeroed, its logits are zero."""
    import numpy as np
    import onnxruntime as ort
    import gpu_step_profile as sp
    import padrec_export.models as models
    from padrec_export.fused import export_gqa_target
    cfg = models.TargetConfig(vocab_size=120, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              intermediate_size=96)
    torch.manual_seed(0)
    export_gqa_target(models.Target(cfg), "fp32", 48, tmp_path / "t.onnx")
    sp.DEVICE = "cpu"
    values, arrays = sp.device_weights(tmp_path / "t.onnx")
    assert "lm_head" in values and len(values) == len(arrays)
    feeds = sp.gqa_feeds_for(cfg, 1, 20, 48, np.float32)
    zero = np.zeros_like(values["lm_head"].numpy())  # outlives the OrtValue that wraps it
    logits = {}
    for name, given in (("own", {}), ("given", values),
                        ("zero_head", {**values, "lm_head": ort.OrtValue.ortvalue_from_numpy(zero)})):
        sp.VARIANT.update({"weights": given})
        try:
            sess = sp.session(tmp_path / "t.onnx", {"batch": 1, "seq": 1, "max_seq_len": 48}, graph=False)
        finally:
            sp.VARIANT.clear()
        logits[name] = sess.run(["logits"], {k: v.copy() for k, v in feeds.items()})[0]
    assert np.abs(logits["own"]).max() > 1e-3
    assert np.array_equal(logits["own"], logits["given"]) and not logits["zero_head"].any()


def test_bench_sections_parse_and_name_the_valid_ones():
    """--sections takes a comma-separated subset of the bench's sections; anything else is refused with the list."""
    import argparse

    from gpu_bench import SECTIONS, parse_args, sections_arg
    assert sections_arg("headline,pytorch") == {"headline", "pytorch"}
    assert parse_args(["--work", "w"]).sections == set(SECTIONS)  # the default: every section
    for bad in ("", "headline,profile"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a comma-separated subset of configs"):
            sections_arg(bad)


def test_bench_drafts_parse_and_the_eagle_section_needs_eagle(capsys):
    """--drafts names the drafts a pair trains and benches, PAD-Rec first; the PAD-Rec/EAGLE section is refused
    without EAGLE's draft, before any training starts."""
    import argparse

    from gpu_bench import drafts_arg, parse_args
    assert drafts_arg("padrec") == ["padrec"] and drafts_arg("padrec,eagle") == ["padrec", "eagle"]
    for bad in ("eagle", "padrec,padrec", "padrec,medusa", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected padrec, then any others of"):
            drafts_arg(bad)
    assert parse_args(["--work", "w", "--drafts", "padrec", "--sections", "headline"]).drafts == ["padrec"]
    with pytest.raises(SystemExit):
        parse_args(["--work", "w", "--drafts", "padrec"])  # every section, eagle included
    assert "--sections eagle: compares PAD-Rec with EAGLE | add eagle to --drafts" in capsys.readouterr().err
    assert parse_args(["--work", "w", "--drafts", "padrec", "--stages", "train,export"]).drafts == ["padrec"]


def test_llm_plot_draws_the_committed_results_and_tolerates_missing_ones(tmp_path):
    """tools/plot_llm.py draws the committed H200 and H100 results; a results folder without them still gives a figure."""
    import shutil

    from plot_llm import main as plot_llm
    plot_llm(["--results", str(ROOT / "benchmarks/results"), "--out", str(tmp_path / "llm.png")])
    assert (tmp_path / "llm.png").stat().st_size > 10_000
    plot_llm(["--results", str(ROOT / "benchmarks/results"), "--card", "h100", "--out", str(tmp_path / "h100.png")])
    assert (tmp_path / "h100.png").stat().st_size > 10_000
    from PIL import Image
    with Image.open(tmp_path / "h100.png") as image:  # written as a 256-colour PNG (padrec_export.figures)
        assert image.mode == "P" and image.format == "PNG"
    # on the H100 each step comes from the paired timing (both compile modes where both ran), the quantized rows
    # beside 7B's; without it, 1.5B's from the trained pair's bench and 7B's from the random-weight steps
    from plot_llm import load, step_bars
    res = ROOT / "benchmarks/results"
    steps = load(res / "llm_steps_h100.json")
    benches = {s: load(res / f"gpu_bench_{s}_h100.json") for s in ("qwen-1.5b", "qwen-7b")}
    bars = step_bars(steps, benches)
    assert [label for label, _, _ in bars["qwen-0.5b"]] == [  # 0.5B's run timed ours with tuning too
        "ours fp16 (paired, back to back)", "ours fp16, GEMM tuning off (paired, back to back)",
        "torch.compile reduce-overhead (paired)", "torch.compile max-autotune (paired)", "fp16 weight floor"]
    assert bars["qwen-0.5b"][0][1] == steps["paired"]["shapes"]["qwen-0.5b"]["steps_paired"]["reduce-overhead"][
        "methods"]["back_to_back"]["T1"]["padrec_ms"]
    assert [label for label, _, _ in bars["qwen-1.5b"]] == [label for label, _, _ in bars["qwen-0.5b"]]  # both modes
    assert [label for label, _, _ in bars["qwen-7b"]] == [  # both modes, the quantized rows after the floor
        label for label, _, _ in bars["qwen-0.5b"]] + ["ours int4", "ours int8"]
    assert bars["qwen-7b"][0][1] == steps["paired"]["shapes"]["qwen-7b"]["steps_paired"]["reduce-overhead"][
        "methods"]["back_to_back"]["T1"]["padrec_ms"]
    del steps["paired"]
    bars = step_bars(steps, benches)
    assert "trained pair" in bars["qwen-1.5b"][0][0]
    labels = [label for label, ms, _ in bars["qwen-7b"] if ms is not None]
    assert labels == ["ours fp16", "ours int4", "ours int8", "torch.compile fp16", "fp16 weight floor"]
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(ROOT / "benchmarks/results/llm_steps_h200.json", empty)
    plot_llm(["--results", str(empty)])
    assert (empty / "llm_h200.png").stat().st_size > 10_000


def test_llm_plan_names_its_steps_and_sizes():
    """tools/gpu_llm_plan.sh refuses an unknown step or pair size with its usage, before touching the machine."""
    import subprocess
    for args in ([], ["launch"], ["train", "3b"], ["bench"], ["memory", "0.5b"], ["paired"], ["paired", "3b"],
                 ["paired-bg", "3b"], ["paired-wait"], ["profile", "9b"]):
        res = subprocess.run(["bash", str(ROOT / "tools/gpu_llm_plan.sh"), *args], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "OUT": "/nonexistent"})
        assert res.returncode == 2 and "usage: gpu_llm_plan.sh train 7b|1.5b" in res.stderr, (args, res.stderr)


def test_compile_cache_twin_has_the_trained_pairs_tensors_and_runs_the_baseline(tmp_path):
    """tools/compile_cache.py warms torch.compile's caches with a random twin of a pair yet to train: the cache hits
    only if every tensor the compiled graphs take has the trained pair's name, shape and dtype once loaded as the
    bench loads it. Then its command runs the baseline eagerly and reports AR and chain rows."""
    pytest.importorskip("recbole")
    import json

    from click.testing import CliRunner

    from compile_cache import main as cache_main, twin_pair
    from padrec_export.cli import main
    from padrec_export.demo import default_model_dir
    from padrec_export.pipeline import load_trained
    models = tmp_path / "models"
    res = CliRunner().invoke(main, ["train", "--size", "tiny", "--out", str(models), "--users", "6", "--epochs", "1",
                                    "--draft-epochs", "1", "--drafts", "padrec"])
    assert res.exit_code == 0, res.output
    cat, target, draft, _ = load_trained(models, "padrec", dtype=None)
    twin = twin_pair("tiny", cat, "cpu", torch.float16)
    for trained, made in zip((target.to("cpu", torch.float16), draft.to("cpu", torch.float16)), twin):
        def tensors(m):
            return {n: (tuple(t.shape), t.dtype) for n, t in [*m.named_parameters(), *m.named_buffers()]}
        assert tensors(made) == tensors(trained)
        assert type(made) is type(trained) and made.cfg == trained.cfg
    cache_main(["--size", "tiny", "--modes", "eager", "--device", "cpu", "--out", str(tmp_path),
                "--catalogue", str(default_model_dir("ml-100k") / "catalogue.json")])
    report = json.loads((tmp_path / "compile_cache.json").read_text())
    assert [r[:3] for r in report["rows"]] == [["pytorch-compiled-eager", "off", 1],
                                               ["pytorch-compiled-eager", "chain", 1]]
    assert set(report["seconds_by_mode"]) == {"eager"}


def test_memory_ledger_logs_each_session_and_first_run_of_each_window(engines_master, tmp_path):
    """tools/gpu_memory.py's smoke run on the CPU takes the GPU's code path (device caches, static buckets) and logs
    every session made, the first run of each (session, graph id) and the runs summed by kind: a batch-7 prefill
    runs in windows of 3 rows (these engines take at most 8), each its own graph id on one session of batch 3."""
    import json
    import subprocess
    res = subprocess.run([sys.executable, str(ROOT / "tools/gpu_memory.py"), "--engines", str(engines_master),
                          "--out", str(tmp_path), "--device", "cpu", "--variants", "per_graph", "--batches", "1,7",
                          "--prefill-rows", "3", "--repeats", "2", "--tag", "smoke"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / f"gpu_memory_{engines_master.name}_smoke.json").read_text())
    assert report["lists_equal_first_ar"] == {"per_graph": True} and report["repeats"] == 2
    v = report["variants"]["per_graph"]
    made = [(s["graph"], s["dims"]) for s in v["sessions"]]
    assert v["first_runs"] and all((r["graph"], r["dims"]) in made for r in v["first_runs"])
    prefill_batches = [r["dims"]["batch"] for r in v["first_runs"]
                       if r["graph"].startswith("target") and r["dims"]["seq"] > 9]
    assert prefill_batches.count(1) >= 1 and prefill_batches.count(3) >= 2 and not {7, 8} & set(prefill_batches)
    ids = [(r["graph"], r["gpu_graph_id"]) for r in v["first_runs"]]
    assert len(ids) == len(set(ids))
    kinds = {r["kind"] for r in v["run_sums"]}  # no CUDA graphs on the CPU: every bucket on a plain session
    assert kinds == {"plain_first", "plain_later"} and all(r["runs"] >= 1 for r in v["run_sums"])
    assert sum(r["runs"] for r in v["run_sums"] if r["kind"] == "plain_first") == len(ids)
    kinds = ("outside_graph", "capture", "replay", "plain_first", "plain_later", "twin")
    assert set(v["batches"]["7"]["by_cause_so_far"]) == {"sessions_graphed_mb", "sessions_plain_mb", "sessions_held",
                                                         *(f"runs_{k}_mb" for k in kinds)}
    assert {"off_first_outside_runs_mb", "chain_first_outside_runs_mb"} <= set(v["batches"]["7"])
    # the load-time dynamic sessions went once the buckets were set; every bucket session is still held
    assert [s["alive"] for s in v["sessions"]] == [s["dims"] is not None for s in v["sessions"]]
    assert v["batches"]["7"]["by_cause_so_far"]["sessions_held"] == sum(s["alive"] for s in v["sessions"])


def test_the_tracked_tree_leaves_room_for_a_wheel_part_beside_it():
    """A GPU call carries the working tree and one 50 MiB part of the onnxruntime-gpu wheel within 64 MiB
    (docs/llm_pairs.md), so the tracked files stay under 13.5 MiB: reports keep digests of their lists, not the
    lists."""
    import subprocess
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    size = sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())
    assert size < 13.5 * 2**20, f"{size / 2**20:.1f} MiB tracked"
