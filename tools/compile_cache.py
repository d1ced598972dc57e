"""Fill torch.compile's on-disk caches for a size's PyTorch baseline while its pair is still training.

The bench's compiled baseline (tools/gpu_baselines.py `bench_compiled`) compiles six whole-model graphs at batch 1
(the target step at 1 and K + 1 tokens, both prefills, the AR step, the speculative round); at 7B each takes
about 100 s to compile cold, more than a 10-minute device call leaves after loading the models. Inductor keys its
FX-graph and AOTAutograd caches on the graphs and the tensors' shapes, dtypes and strides, never on weight values,
so the same code run over a random pair of the same size (same catalogue, same draft, same histories) compiles
what the bench will ask for, and the bench then loads it from the cache (TORCHINDUCTOR_CACHE_DIR: the default,
per user, is shared by every process of that user). It runs beside the training (mostly CPU; ~15 GB of GPU
memory at 7B) and writes its compile times to OUT/compile_cache.json:

    PYTHONPATH=$PWD python tools/compile_cache.py --size qwen-7b --batches 1 --out DIR
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from padrec_export.models import Draft, Target
from padrec_export.pipeline import draft_config, target_config
from padrec_export.sizes import size_by_name
from padrec_runtime.grammar import Catalogue, ListConstraint, TokenLayout
from bench_timing import log
from gpu_baselines import bench_compiled
from gpu_bench import bench_histories

DEFAULT_CATALOGUE = "padrec_export/default_models/ml-100k/catalogue.json"  # gpu_bench.py's --catalogue default


def twin_pair(size: str, cat: Catalogue, device, dtype: torch.dtype) -> tuple:
    """A random target and PAD-Rec draft built as a trained pair of `size` over `cat` is, in `dtype` on `device`
    (made there in that dtype: no full-precision copy), then moved as the bench moves the trained one."""
    tc = target_config(size_by_name(size), cat)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.no_grad():
            target = Target(tc)
            draft = Draft(draft_config(tc, cat, "padrec"), target)
    finally:
        torch.set_default_dtype(before)
    return target.to(device, dtype).eval(), draft.to(device, dtype).eval()


def fill(size: str, catalogue: str, batches: list, modes: list, draft_steps: int, device: str) -> dict:
    """Compile (and run once) the bench's compiled baseline over a random twin; per mode its seconds."""
    cat = Catalogue.load(catalogue, TokenLayout(4, 64))
    dtype = torch.float16 if device == "cuda" else torch.float32  # as gpu_baselines.torch_pair
    hist_all = bench_histories(max(*batches, 8))  # gpu_bench's --b1-users default: 8
    t0 = time.perf_counter()
    target, draft = twin_pair(size, cat, device, dtype)
    built = time.perf_counter() - t0
    rows = []
    summary = bench_compiled((target, draft), ListConstraint(cat, n_items=10), hist_all[:8], hist_all, batches,
                             draft_steps, modes, 1, lambda *a, **k: rows.append(a[:4]), defaultdict(list))
    return {"size": size, "batches": batches, "draft_steps": draft_steps, "build_s": built,
            "seconds_by_mode": {m: r["seconds_total"] for m, r in summary.items() if "seconds_total" in r},
            "compile_cache_by_mode": {m: r["compile_cache"] for m, r in summary.items() if "compile_cache" in r},
            "rows": rows, "cache_dir": _cache_dir()}


def _cache_dir() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return cache_dir()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", required=True, help="a size of padrec_export/sizes.py (gpu_bench.py --size)")
    ap.add_argument("--batches", default="1", help="the bench's --batches (the compiled baseline runs those <= 8)")
    ap.add_argument("--modes", default="reduce-overhead", help="the bench's --compile-modes ('eager': none)")
    ap.add_argument("--draft-steps", type=int, default=7, help="the bench's --draft-steps")
    ap.add_argument("--catalogue", default=DEFAULT_CATALOGUE, help="the bench's --catalogue")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=".", help="where compile_cache.json goes")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    modes = [None if m == "eager" else m for m in args.modes.split(",")]
    res = fill(args.size, args.catalogue, batches, modes, args.draft_steps, args.device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "compile_cache.json").write_text(json.dumps(res, indent=1))
    log("compile cache", json.dumps(res["seconds_by_mode"]))


if __name__ == "__main__":
    main()
