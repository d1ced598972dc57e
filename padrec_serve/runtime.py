"""The one place the server calls the runtime: open a Recommender, calibrate it, decode a group of jobs."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from padrec_runtime.errors import PadrecError

try:  # the lean public API
    from padrec_runtime import DecodeParams, Recommender
except ImportError:  # the runtime before it
    from padrec_runtime.api.recommender import Recommender
    DecodeParams = None


class DeadlineError(PadrecError):
    """A request took longer than the server's deadline and was cut."""


@dataclass(frozen=True)
class Decoded:
    """Lists of one decoded group and what it took."""

    item_ids: list  # per history
    sids: list  # per history, (items, levels)
    titles: list  # per history, titles or None
    tau: float
    rounds: int
    time_s: float


def open_recommender(engine_dir, device: str) -> Recommender:
    return Recommender(engine_dir, backend="onnxruntime", device=device)


def calibrate(rec: Recommender, batches: tuple, repeats: int = 2, seed: int = 0) -> list:
    """Calibrate `auto` speculation on random catalogue histories (lengths up to the engines' limit)."""
    rng = np.random.default_rng(seed)
    ids = rec.catalogue.item_ids
    length = min(8, rec.limits["max_history"])
    histories = [rng.choice(ids, size=length, replace=False).tolist() for _ in range(max(batches))]
    return rec.calibrate(histories, batches=batches, repeats=repeats)


def _options(params) -> dict:
    opts = dict(speculate=params.speculate, greedy=params.greedy, temperature=params.temperature,
                top_k=params.top_k, top_p=params.top_p, seed=params.seed)
    return {"params": DecodeParams(**opts)} if DecodeParams is not None else opts


def decode(rec: Recommender, histories: list, params, deadline_s: float | None) -> Decoded:
    """Lists for `histories` decoded as one batch with `params`; DeadlineError past `deadline_s`."""
    t0 = time.perf_counter()
    session = rec.start([list(h) for h in histories], params.n_items, **_options(params))
    while not session.done:
        if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
            raise DeadlineError(f"request: decoding took over the server's deadline of {deadline_s:g} s | cut after "
                                f"{time.perf_counter() - t0:.3f} s | retry, ask for fewer items, or raise --deadline-s")
        session.step()
    g = session.result()
    cat = rec.catalogue
    item_ids, sids, titles = [], [], []
    for toks in g.tokens:
        items = cat.decode_list(toks)
        idx = cat.index_of(items)
        item_ids.append(items)
        sids.append(cat.sids[idx].tolist())
        titles.append([cat.titles[i] for i in idx] if cat.titles is not None else None)
    return Decoded(item_ids, sids, titles, float(g.tau), int(g.rounds), time.perf_counter() - t0)
