"""The resumable stages behind `tools/gpu_bench.py --size ...`, on the tiny shape on CPU: a spent budget pauses
and saves, the next call resumes, finished stages are skipped, the second engine directory links the first's
target graphs, and an out-of-memory error becomes one line."""
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from padrec_export.demo import default_model_dir
from padrec_export.quantize import Quantization
from padrec_export.sizes import RECIPES
from padrec_export.stages import (ExportPlan, Job, engine_dirs, fp16_check, run_stages, target_done,
                                  train_target_stage)
from padrec_export.trainer import Budget
from padrec_runtime.errors import BackendError, CheckpointError
from padrec_runtime.manifest import load_manifest


@pytest.fixture
def job(tmp_path):
    pytest.importorskip("recbole")
    models = tmp_path / "w" / "models"
    models.mkdir(parents=True)
    shutil.copy(default_model_dir("ml-100k") / "catalogue.json", models / "catalogue.json")
    return Job(tmp_path / "w", "tiny", RECIPES["tiny"], epochs=1, draft_epochs=1, draft_train_steps=2, device="cpu",
               users=6)


PLAN = ExportPlan("fp32", max_seq_len=160, max_history=20, max_batch=8, draft_steps=3, fused_chain=False)  # fast


def test_stages_pause_resume_and_skip_what_the_work_dir_holds(job):
    logs = []
    with pytest.raises(CheckpointError, match="not trained yet"):  # drafts before their target
        run_stages(job, PLAN, ["drafts"], Budget(), logs.append)
    # a spent budget: the target pauses before its first step and saves its state; nothing after it runs
    r = run_stages(job, PLAN, ["train", "export"], Budget(0), logs.append)
    assert r == {"paused": True, "stages": {"target": {"status": "paused", "position": {"epoch": 0, "step": 0}}}}
    assert (job.models / "target_state.pt").is_file() and not target_done(job)
    r = run_stages(job, PLAN, ["train", "export"], Budget(), logs.append)  # the next call resumes and finishes
    assert not r["paused"] and r["stages"]["target"]["status"] == "trained"
    assert {"padrec", "eagle"} <= set(r["stages"]["drafts"]) and {"padrec", "eagle"} <= set(r["stages"]["export"])
    assert not (job.models / "target_state.pt").exists()
    padrec, eagle = job.work / "eng_padrec", job.work / "eng_eagle"
    for graph in ("target.onnx", "target_gqa.onnx"):  # one copy of the target's graphs on disk
        assert (padrec / graph).stat().st_ino == (eagle / graph).stat().st_ino
    assert (padrec / "draft.onnx").read_bytes() != (eagle / "draft.onnx").read_bytes()
    load_manifest(eagle)  # every file hashed and checked as the runtime does
    files = {p: p.stat().st_mtime_ns for p in job.work.rglob("*") if p.is_file()}
    r = run_stages(job, PLAN, ["train", "export"], Budget(), logs.append)  # everything is there: nothing is redone
    assert r["stages"] == {"target": {"status": "done before"}, "drafts": {"status": "done before"}, "export": {}}
    assert {p: p.stat().st_mtime_ns for p in job.work.rglob("*") if p.is_file()} == files
    assert any("tok/s ETA" in line for line in logs)
    res = fp16_check(job, logs.append)
    assert res["finite"] and res["same_argmax"] > 0.9


