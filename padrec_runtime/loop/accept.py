"""Acceptors: which of a round's draft tokens the target keeps, and its bonus token. Greedy walks (chain or
tree) follow the target's own choice; speculative sampling keeps the target's distribution for sampled chains."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..errors import BackendError
from .sampling import SamplingConfig, allowed_logits, choose, distribution
from .state import Root, Scored, Verdict


class Acceptor(Protocol):
    """Row b's verdict from the target's verify pass over its proposal."""

    def accept(self, scored: Scored, b: int, root: Root, tree: list) -> Verdict: ...


class TargetWalk:
    """Follow the target's own choice down the tree: lossless for greedy, and for sampling with a deterministic
    draft (trees). At each node the target picks (argmax, or a sample of its distribution); if a child carries
    that token the path goes on, otherwise the pick is the bonus token: exactly what the target alone writes."""

    def __init__(self, constraint, sampling: SamplingConfig, rng):
        self.constraint, self.sampling, self.rng = constraint, sampling, rng

    def accept(self, scored, b, root, tree) -> Verdict:
        con, logits = self.constraint, scored.logits[b]
        children: dict = {}
        for i, n in enumerate(tree):
            children.setdefault(n.parent, {})[n.token] = i
        path, tokens, cur, state = [0], [], -1, root.state
        while not state.done:
            allowed = con.allowed(state)
            x = allowed_logits(logits[cur + 1], allowed, "target")
            token = int(allowed[choose(x, self.sampling, self.rng)])
            nxt = children.get(cur, {}).get(token)
            tokens.append(token)
            if nxt is None:
                return Verdict(path, tokens, con.advance(state, token))
            cur, state = nxt, tree[nxt].state if tree[nxt].state is not None else con.advance(state, token)
            path.append(cur + 1)
        return Verdict(path, tokens, state)


class ChainSampler:
    """Speculative sampling of a chain (Leviathan et al.): accept x with min(1, p/q), else resample from
    max(0, p - q) normalised; after a fully accepted chain, a bonus token from p."""

    def __init__(self, constraint, sampling: SamplingConfig, rng):
        self.constraint, self.sampling, self.rng = constraint, sampling, rng

    def accept(self, scored, b, root, tree) -> Verdict:
        con, logits, rng = self.constraint, scored.logits[b], self.rng
        path, tokens, state = [0], [], root.state
        for i, n in enumerate(tree):
            p = distribution(allowed_logits(logits[i], n.allowed, "target"), self.sampling)
            k = int(np.searchsorted(n.allowed, n.token))
            if rng.random() < min(1.0, p[k] / n.q[k]):
                path.append(i + 1)
                tokens.append(n.token)
                state = n.state
                continue
            residual = np.maximum(p - n.q, 0.0)
            k = int(rng.choice(len(p), p=residual / residual.sum()))
            tokens.append(int(n.allowed[k]))
            return Verdict(path, tokens, con.advance(state, n.allowed[k]))
        if state.done:
            return Verdict(path, tokens, state)
        allowed = con.allowed(state)
        k = choose(allowed_logits(logits[len(tree)], allowed, "target"), self.sampling, rng)
        tokens.append(int(allowed[k]))
        return Verdict(path, tokens, con.advance(state, allowed[k]))


class ChainPicks:
    """The greedy walk of a fused chain: the target's constrained argmax at every verify position is known at
    once (`Scored.picks`, from the grammar masks built while the verify pass ran); the chain is accepted up to
    the first position where the pick differs from the draft's token, which is the bonus token."""

    def __init__(self, constraint):
        self.constraint = constraint

    def accept(self, scored, b, root, tree) -> Verdict:
        picks = scored.picks[b] if scored.picks is not None else None
        if picks is None:
            picks = masked_picks(scored.logits[b][:len(tree) + 1], scored.masks[b][:len(tree) + 1])
        path, tokens, state = [0], [], root.state
        for i, node in enumerate(tree):
            if state.done:
                return Verdict(path, tokens, state)
            token = int(picks[i])
            tokens.append(token)
            if token != node.token:  # the bonus token
                return Verdict(path, tokens, self.constraint.advance(state, token))
            state = node.state
            path.append(i + 1)
        if state.done:
            return Verdict(path, tokens, state)
        token = int(picks[len(tree)])
        tokens.append(token)
        return Verdict(path, tokens, self.constraint.advance(state, token))


def chain_states(root, chain, tokens, constraint, V: int) -> np.ndarray:
    """Fill a fused chain's nodes with its tokens and the grammar state after each, as far as the grammar
    allows them (the chain does not ban items it completes itself; such a token is never accepted). Returns
    the (positions, V) mask of what the grammar allows at each verify position the walk can reach (root
    first), so the walk after the verify pass is one masked argmax."""
    mask = np.zeros((len(chain) + 1, V), dtype=bool)
    state, reach = root.state, 0
    for i, (n, tok) in enumerate(zip(chain, tokens)):
        n.token = int(tok)
        if state is None or state.done:
            state = None
            continue
        mask[i, constraint.allowed(state)] = True
        state = constraint.advance(state, n.token, checked=True) if constraint.allows(state, n.token) else None
        n.state = state
        reach = i + 1
    if state is not None and not state.done:
        mask[reach, constraint.allowed(state)] = True
    return mask


def masked_picks(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Argmax over the last axis among what `mask` allows; the first maximum wins ties (the lowest token id, as
    argmax over the sorted allowed ids in `TargetWalk`). Non-finite allowed logits are an engine failure, as in
    `allowed_logits`."""
    if not np.all(np.isfinite(logits[mask])):
        raise BackendError("target: non-finite logits (NaN/inf) | the engine overflowed; rebuild in fp32 or bf16, "
                           "or check the engine files")
    return np.where(mask, logits, -np.inf).argmax(axis=-1)


def batch_picks(logits: np.ndarray, masks: list) -> list:
    """`masked_picks` for every live row of a batch in one pass (None for finished rows)."""
    live = [b for b, m in enumerate(masks) if m is not None]
    picks = [None] * len(masks)
    if live:
        T1 = masks[live[0]].shape[0]
        for b, p in zip(live, masked_picks(logits[live, :T1], np.stack([masks[b] for b in live]))):
            picks[b] = p
    return picks
