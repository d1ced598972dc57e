"""The optimizer-step loop the target's and the drafts' training share: batches in a seeded order, resumable at
any step, paused before a time budget runs out, progress with tokens/s and an ETA."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from padrec_runtime.errors import CheckpointError


@dataclass(frozen=True)
class Position:
    """Where a training run stands: `step` optimizer steps done in epoch `epoch` (0-based)."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}


class Paused(Exception):
    """A training run stopped by its time budget before its last step; `state` continues it (pass it back as
    `resume`). Not a failure: the caller saves the state and a later process resumes."""

    def __init__(self, position: Position, state: dict):
        super().__init__(f"paused at epoch {position.epoch + 1}, step {position.step}")
        self.position, self.state = position, state


class Budget:
    """Seconds this process may still spend (a device call's limit), counted from when it is made."""

    def __init__(self, seconds: float | None = None):
        self.seconds, self.start = seconds, time.monotonic()

    def left_s(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def allows(self, need_s: float) -> bool:
        return self.left_s() >= need_s


def batch_order(n: int, batch_size: int, rng: np.random.Generator, shuffle: bool = True) -> list:
    """One epoch's batches as index arrays (one permutation drawn from rng per epoch)."""
    order = rng.permutation(n) if shuffle else np.arange(n)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


@dataclass(frozen=True)
class Loop:
    """What run_steps needs besides the step itself."""

    n: int  # training sequences
    batch_size: int  # sequences per optimizer step
    epochs: int
    desc: str  # progress label
    progress: bool = True  # a tqdm bar
    log: Callable[[str], None] | None = None  # progress lines (every log_every_s) for logs where bars are noise
    log_every_s: float = 30.0
    budget: Budget | None = None
    pause_s: float = 0.0  # seconds a pause needs (saving the training state) once the budget says stop


def run_steps(loop: Loop, rng: np.random.Generator, start: Position, step: Callable, epoch_end: Callable) -> Position:
    """Run optimizer steps from `start` to the end of loop.epochs, or until the budget would not cover two more
    steps and the pause: returns the position reached. step(idx) -> (loss float, tokens int) trains on the
    sequences idx; epoch_end(epoch) runs after each finished epoch. The batches of the finished epochs are
    drawn from rng too, so a resumed run sees the batches an uninterrupted one would."""
    per_epoch = math.ceil(loop.n / loop.batch_size)
    total, done = loop.epochs * per_epoch, start.epoch * per_epoch + start.step
    meter = _Meter(total, done, loop)
    for epoch in range(loop.epochs):
        order = batch_order(loop.n, loop.batch_size, rng)
        if epoch < start.epoch:
            continue
        for i, idx in enumerate(order):
            if epoch == start.epoch and i < start.step:
                continue
            if loop.budget is not None and not loop.budget.allows(2 * meter.step_s + loop.pause_s):
                meter.close(f"paused at epoch {epoch + 1} step {i}: the time budget is nearly spent")
                return Position(epoch, i)
            loss, tokens = step(idx)
            meter.update(epoch, loss, tokens)
        epoch_end(epoch)
    meter.close("finished")
    return Position(loop.epochs, 0)


class _Meter:
    """Step times, tokens/s and the ETA, shown on a bar and/or logged as lines."""

    def __init__(self, total: int, done: int, loop: Loop):
        self.total, self.done, self.loop = total, done, loop
        self.bar = tqdm(total=total, initial=done, desc=loop.desc, disable=not loop.progress)
        self.t0 = self.last_log = time.perf_counter()
        self.tokens, self.steps, self.step_s, self.losses = 0, 0, 0.0, []
        self._t = self.t0

    def update(self, epoch: int, loss: float, tokens: int) -> None:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        # the first step carries warm-up (allocator, kernels): the estimate follows the recent steps
        self.step_s = dt if self.steps == 0 else max(0.8 * self.step_s + 0.2 * dt, dt)
        self.done, self.steps, self.tokens = self.done + 1, self.steps + 1, self.tokens + tokens
        self.losses.append(loss)
        tok_s = self.tokens / (now - self.t0)
        self.bar.update(1)
        self.bar.set_postfix(epoch=epoch, loss=f"{np.mean(self.losses[-20:]):.3f}", tok_s=f"{tok_s:,.0f}")
        if self.loop.log and (now - self.last_log >= self.loop.log_every_s or self.done == self.total):
            self.last_log = now
            eta = (self.total - self.done) * (now - self.t0) / self.steps
            self.loop.log(f"{self.loop.desc}: epoch {epoch + 1}/{self.loop.epochs} step {self.done}/{self.total} "
                          f"loss {np.mean(self.losses[-20:]):.4f} {tok_s:,.0f} tok/s ETA {eta:.0f} s")

    def close(self, why: str) -> None:
        self.bar.close()
        if self.loop.log:
            self.loop.log(f"{self.loop.desc}: {why} ({self.steps} steps, {time.perf_counter() - self.t0:.0f} s)")


def save_state(path: Path, settings: dict, state: dict) -> None:
    """Write a training state (with the settings it belongs to) atomically: an interrupted write leaves the
    previous one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"settings": settings, **state}, tmp)
    tmp.replace(path)


def load_state(path: Path, settings: dict, device: str = "cpu") -> dict | None:
    """The training state at path (None when there is none), its tensors mapped from the file onto device;
    refused when it was made with other settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise CheckpointError(f"{path}: unreadable ({str(exc)[:200]}) | delete it to start over") from None
    if state.get("settings") != settings:
        diff = sorted(k for k in settings if state.get("settings", {}).get(k) != settings[k])
        raise CheckpointError(f"{path}: a run with other settings ({', '.join(diff)}) | rerun with those settings "
                              "to continue it, or use a new directory")
    return state
