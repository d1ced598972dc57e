"""Resumable stages that make an LLM-sized target and its drafts under one work directory - train the target,
train the drafts, export both engine directories - each doing only what the directory still lacks, pausing
before the process's time budget runs out, and leaving what the next process continues from."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from padrec_runtime.errors import BackendError, CheckpointError

from .checkpoint import save_draft, save_target
from .features import TargetFeatures, causal_mask, pad_batch, positions
from .quantize import Quantization
from .pipeline import (DRAFTS, draft_config, draft_report, export_checkpoints, load_trained, target_config,
                       target_report, training_examples)
from .sizes import Recipe, size_by_name
from .train import TrainConfig, train_draft, train_target
from .trainer import Budget, Paused, load_state, save_state

TARGET_STATE = "target_state.pt"  # models/: the target's paused training (weights, optimizer, schedule)
DRAFT_STATE = "train_state.pt"  # models/draft_<name>/: a draft's training after its last epoch or pause
REPORT = "train_report.json"  # models/: what each stage reported, merged


@dataclass(frozen=True)
class Job:
    """One target and its drafts: where they live, their shape, how they are trained."""

    work: Path
    size: str  # a key of sizes.SIZES
    recipe: Recipe  # how it trains (sizes.RECIPES[size], or one with some fields changed)
    epochs: int = 1  # target epochs
    draft_epochs: int = 2  # epochs of each draft
    draft_train_steps: int = 8  # steps the drafts are unrolled in training
    device: str = "cuda"
    dataset: str = "ml-100k"
    users: int | None = None  # the first N users only (smoke runs)
    drafts: tuple = tuple(DRAFTS)
    levels: int = 4  # the catalogue's token layout
    codebook: int = 64

    @property
    def models(self) -> Path:
        return Path(self.work) / "models"

    def target_train(self) -> TrainConfig:
        r = self.recipe
        return TrainConfig(epochs=self.epochs, batch_tokens=r.batch_tokens, lr=r.lr, warmup_steps=r.warmup_steps,
                           device=self.device, dtype=self._autocast(), weights=r.weights,
                           checkpointing=r.checkpointing, micro_batch=r.micro_batch, keep_best=False)

    def draft_train(self) -> TrainConfig:
        r = self.recipe
        return TrainConfig(epochs=self.draft_epochs, batch_tokens=r.batch_tokens, lr=r.draft_lr,
                           warmup_steps=r.warmup_steps, draft_steps=self.draft_train_steps, device=self.device,
                           dtype=self._autocast(), micro_batch=r.draft_micro_batch, cache_features=True)

    def _autocast(self) -> str:
        return "float32" if self.device == "cpu" else "bfloat16"

    def examples(self):
        return training_examples(self.dataset, self.models, self.levels, self.codebook, self.users, progress=False)


def target_done(job: Job) -> bool:
    return (job.models / "target" / "padrec.json").is_file()  # save_target writes it last


def draft_done(job: Job, name: str) -> bool:
    """Its weights written and its training state gone (removed only after the weights were written whole)."""
    path = job.models / f"draft_{name}"
    return (path / "draft.safetensors").is_file() and not (path / DRAFT_STATE).exists()


def _report(job: Job) -> dict:
    path = job.models / REPORT
    return json.loads(path.read_text()) if path.exists() else {}


def _merge_report(job: Job, part: dict) -> dict:
    path = job.models / REPORT
    report = _report(job)
    report.update(part)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _settings(job: Job, cfg: TrainConfig, **extra) -> dict:
    """What a saved training state must have been made with to be continued (the device may change)."""
    return {"size": job.size, "dataset": job.dataset, "users": job.users,
            "train": {k: v for k, v in cfg.to_dict().items() if k != "device"}, **extra}


def train_target_stage(job: Job, budget: Budget, log: Callable[[str], None]) -> dict:
    """Train the target (or continue its paused training) unless models/target exists; returns
    {"status": "done before" | "trained" | "paused", ...}."""
    if target_done(job):
        return {"status": "done before"}
    t0 = time.perf_counter()
    job.models.mkdir(parents=True, exist_ok=True)
    ex = job.examples()
    cfg, size = job.target_train(), size_by_name(job.size)
    state_path, settings = job.models / TARGET_STATE, _settings(job, job.target_train())
    resume = load_state(state_path, settings, job.device)
    log(f"train target {job.size}: {len(ex.dense)} sequences, {sum(map(len, ex.dense)):,} tokens an epoch, "
        f"{cfg.sequences_per_step(ex.dense)} sequences a step, weights {cfg.weights}, lr {cfg.lr:g}"
        + (f", resuming at {resume['position']}" if resume else ""))
    try:
        target, curves = train_target(target_config(size, ex.cat), ex.dense, cfg, False, ex.valid, ex.list_len,
                                      resume=resume, budget=budget, log=log)
    except Paused as paused:
        t1 = time.perf_counter()
        save_state(state_path, settings, paused.state)
        log(f"train target: paused at {paused.position}; state saved in {time.perf_counter() - t1:.0f} s")
        return {"status": "paused", "position": paused.position.to_dict()}
    del resume
    meta = {"layout": {"levels": job.levels, "codebook": job.codebook}, "dataset": job.dataset}
    save_target(target, job.models / "target", extra=meta)
    state_path.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    _merge_report(job, {"dataset": job.dataset, "examples": len(ex.seqs), "size": asdict(size),
                        "size_name": job.size, "target": target_report(cfg, curves, seconds)})
    log(f"train target: done in {seconds:.0f} s this call, validation list loss {curves['valid']}")
    return {"status": "trained", "seconds": seconds}


def train_drafts_stage(job: Job, budget: Budget, log: Callable[[str], None]) -> dict:
    """Train each of job.drafts still missing against the trained target (or continue its paused training),
    the target's features computed once for all of them; returns {"status": ..., name: seconds}."""
    todo = [name for name in job.drafts if not draft_done(job, name)]
    if not todo:
        return {"status": "done before"}
    if not target_done(job):
        raise CheckpointError(f"{job.models / 'target'}: not trained yet | expected the target before its drafts "
                              "| run the target stage first")
    ex = job.examples()
    cat, target, _, _ = load_trained(job.models, draft=None, dtype=None)  # the checkpoint's dtype (bf16)
    target = target.to(job.device).eval()
    cfg, out = job.draft_train(), {"status": "trained"}
    t0 = time.perf_counter()
    features = TargetFeatures(target, ex.seqs, cfg.sequences_per_step(ex.seqs), log)
    log(f"target features of {len(ex.seqs)} sequences in {time.perf_counter() - t0:.0f} s")
    for name in todo:
        t0, path = time.perf_counter(), job.models / f"draft_{name}"
        path.mkdir(parents=True, exist_ok=True)
        settings = _settings(job, cfg, kind=name)
        state = load_state(path / DRAFT_STATE, settings, job.device)
        try:
            draft, curve = train_draft(target, draft_config(target.cfg, cat, name), ex.seqs, cfg, cat, False,
                                       resume=state, budget=budget, log=log, features=features,
                                       on_epoch=lambda p: save_state(path / DRAFT_STATE, settings, p.state()))
        except Paused as paused:
            save_state(path / DRAFT_STATE, settings, paused.state)
            log(f"train draft {name}: paused at {paused.position}")
            return {**out, "status": "paused", name: "paused"}
        save_draft(draft, path, extra={"dataset": job.dataset})
        (path / DRAFT_STATE).unlink(missing_ok=True)
        out[name] = time.perf_counter() - t0
        _merge_report(job, {f"draft_{name}": draft_report(cfg, draft, curve, out[name])})
        log(f"train draft {name}: done in {out[name]:.0f} s this call")
    return out


