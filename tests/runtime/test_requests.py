"""Requests checked at the boundary: every DecodeParams / RuntimeOptions field, n_items, histories, the budget and
the deadline each end in a named PadrecError or a correct list - never another exception or a quietly changed value."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from padrec_runtime import BackendError, DeadlineError, DecodeParams, InputError, PadrecError, Recommender, RuntimeOptions

HIST = [[1000, 1001, 1002]]

# values a careless caller sends: wrong types, non-finite numbers, out-of-range numbers, numpy scalars
ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.integers(-10, 10**6),
                st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([np.int64(3), np.float32(0.5), [], {}]))
FIELDS = ["speculate", "draft_steps", "tree_topk", "tree_size", "greedy", "temperature", "top_k", "top_p", "seed",
          "fused_chain", "device_rounds", "deadline_s"]


@pytest.fixture(scope="module")
def rec(engines_master):
    return Recommender(engines_master)


@pytest.fixture(scope="module")
def ar_list(rec):
    return rec.recommend(HIST, params=DecodeParams(speculate="off")).lists[0].tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=ODD)
def test_every_request_field_gives_a_named_error_or_a_correct_list(rec, ar_list, field, value):
    try:
        params = DecodeParams(**{field: value})
    except InputError as exc:
        assert f"DecodeParams.{field}" in str(exc)
        return
    # accepted: the value kept its meaning (no bool as a number, no non-finite number, no zero turned default)
    got = getattr(params, field)
    if isinstance(value, (bool, np.bool_)):
        assert isinstance(got, bool) and field in ("greedy", "fused_chain", "device_rounds")
    if isinstance(got, float):
        assert math.isfinite(got)
    if field in ("draft_steps", "tree_topk", "tree_size") and got is not None:
        assert got >= 1
    try:
        res = rec.recommend(HIST, params=params)
    except PadrecError:
        return  # e.g. device_rounds on a host cache, a deadline too short: named
    items = res.lists[0].item_ids
    assert len(items) == rec.limits["n_items"] and len(set(items)) == len(items)
    if params.greedy and params.speculate != "auto":
        assert res.lists[0].tokens == ar_list  # lossless, whatever the speculation settings


@pytest.mark.parametrize("value", [True, 0, -1, 2.5, "3", np.float64(3.0), 10**6])
def test_n_items_must_be_an_integer_in_range(rec, value):
    with pytest.raises(InputError, match="n_items"):
        rec.recommend(HIST, n_items=value)


def test_numpy_integers_are_accepted_where_python_integers_are(rec):
    a = rec.recommend(HIST, n_items=np.int64(3), params=DecodeParams(draft_steps=np.int32(2)))
    b = rec.recommend([np.array(HIST[0], dtype=np.int64)], n_items=3, params=DecodeParams(draft_steps=2))
    assert a.lists[0].tokens == b.lists[0].tokens and len(a.lists[0].item_ids) == 3


def test_unknown_parameters_and_wrong_containers_are_named(rec):
    with pytest.raises(InputError, match=r"unknown keys 'temprature' \| DecodeParams fields: .*temperature"):
        rec.recommend(HIST, params={"temprature": 0.5})
    with pytest.raises(InputError, match=r"unknown keys 'a', 1 \|"):  # keys of mixed types are named too
        rec.recommend(HIST, params={1: 2, "a": 3})
    with pytest.raises(InputError, match="expected DecodeParams"):
        rec.recommend(HIST, params=[("speculate", "off")])
    with pytest.raises(InputError, match="wrap one user's history"):
        rec.recommend([1000, 1001, 1002])
    with pytest.raises(InputError, match="integer item ids"):
        rec.recommend([[1000, True]])
    with pytest.raises(InputError, match="expected RuntimeOptions"):
        Recommender(rec.manifest.root, options={"threads": 2})
    with pytest.raises(InputError, match="RuntimeOptions.threads"):
        RuntimeOptions(threads=0)


def test_threads_past_the_usable_cores_are_refused_by_name(rec, monkeypatch):
    from padrec_runtime.api import options
    monkeypatch.setattr(options, "usable_cores", lambda: 2)
    with pytest.raises(BackendError, match=r"threads: 3 on a process that may use 2 CPU cores \| pass threads=2"):
        Recommender(rec.manifest.root, options=RuntimeOptions(threads=3))
    two = Recommender(rec.manifest.root, options=RuntimeOptions(threads=2))
    assert two.settings.threads == 2
    two.close()


@pytest.mark.parametrize("builder, asked, want", [("tensorrt_rtx", None, "tensorrt_rtx"), ("tensorrt", None, "tensorrt"),
                                                  (None, None, "tensorrt"), ("tensorrt", "tensorrt_lean", "tensorrt_lean")])
def test_the_tensorrt_runtime_follows_the_plans_builder_unless_asked(builder, asked, want):
    from padrec_runtime.api.options import resolve_runtime
    got = resolve_runtime(RuntimeOptions(trt_module=asked), "tensorrt", "cuda", "fp16", False, builder)
    assert got.trt_module == want
    with pytest.raises(BackendError, match=r"trt_module: a TensorRT setting on backend=onnxruntime \| drop it"):
        resolve_runtime(RuntimeOptions(trt_module="tensorrt"), "onnxruntime", "cpu", "fp32", False)
    with pytest.raises(BackendError, match=r"allow_host_code: a TensorRT setting on backend=onnxruntime"):
        resolve_runtime(RuntimeOptions(allow_host_code=True), "onnxruntime", "cpu", "fp32", False)


def test_gemm_tuning_is_a_cuda_onnxruntime_setting_and_apart_needs_graphs():
    """gemm_tuning: "session" everywhere (it is the default); "off" and "apart" only where ONNX Runtime runs on CUDA,
    "apart" only with CUDA graphs (it keeps the tuning out of their sessions); each refusal names the flag."""
    from padrec_runtime.api.options import resolve_runtime
    on_cuda = resolve_runtime(RuntimeOptions(gemm_tuning="apart"), "onnxruntime", "cuda", "fp16", True)
    assert on_cuda.gemm_tuning == "apart" and on_cuda.cuda_graphs
    assert resolve_runtime(RuntimeOptions(), "onnxruntime", "cpu", "fp32", False).gemm_tuning == "session"
    with pytest.raises(BackendError, match=r"gemm_tuning: off places ONNX Runtime's CUDA GEMM tuning \| drop it "
                                           r"\(--gemm-tuning\) on backend=onnxruntime, device=cpu"):
        resolve_runtime(RuntimeOptions(gemm_tuning="off"), "onnxruntime", "cpu", "fp32", False)
    with pytest.raises(BackendError, match=r"gemm_tuning: apart .* there are none"):
        resolve_runtime(RuntimeOptions(gemm_tuning="apart", cuda_graphs=False), "onnxruntime", "cuda", "fp16", True)
    with pytest.raises(BackendError, match=r"gemm_tuning: off .* backend=tensorrt"):
        resolve_runtime(RuntimeOptions(gemm_tuning="off"), "tensorrt", "cuda", "fp16", False)
    with pytest.raises(InputError, match=r"gemm_tuning: got 'own'"):
        RuntimeOptions(gemm_tuning="own")


CUBLAS_AT_IMPORT = os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def test_a_cublas_workspace_cap_is_for_cuda_sessions_and_never_overrides_the_environment(rec, monkeypatch):
    from padrec_runtime.backends.onnxruntime import CUBLAS_WORKSPACE_ENV, cap_cublas_workspace
    with pytest.raises(BackendError, match=r"cublas_workspace_mib: 4 sizes cuBLAS's workspace .* \| drop it "
                                           r"\(--cublas-workspace-mib\) on backend=onnxruntime, device=cpu"):
        Recommender(rec.manifest.root, options=RuntimeOptions(cublas_workspace_mib=4))
    with pytest.raises(InputError, match=r"cublas_workspace_mib: got 0"):
        RuntimeOptions(cublas_workspace_mib=0)
    from padrec_runtime.backends import onnxruntime as ort_backend
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, "x")  # set, then removed: the process's own value comes back at the end
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV)
    monkeypatch.setattr(ort_backend, "_cublas_capped", None)
    cap_cublas_workspace(4)
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":4096:1"
    cap_cublas_workspace(4)  # the same setting again: nothing to disagree with
    with pytest.raises(BackendError, match=r"cublas_workspace_mib=8: an earlier Recommender of this process set "
                                           r"CUBLAS_WORKSPACE_CONFIG=:4096:1"):
        cap_cublas_workspace(8)
    monkeypatch.setenv(CUBLAS_WORKSPACE_ENV, ":16384:8")
    with pytest.raises(BackendError, match=r"the environment sets CUBLAS_WORKSPACE_CONFIG=:16384:8, which holds"):
        cap_cublas_workspace(4)
    assert os.environ[CUBLAS_WORKSPACE_ENV] == ":16384:8"


def test_no_cublas_setting_leaks_out_of_the_test_above():
    """The test above sets the variable for the process; monkeypatch must have taken it back (later tests, and the
    servers and tools they start, would run with a capped cuBLAS)."""
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_AT_IMPORT


@pytest.mark.parametrize("make, words", [
    (lambda: DecodeParams(bogus=1), r"DecodeParams: got unknown \['bogus'\] \| its fields are speculate, "),
    (lambda: RuntimeOptions(bogus=1), r"RuntimeOptions: got unknown \['bogus'\] \| its fields are threads, "),
    (lambda: DecodeParams(*range(14)), r"DecodeParams: got 14 positional values"),
    (lambda: DecodeParams(temperature=10**400), r"DecodeParams.temperature: got inf \| expected a finite number"),
    (lambda: DecodeParams(top_p=-10**400), r"DecodeParams.top_p: got -inf"),
])
def test_constructors_name_unknown_fields_and_numbers_past_floats(make, words):
    with pytest.raises(InputError, match=words):
        make()


@pytest.mark.parametrize("engine_dir", [None, 123, b"/tmp", ["engines"]])
def test_an_engine_dir_that_is_not_a_path_is_named(engine_dir):
    with pytest.raises(InputError, match=r"engine_dir: got \w+ \| expected a path"):
        Recommender(engine_dir)


@pytest.mark.parametrize("kwargs, words", [
    (dict(histories=None), "calibrate histories: got NoneType"),
    (dict(histories=[]), r"calibrate histories: got list \[\] \| expected a non-empty list"),
    (dict(histories=[[0]], batches=(1,)), r"histories\[0\]: unknown item ids \[0\]"),
    (dict(histories=[[]], batches=(1,)), r"histories\[0\]: empty"),
    (dict(histories=[1000, 1001], batches=(1,)), r"histories\[0\]: expected a list of integer item ids"),
    (dict(histories=HIST, batches=(0,)), r"calibrate.batches: got 0 \| expected an integer in 1\.\.8"),
    (dict(histories=HIST, batches=(9,)), r"calibrate.batches: got 9 \| expected an integer in 1\.\.8"),
    (dict(histories=HIST, batches=1), "calibrate batches: got 1 | expected a non-empty tuple"),
    (dict(histories=HIST, batches=()), "calibrate batches: got ()"),
    (dict(histories=HIST, batches=(1,), repeats=0), r"calibrate.repeats: got 0"),
    (dict(histories=HIST, batches=(1,), repeats="3"), r"calibrate.repeats: got '3'"),
    (dict(histories=HIST, batches=(1, 4)), r"calibrate: got 1 histories \| expected at least 4, .* batches=\.\.\. up to 1"),
])
def test_calibrate_arguments_are_checked(rec, kwargs, words):
    with pytest.raises(InputError, match=words):
        rec.calibrate(**kwargs)


def test_a_stream_is_read_when_done_and_stepped_only_until_then(rec):
    s = rec.start(HIST, params=DecodeParams(speculate="chain"))
    with pytest.raises(InputError, match=r"stream: not done after 0 rounds \| step\(\) until done"):
        s.result()
    while not s.done:
        s.step()
    with pytest.raises(InputError, match=r"stream: every list is complete \| read them with result\(\)"):
        s.step()
    assert s.result().lists[0].tokens == rec.recommend(HIST, params=DecodeParams(speculate="chain")).lists[0].tokens


def test_request_budget_refuses_work_beyond_it(engines_master):
    small = Recommender(engines_master, options=RuntimeOptions(max_request_tokens=200))
    fine = small.recommend(HIST, params=DecodeParams(speculate="off"))  # 1 x 20 list tokens x 1: within 200
    assert len(fine.lists[0].item_ids) == small.limits["n_items"]
    with pytest.raises(InputError, match=r"budget is 200 .*max_request_tokens"):
        small.recommend(HIST * 8, params=DecodeParams(speculate="tree", tree_size=8))
    assert small.recommend(HIST, params=DecodeParams(speculate="off")).lists[0].tokens == fine.lists[0].tokens


def test_deadline_cuts_a_request_and_the_next_one_runs(engines_master):
    rec = Recommender(engines_master)
    with pytest.raises(DeadlineError, match="deadline of 1e-06 s"):
        rec.recommend(HIST, params=DecodeParams(deadline_s=1e-6))
    assert len(rec.recommend(HIST, params=DecodeParams(deadline_s=60.0)).lists[0].item_ids) == rec.limits["n_items"]


@pytest.mark.parametrize("args,msg", [(["--temperature", "nan"], "temperature"), (["--seed", "-1"], "--seed"),
                                      (["--history", "1_2"], "--history"), (["--history", "\uff11\uff12"], "--history"),
                                      (["--draft-steps", "0"], "--draft-steps"), (["--n-items", "0"], "--n-items")])
def test_cli_refuses_bad_values_without_a_traceback(engines_master, args, msg):
    argv = ["recommend", "--engines", str(engines_master), "--history", "1000,1001"]
    out = subprocess.run([sys.executable, "-m", "padrec_export.cli", *argv, *args], capture_output=True, text=True)
    assert out.returncode in (1, 2) and msg in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_cuda_on_a_machine_without_a_gpu_says_so(engines_master):
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine runs ONNX Runtime on a GPU")
    with pytest.raises(PadrecError, match="no CUDAExecutionProvider here") as err:
        Recommender(engines_master, device="cuda")
    assert "cupy" not in str(err.value)


def test_a_tracer_without_engine_call_is_refused_at_construction(rec):
    with pytest.raises(InputError, match=r"tracer: got int \| expected an object with an engine_call"):
        Recommender(rec.manifest.root, options=RuntimeOptions(device_cache=True), tracer=5)
