"""What the loop passes between its stages: the request's plan, draft nodes, rows, verdicts, the result."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..grammar import ConstraintState
from .sampling import SamplingConfig

SPECULATE_MODES = ("off", "chain", "tree")


@dataclass(frozen=True)
class DecodeConfig:
    """How lists are decoded (resolved from a request's DecodeParams and the manifest)."""

    speculate: str = "chain"  # off (AR, target only) | chain | tree
    draft_steps: int = 4  # K: speculation depth per round
    tree_topk: int = 4  # tree: children per expanded node and nodes expanded per depth
    tree_size: int = 16  # tree: draft tokens verified per round
    sampling: SamplingConfig = SamplingConfig()
    seed: int = 0
    fused_chain: bool = True  # greedy chain rounds use a draft_chain graph with this K where there is one
    device_rounds: bool = False  # fused chain on device caches: each round's next chain queued behind its verify

    def __post_init__(self):
        if self.speculate not in SPECULATE_MODES:
            raise InputError(f"speculate: got {self.speculate!r} | expected one of {', '.join(SPECULATE_MODES)}")
        if not 1 <= self.draft_steps <= 16:
            raise InputError(f"draft_steps: got {self.draft_steps} | expected 1..16")
        if self.tree_topk < 1 or self.tree_size < 1:
            raise InputError("tree_topk and tree_size must be >= 1")
        if not self.sampling.greedy and (self.sampling.temperature <= 0 or not 0 < self.sampling.top_p <= 1):
            raise InputError("sampling: temperature must be > 0 and top_p in (0, 1]")


@dataclass
class Node:
    """One draft token of a round's tree (a chain is a tree of width one)."""

    token: int
    parent: int  # index of the parent node in the row's node list, -1 for the root
    depth: int  # 1 for the root's children
    score: float  # draft log-probability of the path from the root
    state: ConstraintState | None  # constraint state after this token (None: worked out if accepted)
    q: np.ndarray | None = None  # chain sampling: draft distribution over `allowed` the token was drawn from
    allowed: np.ndarray | None = None  # chain sampling: allowed token ids at the parent
    scratch: int = -1  # index of this token's entry in the draft's scratch KV, once expanded
    hidden: np.ndarray | None = None  # draft output feature, once expanded


@dataclass
class Root:
    """Where a row stands between rounds."""

    token: int  # last committed token, not yet seen by the target
    position: int  # its position
    state: ConstraintState  # constraint state after it
    draft_logits: np.ndarray | None = None  # (V,) draft prediction of the next token
    draft_hidden: np.ndarray | None = None  # (H,) draft feature behind that prediction
    pending: tuple | None = None  # fused chain: (features, tokens, slots, start) the draft has not seen yet


@dataclass
class Proposal:
    """A round's draft: per row, the nodes to verify (parents before children)."""

    trees: list  # per row, list of Node
    chain: object | None = None  # a queued draft-chain call whose `tokens` output the (chain) nodes carry


@dataclass
class Scored:
    """The target's verify pass over a round's proposal."""

    logits: np.ndarray  # (B, T, V)
    hidden: np.ndarray  # (B, T, H)
    masks: list | None = None  # fused chain: per row, (T, V) grammar mask of each verify position (None: done)
    picks: list | None = None  # fused chain: per row, the target's constrained argmax at each position


@dataclass
class Verdict:
    """Outcome of verifying one row's proposal."""

    path: list  # verify-order indices accepted, root (0) first
    tokens: list  # committed tokens: accepted draft tokens then the bonus token, if any
    state: ConstraintState  # constraint state after the committed tokens
    features: np.ndarray | None = None  # (len(path), H) target hidden states along the path, for the draft
    depth: int = 0  # tokens of the current item before the committed ones: where their item slots start


@dataclass
class Generation:
    """Decoded lists and what it took."""

    tokens: list  # per row, the output tokens (eos included)
    committed: list  # per row, tokens committed per target forward
    time_draft_s: float = 0.0
    time_verify_s: float = 0.0
    time_total_s: float = 0.0
    rounds: int = 0  # target forwards after prefill

    @property
    def tau(self) -> float:
        """Mean tokens committed per target forward, bonus included."""
        flat = [c for row in self.committed for c in row]
        return float(np.mean(flat)) if flat else 0.0

    @property
    def time_host_s(self) -> float:
        return self.time_total_s - self.time_draft_s - self.time_verify_s


@dataclass
class Clock:
    """Seconds in engine calls. A fused chain round queues the draft chain and waits for it together with the
    verify pass, so there draft counts the queueing and verify the wait for both."""

    draft: float = 0.0
    verify: float = 0.0