@dataclass(frozen=True)
class ExportPlan:
    """The engines the export stage writes (work/eng_<draft>) and their limits."""

    precision: str = "fp16"
    max_seq_len: int = 256
    max_history: int = 20
    max_batch: int = 64
    draft_steps: int = 7
    fused_chain: bool = True  # also draft_chain(_gqa).onnx: a greedy chain round's draft in one call
    quantization: Quantization | None = None  # weight-only quantization of the target (and draft) graphs


def engine_dirs(job: Job, plan: ExportPlan = ExportPlan()) -> dict:
    """Each draft's engine directory; quantized engines get their own (eng_<draft>_int4 ...)."""
    q = plan.quantization
    tag = f"_{q.kind}" + ("_draft" if q.draft else "") if q else ""
    return {name: Path(job.work) / f"eng_{name}{tag}" for name in job.drafts}


def export_stage(job: Job, plan: ExportPlan, log: Callable[[str], None]) -> dict:
    """Export each draft's engine directory still missing; the first one written lends its target graphs to
    the others (hard links: one copy of a 7B target's graphs on disk). Returns {name: seconds}."""
    out = {}
    engines = engine_dirs(job, plan)
    done = [eng for eng in engines.values() if (eng / "manifest.json").exists()]
    if len(done) < len(engines) and plan.precision == "fp16":
        out["fp16_check"] = fp16_check(job, log)
    for name, eng in engines.items():
        if (eng / "manifest.json").exists():
            continue
        if not draft_done(job, name):
            raise CheckpointError(f"{job.models / f'draft_{name}'}: not trained yet | expected every draft before "
                                  "the export | run the drafts stage first")
        t0, reuse = time.perf_counter(), done[0] if done else None
        export_checkpoints(job.models / "target", job.models / f"draft_{name}", eng, plan.precision,
                           max_seq_len=plan.max_seq_len, max_history=plan.max_history, max_batch=plan.max_batch,
                           draft_steps=plan.draft_steps, fused_chain=plan.fused_chain, device=job.device,
                           reuse_target=reuse, quantization=plan.quantization)
        done.append(eng)
        out[name] = time.perf_counter() - t0
        size_gb = sum(f.stat().st_size for f in eng.iterdir()) / 1e9
        log(f"exported {name} ({plan.precision}, {size_gb:.1f} GB of files, target graphs "
            f"{f'linked from {reuse.name}' if reuse else 'written'}) in {out[name]:.0f} s")
        release_memory()  # the traced copy's blocks, before the next export or the bench
    if out:
        _merge_report(job, {"export": {**_report(job).get("export", {}), **out}})  # seconds per directory
    return out


