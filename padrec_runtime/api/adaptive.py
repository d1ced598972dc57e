"""Adaptive speculation: per batch size, the fastest of AR and a few speculation settings, from measurements.

Speculation costs K draft passes and a wider target pass per round; it pays while the target pass is
launch- or bandwidth-bound and stops paying as batches grow. `calibrate` times the candidates in turn on
the caller's own histories and keeps the fastest, AR included; speculation must beat AR by a margin (3%) on
the medians and on the fastest runs, and its slowest run AR's median, so the chosen setting is never slower
than AR on what was measured, nor merely within its noise; given more histories, the win must hold again on
others. After one round, candidates far behind the fastest are dropped (PRUNE): each of those is run twice (its
warm-up and one timed run) instead of four times. A chain at the engines' own K is always a candidate, and so is that chain with device rounds where the
caches allow them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .options import DecodeParams, _check

CANDIDATES = (("off", None), ("chain", 2), ("chain", 4), ("chain", 6), ("chain", 8),
              ("tree", 3), ("tree", 4), ("tree", 6))


@dataclass(frozen=True)
class Choice:
    """The setting used for batches up to `batch`."""

    batch: int
    speculate: str
    draft_steps: int | None
    ms: float  # measured median per batch call
    ar_ms: float  # AR on the same histories
    device_rounds: bool = False  # fused chain rounds queued on the device (DecodeConfig.device_rounds)


MARGIN = 0.03  # speculation is chosen only when it beats AR by at least this fraction of AR's time
# after the first round, a candidate this much slower than the fastest is timed no more and cannot be picked (AR
# always stays): at 7B every candidate at batch 32 and 64 three times took minutes (tree passes of 1-2 s)
PRUNE = 1.25


def pick(times: dict, margin: float = MARGIN, worst: dict | None = None, fastest: dict | None = None) -> tuple:
    """The fastest setting of `times` ({(speculate, K): median ms}, AR as ("off", None)), or AR unless that
    setting beats AR by `margin`, (given `worst`, each setting's slowest run) its slowest run is no slower
    than AR's median, and (given `fastest`, each setting's fastest run) its fastest run beats AR's fastest by
    `margin` too: a setting within the measurement noise of AR is not worth its risk. A slow spell of the
    machine only ever adds time, so the fastest runs are the least disturbed (H100 runs with a noisy host
    picked a chain at batch 64 on medians that then ran 23% and 14% slower than AR)."""
    best = min(times, key=times.get)
    ar = ("off", None)
    if best == ar or times[best] > times[ar] * (1 - margin):
        return ar
    if worst is not None and worst[best] > times[ar]:
        return ar
    if fastest is not None and fastest[best] > fastest[ar] * (1 - margin):
        return ar
    return best


def candidates_for(rec, candidates=CANDIDATES) -> tuple:
    """`candidates` plus a chain at the engines' own K (the depth the fused draft-chain graph was exported for,
    usually the fastest chain), where it is not among them, and that chain with device rounds where the
    recommender's caches allow them (("chain", K, True))."""
    if "draft" not in rec.backends:
        return tuple(candidates)
    own = ("chain", rec.limits["draft_steps"])
    extra = () if own in candidates else (own,)
    if rec.settings.device_cache and rec.settings.static_shapes and "draft_chain" in rec.backends:
        extra += (own + (True,),)
    return tuple(candidates) + extra


def _runs(rec, hist: list, candidates) -> dict:
    """{candidate: a call decoding `hist` with it}, each called once to warm it (first calls build sessions and, on
    CUDA, capture graphs); candidates that do not fit the engines' limits are left out."""
    runs = {}
    for key in candidates:
        speculate, k, dev = (key + (False,))[:3]
        if speculate != "off" and "draft" not in rec.backends:
            continue
        params = DecodeParams(speculate=speculate, draft_steps=k, device_rounds=dev)
        run = (lambda p=params: rec.recommend(hist, params=p))
        try:
            run()
        except InputError:  # this setting does not fit the engines' limits (AR always fits: its refusal is the input's)
            if key == ("off", None):
                raise
            continue
        runs[key] = run
    return runs