def test_out_of_memory_is_one_line_naming_stage_size_and_fix(job, monkeypatch):
    import padrec_export.stages as stages

    def oom(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text")
    monkeypatch.setattr(stages, "train_target_stage", oom)
    with pytest.raises(BackendError) as err:
        run_stages(job, PLAN, ["train"], Budget(), print)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("target at tiny: CUDA out of memory")
    assert "Tried to allocate 20.00 GiB" in msg and "--checkpointing" in msg and "--micro-batch" in msg


def test_a_state_from_other_settings_is_refused(job):
    assert train_target_stage(job, Budget(0), print)["status"] == "paused"
    other = Job(job.work, job.size, job.recipe, epochs=2, device="cpu", users=job.users)
    with pytest.raises(CheckpointError, match=r"other settings \(train\)"):
        train_target_stage(other, Budget(), print)


def test_gpu_bench_picks_the_size_and_its_recipe():
    sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
    from gpu_bench import job_from_args
    args = SimpleNamespace(small=False, size="qwen-7b", lr=None, draft_lr=2e-4, weights=None, batch_tokens=8192,
                           micro_batch=None, checkpointing=None, work="/tmp/w7", epochs=1, draft_epochs=2,
                           draft_train_steps=8, precision=None, draft_steps=7, quantize="none", quantize_block=32,
                           quantize_draft=False)
    job, plan = job_from_args(args)
    assert (job.size, job.device, job.epochs, plan.precision, plan.quantization) == ("qwen-7b", "cuda", 1, "fp16", None)
    _, quantized = job_from_args(SimpleNamespace(**{**vars(args), "quantize": "int4"}))
    assert quantized.quantization == Quantization("int4", 32)
    assert {p.name for p in engine_dirs(job, quantized).values()} == {"eng_padrec_int4", "eng_eagle_int4"}
    assert {p.name for p in engine_dirs(job, plan).values()} == {"eng_padrec", "eng_eagle"}
    t, d = job.target_train(), job.draft_train()
    assert (t.weights, t.checkpointing, t.lr, t.batch_tokens, t.keep_best) == ("bfloat16", True, 1.5e-4, 8192, False)
    assert (d.lr, d.cache_features, d.micro_batch, d.draft_steps) == (2e-4, True, 32, 8)
    small, plan = job_from_args(SimpleNamespace(**{**vars(args), "small": True, "draft_lr": None,
                                                   "batch_tokens": None}))
    assert (small.size, small.device, small.users, plan.precision) == ("tiny", "cpu", 40, "fp32")


def test_padrec_train_takes_a_named_size(job):
    import json

    from click.testing import CliRunner

    from padrec_export.cli import main
    res = CliRunner().invoke(main, ["train", "--size", "tiny", "--out", str(job.models), "--users", "6", "--epochs", "1",
                                    "--draft-epochs", "1", "--drafts", "padrec", "--hidden", "512"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["size"] == {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1, "intermediate": 64}  # not 512
    assert report["target"]["train"]["batch_tokens"] == RECIPES["tiny"].batch_tokens
    assert report["target"]["train"]["lr"] == RECIPES["tiny"].lr and report["draft_padrec"]["train"]["cache_features"]


def test_quantized_streamed_directories_link_the_quantized_target_graphs(job, monkeypatch):
    """The export stage as at 7B (graphs streamed, forced here by STREAMED_BYTES 0) with --quantize int4: the second
    directory links the first's quantized target graphs and its manifest's hashes match its files."""
    import dataclasses

    import padrec_export.onnx_export as onnx_export
    from padrec_runtime import DecodeParams, Recommender
    monkeypatch.setattr(onnx_export, "STREAMED_BYTES", 0)
    plan = dataclasses.replace(PLAN, quantization=Quantization("int4"))
    run_stages(job, plan, ["train", "export"], Budget(), print)
    dirs = engine_dirs(job, plan)
    first, second = dirs["padrec"], dirs["eagle"]
    for f in ("target.onnx", "target.onnx.data", "target_gqa.onnx", "target_gqa.onnx.data"):
        assert (first / f).stat().st_ino == (second / f).stat().st_ino, f
    for eng in (first, second):
        m = load_manifest(eng)  # every file's sha256 checked, the linked ones too
        assert m.quantization("target")["kind"] == m.quantization("target_gqa")["kind"] == "int4"
        assert m.quantization("draft") is None
        lists = {mode: [r.tokens for r in Recommender(eng).recommend([[1000, 1001], [1002]],
                                                                      params=DecodeParams(speculate=mode)).lists]
                 for mode in ("off", "chain")}
        assert lists["chain"] == lists["off"], eng.name