@torch.no_grad()
def fp16_check(job: Job, log: Callable[[str], None], n: int = 16) -> dict:
    """The target in fp16 on a few validation sequences against its own checkpoint dtype: fp16 engines are
    only as good as this (a bf16-trained residual stream past 65504 would overflow to inf)."""
    ex = job.examples()
    _, target, _, _ = load_trained(job.models, draft=None, dtype=None)
    target = target.to(job.device).eval()
    ids = pad_batch(ex.valid, range(min(n, len(ex.valid)))).to(job.device)
    B, T = ids.shape
    args = (ids, positions(B, T, ids.device), causal_mask(B, T, ids.device))
    ref = target(*args, target.empty_past(B, ids.device))[0]
    target = target.half()
    got = target(*args, target.empty_past(B, ids.device))[0]
    res = {"finite": bool(torch.isfinite(got).all()), "max_abs_logit_diff": float((got - ref).abs().max()),
           "same_argmax": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    log(f"fp16 check: {json.dumps(res)}" + ("" if res["finite"] else " | fp16 overflows: export with --precision bf16"))
    return res


def oom_diagnosis(stage: str, job: Job, exc: BaseException) -> str:
    """One line for a CUDA out-of-memory error: where, how full the card was, what to change."""
    gib = 2 ** 30
    total = torch.cuda.get_device_properties(0).total_memory / gib if torch.cuda.is_available() else 0.0
    used = torch.cuda.max_memory_allocated() / gib if torch.cuda.is_available() else 0.0
    fix = ("a smaller --batch-tokens, or --micro-batch N (sequences per forward)" if job.recipe.checkpointing else
           "--checkpointing (recompute activations), a smaller --batch-tokens, or --micro-batch N")
    return (f"{stage} at {job.size}: CUDA out of memory | peak {used:.1f} GiB allocated of {total:.0f} GiB "
            f"({str(exc).splitlines()[0][:160]}) | expected it to fit | try {fix}")


STAGES = ("target", "drafts", "export")


def run_stages(job: Job, plan: ExportPlan, stages, budget: Budget, log: Callable[[str], None]) -> dict:
    """The named stages ("train" stands for target and drafts) in order, each skipping what the work directory
    holds; none runs after one that paused. Returns {"stages": {stage: its result}, "paused": bool}. A CUDA
    out-of-memory error becomes a BackendError whose message is the one-line diagnosis."""
    wanted = {s for name in stages for s in (("target", "drafts") if name == "train" else (name,))}
    out: dict = {"stages": {}, "paused": False}
    runs = {"target": lambda: train_target_stage(job, budget, log),
            "drafts": lambda: train_drafts_stage(job, budget, log),
            "export": lambda: export_stage(job, plan, log)}
    for name in (s for s in STAGES if s in wanted):
        try:
            out["stages"][name] = result = runs[name]()
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(oom_diagnosis(name, job, exc)) from None
        finally:
            release_memory()
        if result.get("status") == "done before" or result == {}:
            log(f"{name}: done before, skipped ({job.work} holds it)")
        if result.get("status") == "paused":
            out["paused"] = True
            log(f"{name}: paused before the time budget ran out | rerun the same command to continue")
            break
    return out


def release_memory() -> None:
    """Hand PyTorch's cached GPU blocks back (ONNX Runtime allocates outside PyTorch's cache)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
