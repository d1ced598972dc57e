"""The PyTorch baselines of the GPU bench (tools/gpu_bench.py), on the trained target and PAD-Rec draft: the eager
reference loop, the static-KV-cache loop compiled with `torch.compile` (tools/torch_compiled.py), Hugging Face
`generate`, and the weight-bandwidth floor; each adds its rows to the bench's report."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from padrec_export.pipeline import load_trained
from padrec_export.reference import reference_generate
from padrec_runtime.grammar import ListConstraint
from padrec_runtime.loop import DecodeConfig
from bench_timing import alternate, log, timed
from torch_compiled import CompiledDraft, CompiledTarget, Decoder, compile_cache_counts, copy_bandwidth_gbs, \
    cudagraph_skips, floor_ms, step_times

if TYPE_CHECKING:
    from gpu_bench import Bench


def bench_baselines(bench: Bench, models: Path, batches: list, draft_steps: int, modes: list,
                    eager: bool = True) -> None:
    """The PyTorch baselines in turn on the pair in `models`: with `eager`, eager at batch 1 and 8; with `modes`
    (compile modes, None: static KV without compiling), the compiled loop in each, Hugging Face at batch 1 and on
    CUDA the floor (report["floor"])."""
    target, draft, con = torch_pair(bench, models)
    if eager:
        bench_eager(bench, target, draft, con, batches, draft_steps)
    if not modes:
        return
    bench.report["torch_compiled"] = bench_compiled((target, draft), con, bench.users, bench.hist_all, batches,
                                                    draft_steps, modes, bench.repeats, bench.add,
                                                    bench.report["ar_tokens"])
    bench_hf(bench, models, con)
    if bench.device == "cuda":
        bench.report["floor"] = weight_floor(target, bench.device)


def torch_pair(bench: Bench, models: Path) -> tuple:
    """The trained target and PAD-Rec draft as PyTorch modules on the card (fp16 on CUDA) and the list
    constraint; where lists differed from AR, the target's logits there are added to the mismatches."""
    dtype = torch.float16 if bench.device == "cuda" else torch.float32
    cat, target, draft, _ = load_trained(models, "padrec", dtype=None)  # the checkpoint's dtype: no fp32 copy of a 7B
    target = target.to(bench.device, dtype).eval()
    draft = draft.to(bench.device, dtype).eval()
    if bench.report.get("mismatches"):
        logit_margins(target, cat, bench.hist_all, bench.report["mismatches"], bench.device)
        target = target.to(bench.device, dtype)
        log("mismatch logits", json.dumps(bench.report["mismatches"]))
    return target, draft, ListConstraint(cat, n_items=10)


def logit_margins(target, cat, histories: list, mismatches: list, device) -> None:
    """For each differing position: the target's logits of AR's token and of the other one after AR's prefix,
    in fp32 and in fp16 (a margin near zero is a near tie that rounding order can flip); added in place."""
    for dtype in (torch.float32, torch.float16):
        model = target.to(device, dtype)
        for m in mismatches:
            for r in m["rows"]:
                if r["ar"] is None or r["got"] is None:
                    continue
                ids = list(cat.prompt(histories[r["row"]])) + list(r["prefix"])
                T = len(ids)
                with torch.inference_mode():
                    logits, _, _ = model(torch.tensor([ids], device=device, dtype=torch.int32),
                                         torch.arange(T, device=device, dtype=torch.int32)[None],
                                         torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))[None],
                                         model.empty_past(1, device))
                row = logits[0, -1].float()
                r[f"logit_ar_{str(dtype)[6:]}"] = float(row[r["ar"]])
                r[f"logit_got_{str(dtype)[6:]}"] = float(row[r["got"]])


def bench_eager(bench: Bench, target, draft, con, batches: list, draft_steps: int) -> None:
    """PyTorch eager: the same SD loop, torch models on the card (device-resident KV); chain runs the same fused
    draft chain (DraftChain, eager) with the same K. Batch 1 and 8."""
    def over(batch, fn):
        """fn(histories) once per user at batch 1 (a list of results), else once for the batch."""
        return fn(bench.hist_all[:batch]) if batch > 1 else [fn([h]) for h in bench.users]

    for batch in [b for b in batches if b <= 8]:
        for mode in ("off", "chain", "tree"):
            cfg = DecodeConfig(speculate=mode, draft_steps=draft_steps if mode == "chain" else 4)
            gs, ms = timed(lambda: over(batch, lambda h: reference_generate(target, draft, h, con, cfg)), 1,
                           bench.sync)
            gs = gs if batch == 1 else [gs]
            toks = [t for g in gs for t in g.tokens]
            tau = float(np.mean([n for g in gs for row in g.committed for n in row]))
            bench.add("pytorch-eager", mode, batch, ms / bench.per_request(batch), tau,
                      {"identical_to_ar": bench.same_as_ar(batch, toks)})


def compiled_label(mode: str | None) -> str:
    """How the bench names the compiled baseline's rows."""
    if mode is None:
        return "PyTorch static KV, eager (no torch.compile)"
    return f"PyTorch static KV + torch.compile {mode} (CUDA graphs)"


