"""The serving tools: the load generator's arithmetic and checks, its end-to-end run on a tiny engine (what the GPU
run does, on CPU), and the preflight's library check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from padrec_serve.process import ROOT, serve_python

sys.path.insert(0, str(ROOT / "tools"))
import serve_load  # noqa: E402
import serve_preflight  # noqa: E402


def level(mode, conc, lists_per_s, p50_ms, failures=0):
    return {"speculate": mode, "concurrency": conc, "lists_per_s": lists_per_s, "p50_ms": p50_ms,
            "failures": failures}


def test_summarize_pools_the_passes():
    passes = [{"latencies_s": [0.010, 0.030], "failures": [], "wall_s": 1.0},
              {"latencies_s": [0.020], "failures": ["boom"], "wall_s": 2.0}]
    row = serve_load.summarize("auto", 4, passes, [1.0, 2.0])
    assert row["requests"] == 3 and row["failures"] == 1 and row["first_failure"] == "boom"
    assert row["lists_per_s"] == pytest.approx(1.0) and row["p50_ms"] == pytest.approx(20.0)
    assert row["passes"] == 2 and row["loadavg_1min"] == [1.0, 2.0]
    assert row["pass_lists_per_s"] == [pytest.approx(2.0), pytest.approx(0.5)]


def test_checks_compare_c1_with_the_floor_and_auto_with_off():
    levels = [level("auto", 1, 50, 21.0), level("off", 1, 14, 75.0), level("auto", 64, 300, 200.0),
              level("off", 64, 310, 190.0)]
    c = serve_load.checks(levels, {"auto": 20.0, "off": 70.0})
    assert c["c1_p50_within_tolerance_of_in_process"]["auto"]["ok"]  # 21 <= 20 * 1.15
    assert c["c1_p50_within_tolerance_of_in_process"]["off"]["ok"]  # 75 <= 70 * 1.15
    assert c["auto_lists_per_s_at_least_off"]["1"]["ok"] and not c["auto_lists_per_s_at_least_off"]["64"]["ok"]
    assert not c["all_ok"]
    levels[2]["lists_per_s"] = 310
    assert serve_load.checks(levels, {"auto": 20.0, "off": 70.0})["all_ok"]
    assert not serve_load.checks(levels, {"auto": 18.0, "off": 70.0})["all_ok"]  # 21 > 18 * 1.15
    levels[0]["failures"] = 1
    assert not serve_load.checks(levels, {"auto": 20.0, "off": 70.0})["all_ok"]


def test_auto_against_off_within_the_passes_noise():
    """Where the passes of a level differ by 10%, auto 5% below off is within the noise, 15% below is not."""
    levels = [level("auto", 1, 50, 21.0), level("off", 1, 14, 75.0), level("auto", 64, 95, 200.0),
              level("off", 64, 100, 190.0)]
    levels[2]["pass_lists_per_s"] = [90.0, 100.0]  # spread 10 / 95
    levels[3]["pass_lists_per_s"] = [100.0, 100.0]
    c = serve_load.checks(levels, {"auto": 20.0, "off": 70.0})
    row = c["auto_lists_per_s_at_least_off"]["64"]
    assert row["noise"] == pytest.approx(10 / 95) and not row["ok"] and row["ok_within_noise"]
    assert c["all_ok_within_noise"] and not c["all_ok"]
    levels[2]["lists_per_s"] = 85.0
    assert not serve_load.checks(levels, {"auto": 20.0, "off": 70.0})["all_ok_within_noise"]


def test_server_plan_is_read_from_the_log():
    log = ('I1203 13:31:02.1 7 triton_model.py:69] "padrec padrec_0_0 auto speculation: batch<=1: chain K=4, '
           'batch<=4: off"\nI1203 other line\n')
    assert serve_load.server_plan(log) == ["padrec padrec_0_0 auto speculation: batch<=1: chain K=4, batch<=4: off"]


def test_load_run_on_a_tiny_engine_writes_levels_plan_and_checks(engines_master, tmp_path):
    """The GPU run's steps on CPU: in-process floor, server, modes in turn, JSON with the server's plan."""
    python = serve_python()
    if python is None:
        pytest.skip("no interpreter with PyTriton (tools/setup.sh makes .venv-serve)")
    pytest.importorskip("tritonclient.grpc")
    out = tmp_path / "load"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "serve_load.py"), "--engines", str(engines_master),
                          "--concurrency", "1,3", "--requests", "6", "--passes", "2", "--protocol", "grpc",
                          "--max-batch", "8", "--python", python, "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["speculate"], r["concurrency"], r["requests"], r["failures"]) for r in result["levels"]] == [
        ("auto", 1, 6, 0), ("off", 1, 6, 0), ("auto", 3, 6, 0), ("off", 3, 6, 0)]
    assert set(result["in_process_batch1_ms"]) == {"auto", "off"}
    assert len(result["server_auto_plan"]) == 1 and "batch<=1:" in result["server_auto_plan"][0]
    assert set(result["checks"]["auto_lists_per_s_at_least_off"]) == {"1", "3"}
    assert out.with_suffix(".png").stat().st_size > 0


def test_preflight_names_a_library_the_stub_cannot_load(tmp_path):
    """A Python-backend stub for a Python whose libpython is nowhere on the library path: named, with the fix."""
    python = serve_python()
    if python is None:
        pytest.skip("no interpreter with PyTriton")
    where = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('pytriton')"
                            ".submodule_search_locations[0])"], capture_output=True, text=True).stdout.strip()
    stubs = Path(where) / "tritonserver" / "python_backend_stubs"
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": str(Path(where).parent / "nvidia_pytriton.libs")}
    stub = next((stubs / v / "triton_python_backend_stub" for v in ("3.8", "3.9", "3.13")
                 if serve_preflight.missing_libraries(stubs / v / "triton_python_backend_stub", env)), None)
    if stub is None:
        pytest.skip("every stub's libpython is installed here")
    with pytest.raises(serve_preflight.PreflightError, match=r"cannot load \['libpython3\.\d+\.so\.1\.0'\] \| "
                                                           r"needs the interpreter's shared libpython"):
        serve_preflight.check_libraries({"env": env, "tritonserver": stub, "stub": stub})
