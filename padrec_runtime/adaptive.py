"""Adaptive speculation: per batch size, the fastest of AR and a few speculation settings, from measurements.

Speculation costs K draft passes and a wider target pass per round; it pays while the target pass is
launch- or bandwidth-bound and stops paying as batches grow. `calibrate` times each candidate on the
caller's own histories and keeps the fastest, AR included, so the chosen setting is never slower than AR
on what was measured.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError

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


def calibrate(rec, histories: list, batches=(1, 8, 32), repeats: int = 3, candidates=CANDIDATES) -> list:
    """Choices (sorted by batch) measured on `histories` (at least max(batches) of them)."""
    if len(histories) < max(batches):
        raise InputError(f"calibrate: {len(histories)} histories for batches up to {max(batches)}")
    plan = []
    for batch in sorted(batches):
        hist = histories[:batch]
        times = {}
        for speculate, k in candidates:
            if speculate != "off" and "draft" not in rec.backends:
                continue
            run = lambda: rec.recommend(hist, speculate=speculate, draft_steps=k)  # noqa: E731
            try:
                run()
            except InputError:  # this setting does not fit the engines' limits
                continue
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                samples.append(time.perf_counter() - t0)
            times[(speculate, k)] = float(np.median(samples)) * 1e3
        (speculate, k), ms = min(times.items(), key=lambda kv: kv[1])
        plan.append(Choice(batch, speculate, k, ms, times[("off", None)]))
    return plan


def choose(plan: list, batch: int) -> Choice:
    """The choice calibrated for the smallest batch size >= batch (the largest one beyond the plan)."""
    for c in plan:
        if batch <= c.batch:
            return c
    return plan[-1]
