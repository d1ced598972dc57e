"""tools/gpu_llm.py on the CPU (its --small shape): an --export-only call leaves complete engines that a later
call reuses, and each call measures the parts it is asked for and no others."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def gpu_llm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_llm.py"), "--small", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_a_later_call_reuses_the_export_and_measures_only_its_parts(tmp_path):
    work, first, second = tmp_path / "w", tmp_path / "o1", tmp_path / "o2"
    done = gpu_llm("--work", str(work), "--out", str(first), "--export-only")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "tiny" / "manifest.json").exists()
    row = json.loads((first / "llm_steps.json").read_text())["shapes"]["tiny"]
    assert "export_s" in row and "runtime" not in row and "adaptive" not in row

    done = gpu_llm("--work", str(work), "--out", str(second), "--parts", "decode", "--batches", "1,2")
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((second / "llm_steps.json").read_text())["shapes"]["tiny"]
    assert row["export_reused"] == str(work / "tiny") and "export_s" not in row
    assert "adaptive" not in row and "torch_compile" not in row
    assert set(row["runtime"]["batches"]) == {"1", "2"}
    for b in row["runtime"]["batches"].values():
        assert b["off_tau"] == 1.0 and b["chain_tau"] > 1.0  # a random draft still has some tokens accepted
        assert b["weights_gb"] <= b["weights_unshared_gb"]

    third = tmp_path / "o3"  # both sides of the step, timed alike: both methods, both step sizes, each side;
    # with --query-group, the graph with padded query groups too (XQA on and off: alike on the CPU)
    done = gpu_llm("--work", str(work), "--out", str(third), "--parts", "steps-paired", "--modes", "eager",
                   "--query-group", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads((third / "llm_steps.json").read_text())["shapes"]["tiny"]
    assert "runtime" not in row and "torch_compile" not in row
    paired = row["steps_paired"]["eager"]
    assert set(paired["methods"]) == {"back_to_back", "per_call"}
    for method in paired["methods"].values():  # ours with GEMM tuning (the runtime's default) and without
        for T in ("T1", "T8"):
            m = method[T]
            assert m["torch_compile_ms"] > 0
            for side, prefix in (("padrec", ""), ("padrec_tuning_off", "tuning_off_"), ("padrec_flash", "flash_"),
                                 ("padrec_padded", "padded_"), ("padrec_padded_xqa", "padded_xqa_")):
                assert m[f"{side}_ms"] > 0 and m[f"{prefix}ratio_max"] >= m[f"{prefix}ratio_median"] > 0
                assert abs(m[f"{prefix}x_floor"] * row["floor_ms"] - m[f"{side}_ms"]) < 1e-9
    assert (work / "tiny" / "target_gqa_group4.onnx").exists()
    diffs = paired["padded_logits_max_abs_diff"]  # the padded graph computes the shipped one's logits
    assert set(diffs) == {f"{side}_T{T}" for side in ("padrec_padded", "padrec_padded_xqa") for T in (1, 8)}
    assert all(d <= 1e-4 for d in diffs.values()), diffs

    manifest = work / "tiny" / "manifest.json"  # engines of other limits are not reported as this script's
    data = json.loads(manifest.read_text())
    data["model"]["max_batch"] = 32
    manifest.write_text(json.dumps(data))
    done = gpu_llm("--work", str(work), "--out", str(second), "--parts", "decode", "--batches", "1")
    assert done.returncode == 1 and "'max_batch': 32" in done.stderr and "this script uses" in done.stderr


def test_unknown_parts_and_export_only_without_work_are_refused(tmp_path):
    done = gpu_llm("--out", str(tmp_path), "--parts", "decode,timing")
    assert done.returncode == 2 and "--parts: got 'decode,timing'" in done.stderr
    done = gpu_llm("--out", str(tmp_path), "--export-only")
    assert done.returncode == 2 and "--export-only needs --work" in done.stderr
    done = gpu_llm("--out", str(tmp_path), "--graph-max-tokens", "0")
    assert done.returncode == 2 and "--graph-max-tokens: got 0" in done.stderr
    assert not (tmp_path / "llm_steps.json").exists()  # refused before any work


def test_a_quantized_export_has_its_own_directory_and_report(tmp_path):
    work, out = tmp_path / "w", tmp_path / "o"
    done = gpu_llm("--work", str(work), "--out", str(out), "--export-only", "--quantize", "int8")
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((work / "tiny_int8" / "manifest.json").read_text())
    assert manifest["graphs"]["target"]["quantization"]["kind"] == "int8"
    assert not (work / "tiny").exists() and not (out / "llm_steps.json").exists()
    row = json.loads((out / "llm_steps_int8.json").read_text())["shapes"]["tiny"]
    assert row["quantization"]["kind"] == "int8"
    # the same directory under another quantization is refused, not reported as this one
    (work / "tiny").symlink_to(work / "tiny_int8")
    done = gpu_llm("--work", str(work), "--out", str(out), "--parts", "decode", "--batches", "1")
    assert done.returncode == 1 and "'quantize': 'int8'" in done.stderr