def release_torch_memory() -> None:
    """Hand PyTorch's cached GPU memory back to the driver (ONNX Runtime allocates outside PyTorch's cache)."""
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_compiled(models: tuple, con, users: list, hist_all: list, batches: list, K: int, modes: list, repeats: int,
                   add, ar_tokens: dict) -> dict:
    """The strongest PyTorch baseline (tools/torch_compiled.py) in each compile mode: target step times at 1 and
    K + 1 tokens, then AR and chain-K lists at batch 1 (users in turn) and 8, timed alternately; one row per
    mode and decoding. Returns per mode its step times and seconds in all (compilation included), and for each
    measure the faster mode (the baseline)."""
    target, draft = models
    dtype, cat = next(target.parameters()).dtype, con.catalogue
    summary = {}
    for mode in modes:
        t0, skips, cached = time.perf_counter(), cudagraph_skips(), compile_cache_counts()
        ct = CompiledTarget(target, 8, 256, dtype, mode)
        dec = Decoder(ct, CompiledDraft(draft, cat, K, 8, 256, dtype, mode), con)
        res = {"label": compiled_label(mode), **step_times(ct, tokens=(1, K + 1))}
        engine = f"pytorch-compiled-{mode or 'eager'}"
        for batch in [b for b in batches if b <= 8]:
            def lists(fn, batch=batch):  # batch 1: one list per user in turn, merged
                parts = [fn([h]) for h in users] if batch == 1 else [fn(hist_all[:batch])]
                tau = float(np.average([p.tau for p in parts], weights=[max(p.rounds, 1) for p in parts]))
                return [t for p in parts for t in p.tokens], tau  # tau over every round
            runs = {"ar": lambda: lists(dec.ar), "chain": lambda: lists(dec.speculate)}
            res[f"warm_up_s_b{batch}"] = dec.warm_up(users[:1] if batch == 1 else hist_all[:batch])
            t, last = alternate(runs, repeats)
            per = len(users) if batch == 1 else 1
            for name, (toks, tau) in last.items():
                ms = float(np.median(t[name])) / per
                res[f"{name}_ms_b{batch}"] = ms
                add(engine, "off" if name == "ar" else "chain", batch, ms, tau,
                    {"label": f"{res['label']}, " + ("AR" if name == "ar" else f"chain K={K}"),
                     "identical_to_ar": toks == ar_tokens[batch], "identical_to_own_ar": toks == last["ar"][0]})
        res["seconds_total"], res["cudagraph_skips"] = time.perf_counter() - t0, cudagraph_skips() - skips
        res["compile_cache"] = {k: v - cached[k] for k, v in compile_cache_counts().items()}  # tools/compile_cache.py
        summary[mode or "eager"] = res
        log("compiled baseline", json.dumps(res))
        del dec, ct
        torch._dynamo.reset()
        release_torch_memory()
    measures = sorted({k for r in summary.values() for k in r if "_ms" in k})
    summary["baseline"] = {k: dict(zip(("ms", "mode"), min((r[k], m) for m, r in summary.items() if k in r)))
                           for k in measures}
    return summary


def hf_model(model_dir, device, dtype):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def hf_generate(hf, con, histories, device):
    """Hugging Face generate, greedy, with the same list constraint as a prefix_allowed_tokens_fn."""
    cat = con.catalogue
    prompts = [cat.prompt(h) for h in histories]
    n = len(prompts[0])
    assert all(len(p) == n for p in prompts), "HF baseline: equal-length histories only"
    starts = [con.start(h) for h in histories]

    def allowed(batch_id, ids):
        state = starts[batch_id]
        for tok in ids[n:].tolist():
            state = con.advance(state, tok)
        a = con.allowed(state)
        return a.tolist() if len(a) else [2]

    ids = torch.tensor(np.stack(prompts), device=device, dtype=torch.long)

    def run():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=con.list_length(),
                               do_sample=False, prefix_allowed_tokens_fn=allowed, eos_token_id=2, pad_token_id=0)
    return run


def bench_hf(bench: Bench, models: Path, con) -> None:
    """Hugging Face generate (the same target as LlamaForCausalLM, the same constraint), batch 1."""
    hf = hf_model(models / "target", bench.device, torch.float16 if bench.device == "cuda" else torch.float32)
    seqs, ms = timed(lambda: [hf_generate(hf, con, [h], bench.device)() for h in bench.users], 1, bench.sync)
    n = len(con.catalogue.prompt(bench.users[0]))
    same = bench.same_as_ar(1, [s[n:].tolist() for part in seqs for s in part])
    bench.add("hf-generate", "off", 1, ms / len(bench.users), 1.0, {"identical_to_ar": same})


def weight_floor(target, device) -> dict:
    """The floor: the target's fp16 weight bytes over the card's copy bandwidth."""
    bw = copy_bandwidth_gbs(device)
    weight_bytes = sum(p.numel() * 2 for p in target.parameters())
    floor = {"copy_bandwidth_gb_s": bw, "target_weight_bytes_fp16": weight_bytes,
             "floor_ms_per_target_step": floor_ms(weight_bytes, bw)}
    log(json.dumps(floor))
    return floor
