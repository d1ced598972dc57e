"""Turning constrained logits into choices: greedy pick, sampling distribution, the draft's path score."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BackendError


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from the target's (and the draft's) constrained logits."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 keeps every allowed token
    top_p: float = 1.0  # 1.0 keeps every allowed token


def allowed_logits(logits: np.ndarray, allowed: np.ndarray, what: str) -> np.ndarray:
    """logits (V,) restricted to allowed token ids, float64; NaN/inf there is an engine failure."""
    x = logits[allowed].astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise BackendError(f"{what}: non-finite logits (NaN/inf) | the engine overflowed; "
                           "rebuild in fp32 or bf16, or check the engine files")
    return x


def distribution(x: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Sampling probabilities over the allowed tokens whose logits are x."""
    x = x / cfg.temperature
    if 0 < cfg.top_k < len(x):
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < cfg.top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return p


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def choose(x: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Index (into the allowed tokens) of the target's choice."""
    if cfg.greedy:
        return int(np.argmax(x))
    return int(rng.choice(len(x), p=distribution(x, cfg)))
