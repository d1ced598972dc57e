"""The one place the server calls the runtime: open a Recommender, calibrate it, decode a group of histories."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from padrec_runtime.api.options import request_cost
from padrec_runtime.errors import InputError
from padrec_runtime.grammar import ListConstraint


@dataclass(frozen=True)
class Decoded:
    """Lists of one decoded group and what it took."""

    item_ids: list  # per history
    sids: list  # per history, (items, levels)
    titles: list  # per history, titles or None
    tau: float
    rounds: int
    time_s: float


def visible_gpu(visible: str | None, gpu: int) -> str:
    """CUDA_VISIBLE_DEVICES that leaves only GPU `gpu` (an index among `visible`, Triton's numbering)."""
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else None
    if ids is None:
        return str(gpu)
    if not 0 <= gpu < len(ids):
        raise InputError(f"GPU {gpu}: CUDA_VISIBLE_DEVICES={visible!r} has {len(ids)} | give --devices among "
                         f"0..{len(ids) - 1}")
    return ids[gpu]


def pin_gpu(gpu: int) -> None:
    """Make GPU `gpu` this process's only (device 0): the runtime runs on device 0. Each Triton model instance is
    a process of its own that has not touched CUDA before its `initialize`, so this holds for all it opens."""
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"), gpu)


def open_recommender(engine_dir, device: str, gpu: int | None = None,
                     options: RuntimeOptions | None = None) -> Recommender:
    """The instance's Recommender; on CUDA with `gpu` given, on that GPU."""
    if device == "cuda" and gpu is not None:
        pin_gpu(gpu)
    return Recommender(engine_dir, device=device, options=options)


def calibration_batches(max_batch: int, device: str = "cpu") -> tuple:
    """The batch sizes `auto` is calibrated at. On CUDA every power of two up to max_batch (and max_batch): they
    are also the shapes a group is padded up to (`decode`), so calibration has warmed each one before a request
    comes, and no group is padded to more than twice its size below max_batch."""
    sizes = {1 << k for k in range(max_batch.bit_length())} if device == "cuda" else {1, 4, 16}
    return tuple(sorted({b for b in sizes if b <= max_batch} | {max_batch}))


def calibrate(rec: Recommender, batches: tuple, repeats: int = 3, seed: int = 0) -> list:
    """Calibrate `auto` speculation on random catalogue histories of 5 to 20 items (as requests come), twice as many
    as the largest batch, so that every speculative win is checked again on other histories (adaptive.calibrate)."""
    rng = np.random.default_rng(seed)
    ids = rec.catalogue.item_ids
    top = min(20, rec.limits["max_history"])
    lengths = rng.integers(min(5, top), top + 1, size=2 * max(batches))
    histories = [rng.choice(ids, size=int(n), replace=False).tolist() for n in lengths]
    return rec.calibrate(histories, batches=batches, repeats=repeats)


def padded_size(n: int, sizes: tuple) -> int:
    """The smallest of `sizes` that holds n rows; n itself when none does (or no sizes are given)."""
    return min((s for s in sizes if s >= n), default=n)


def within_budget(rec: Recommender, batch: int, n_items: int, params: DecodeParams) -> bool:
    """Whether `batch` rows of this request stay within the Recommender's max_request_tokens (the check
    Recommender.recommend makes): padding must not turn a group that fits into one the runtime refuses."""
    cfg = rec.decode_config(params, batch)
    tokens = ListConstraint(rec.catalogue, n_items=n_items).list_length()
    return request_cost(batch, tokens, cfg) <= rec.settings.max_request_tokens


def decode(rec: Recommender, histories: list, n_items: int, params: DecodeParams, batch_sizes: tuple = ()) -> Decoded:
    """Lists for `histories` decoded as one batch (DeadlineError past params.deadline_s).

    `batch_sizes`: the batch shapes this instance has warmed (a GPU server's calibration batches). A group is
    padded up to the next of them with copies of its own histories, because on the GPU every new batch shape
    builds its caches and captures its CUDA graphs on first use (hundreds of milliseconds at LLM scale, inside
    some request's latency). The copies' lists are dropped, and tau is the real rows' own. A group is not padded
    past the request-token budget (it would be refused, and its members retried one by one)."""
    rows = [list(h) for h in histories]
    n = len(rows)
    size = padded_size(n, batch_sizes) if rows else n
    if size > n and not within_budget(rec, size, n_items, params):
        size = n
    rows += [rows[k % n] for k in range(size - n)]
    t0 = time.perf_counter()
    out = rec.recommend(rows, n_items, params=params)
    real = [c for row in out.committed[:n] for c in row]
    lists = out.lists[:n]
    return Decoded([r.item_ids for r in lists], [r.sids for r in lists], [r.titles for r in lists],
                   float(np.mean(real)) if real else 0.0, int(out.rounds), time.perf_counter() - t0)