def _timed_pick(runs: dict, repeats: int, margin: float, clock=time.perf_counter) -> tuple:
    """(pick, median ms per candidate): the candidates timed in turn, `repeats` rounds, so all of them see the same
    machine state (after the first round only AR and those within PRUNE of the fastest, the only ones `pick`
    weighs); medians, fastest and slowest runs weighed by `pick`."""
    samples = {key: [] for key in runs}
    timed = list(runs)
    for r in range(repeats):
        for key in timed:
            t0 = clock()
            runs[key]()
            samples[key].append(clock() - t0)
        if r == 0:
            first = min(samples[key][0] for key in timed)
            timed = [key for key in timed if key == ("off", None) or samples[key][0] <= first * PRUNE]
    times = {key: float(np.median(v)) * 1e3 for key, v in samples.items()}
    best = pick({key: times[key] for key in timed}, margin, {key: max(samples[key]) * 1e3 for key in timed},
                {key: min(samples[key]) * 1e3 for key in timed})
    return best, times


def _calibration_args(rec, histories, batches, repeats) -> tuple:
    """calibrate's arguments checked: a list of histories (each checked as a request's), batch sizes the engines
    take, at least one repeat."""
    if isinstance(histories, np.ndarray):
        histories = histories.tolist()
    if not isinstance(histories, (list, tuple)) or not histories:
        raise InputError(f"calibrate histories: got {type(histories).__name__} {histories!r:.40} | expected a "
                         "non-empty list of histories (lists of item ids)")
    if not isinstance(batches, (list, tuple)) or not batches:
        raise InputError(f"calibrate batches: got {batches!r} | expected a non-empty tuple of batch sizes, e.g. (1, 8)")
    top = rec.limits["max_batch"]
    batches = tuple(_check("calibrate", "batches", b, "int", lo=1, hi=top) for b in batches)
    histories = [rec._check_history(b, h) for b, h in enumerate(histories)]  # named by row, before any timing
    return histories, batches, _check("calibrate", "repeats", repeats, "int", lo=1, hi=1000)


def calibrate(rec, histories: list, batches=(1, 8, 32), repeats: int = 3, candidates=CANDIDATES,
              margin: float = MARGIN) -> list:
    """Choices (sorted by batch) measured on `histories` (at least max(batches) of them). Candidates (and a
    chain at the engines' K) are timed in turn (`_timed_pick`). Where speculation wins and `histories` hold
    another `batch` of them, the win must hold again against AR on those (timed afresh): a setting that wins
    on one set of histories by luck or noise alone is not kept."""
    histories, batches, repeats = _calibration_args(rec, histories, batches, repeats)
    if len(histories) < max(batches):
        raise InputError(f"calibrate: got {len(histories)} histories | expected at least {max(batches)}, the largest "
                         f"batch timed ({list(batches)}) | pass more histories, or batches=... up to {len(histories)}")
    candidates = candidates_for(rec, candidates)
    ar = ("off", None)
    plan = []
    for batch in sorted(batches):
        best, times = _timed_pick(_runs(rec, histories[:batch], candidates), repeats, margin)
        if best != ar and len(histories) >= 2 * batch:
            again, _ = _timed_pick(_runs(rec, histories[batch:2 * batch], (ar, best)), repeats, margin)
            best = best if again == best else ar
        speculate, k, dev = (best + (False,))[:3]
        plan.append(Choice(batch, speculate, k, times[best], times[ar], dev))
    return plan


def choose(plan: list, batch: int) -> Choice:
    """The choice calibrated for the smallest batch size >= batch (the largest one beyond the plan)."""
    for c in plan:
        if batch <= c.batch:
            return c
    return plan[-1]
