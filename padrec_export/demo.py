"""`padrec demo`: the embedded default model, exported and run with ONNX Runtime on CPU, AR vs speculative."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import click
import numpy as np

from padrec_runtime import DecodeParams, Recommender
from padrec_runtime.errors import InputError, IntegrityError, ManifestError

from .data import load_dataset, make_split

DEFAULT_MODELS = Path(__file__).parent / "default_models"
EXPORT_VERSION = "1"  # bump when the exporter's output for the same checkpoints changes


def default_model_dir(dataset: str = "ml-100k") -> Path:
    return DEFAULT_MODELS / dataset


def cache_root() -> Path:
    """Where exported defaults are kept: $PADREC_CACHE, else $XDG_CACHE_HOME/padrec, else ~/.cache/padrec."""
    if os.environ.get("PADREC_CACHE"):
        return Path(os.environ["PADREC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "padrec"


def default_engines_key(model: Path) -> str:
    """A digest of the default model's files (target, PAD-Rec draft, catalogue) and the export version: a new
    model or exporter gets a new cache entry, never a stale one."""
    h = hashlib.sha256(EXPORT_VERSION.encode())
    for f in sorted(p for sub in ("target", "draft_padrec") for p in (model / sub).iterdir()):
        h.update(f"{f.parent.name}/{f.name}".encode())
        h.update(f.read_bytes())
    h.update((model / "catalogue.json").read_bytes())
    return h.hexdigest()[:16]


def cached_default_engines(dataset: str = "ml-100k") -> Path:
    """The default model's engine directory, exported on first use into the cache and reused after."""
    model = default_model_dir(dataset)
    out = cache_root() / f"engines-{dataset}-{default_engines_key(model)}"
    if (out / "manifest.json").is_file():
        return out
    from .cli import require_export_extra
    require_export_extra("demo (its first run exports the default model)")
    from .pipeline import export_checkpoints
    try:  # the cache's place comes from the environment: a file or an unwritable path there is the user's to fix
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"demo cache {out.parent}: cannot be made ({exc.strerror}) | point PADREC_CACHE (or "
                         "XDG_CACHE_HOME) at a writable directory, or pass --engines") from None
    click.echo(f"exporting the embedded default ({dataset}) to ONNX once; cached in {out} ...")
    export_checkpoints(model / "target", model / "draft_padrec", out)  # all or nothing: no half-made cache
    return out


def _open_cached(dataset: str) -> Recommender:
    """The default engines from the cache; damaged ones are named with the fix (the cache is ours to rebuild)."""
    engine_dir = cached_default_engines(dataset)
    try:
        return Recommender(engine_dir, backend="onnxruntime", device="cpu")
    except (IntegrityError, ManifestError) as exc:
        raise type(exc)(f"{str(exc).split(' | ')[0]} | the demo's cached engines are damaged: delete {engine_dir} "
                        "and run padrec demo again (it exports them anew)") from None


def demo_histories(rec: Recommender, dataset: str, users: int) -> tuple[list, list]:
    """Held-out users' histories when the data package is installed, else fixed random catalogue items."""
    try:
        split = make_split(load_dataset(dataset))
        chosen = split.test[:users]
        return [h for _, h, _ in chosen], [f"user {u}" for u, _, _ in chosen]
    except Exception:  # data package absent: the model still runs on any catalogue items
        rng = np.random.default_rng(0)
        ids = rec.catalogue.item_ids
        return [rng.choice(ids, size=8, replace=False).tolist() for _ in range(users)], \
            [f"random history {k}" for k in range(users)]


def _timed(rec: Recommender, hist: list, repeats: int, params: DecodeParams):
    rec.recommend(hist, params=params)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = rec.recommend(hist, params=params)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def run_demo(users: int = 3, engine_dir=None, speculate: str = "chain", dataset: str = "ml-100k",
             repeats: int = 3) -> dict:
    if users < 1:
        raise InputError(f"--users: got {users} | expected at least 1")
    rec = Recommender(engine_dir, backend="onnxruntime", device="cpu") if engine_dir else _open_cached(dataset)
    histories, names = demo_histories(rec, dataset, users)
    summary = {"users": []}
    for name, hist in zip(names, histories):
        ar, t_ar = _timed(rec, [hist], repeats, DecodeParams(speculate="off"))
        sd, t_sd = _timed(rec, [hist], repeats, DecodeParams(speculate=speculate))
        lst = sd.lists[0]
        click.echo(f"\n{name}: history of {len(hist)} items, last: "
                   + "; ".join(t for t in (_titles(rec, hist[-3:]) or map(str, hist[-3:]))))
        for rank, item in enumerate(lst.item_ids):
            title = f"  {lst.titles[rank]}" if lst.titles else ""
            click.echo(f"  {rank + 1:2d}. item {item:<5d} sid {lst.sids[rank]}{title}")
        same = ar.lists[0].tokens == lst.tokens
        click.echo(f"  speculative ({speculate}, PAD-Rec draft): tau {sd.tau:.2f} tokens/target pass | "
                   f"AR {t_ar * 1e3:.1f} ms vs speculative {t_sd * 1e3:.1f} ms per list "
                   f"({t_ar / t_sd:.2f}x, ONNX Runtime CPU) | identical to AR: {same}")
        summary["users"].append({"tau": sd.tau, "ar_ms": t_ar * 1e3, "sd_ms": t_sd * 1e3, "identical": same})
    return summary


def _titles(rec: Recommender, items: list):
    if rec.catalogue.titles is None:
        return None
    idx = rec.catalogue.index_of(items)
    return [rec.catalogue.titles[i] for i in idx]
