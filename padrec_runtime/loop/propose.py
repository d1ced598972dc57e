"""Proposers: where a round's draft tokens come from. None (AR), the draft step by step (chain or tree, greedy
or sampled), the fused draft-chain graph (one call a round), and that chain queued on the device."""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from ..cache.rounds import DeviceRounds
from ..grammar import PAD
from .feeds import catch_up_feeds, chain_feeds, committed_pairs, prompt_slots, self_mask
from .sampling import allowed_logits, distribution, log_softmax
from .state import Clock, DecodeConfig, Node, Proposal


class Proposer(Protocol):
    """A round's draft tokens, and what the draft needs to see of the target's committed tokens."""

    def behind_prefill(self, call, prompts: list, states: list) -> None:
        """Queue work behind the target's prefill `call` (before the host reads it)."""

    def after_prefill(self, roots: list, feats: list, tokens: list) -> None:
        """The prompt's features and the tokens after them (the first one chosen by the target)."""

    def propose(self, roots: list) -> Proposal: ...

    def while_verifying(self, call, roots: list, proposal: Proposal, masks: list) -> None:
        """Runs once a fused chain's tokens are known, while the verify `call` still runs."""

    def after_accept(self, roots: list, verdicts: list, starts: list) -> None:
        """Feed the draft the round's committed tokens (roots already advanced; starts: their positions)."""


class NoDraft:
    """AR: nothing to propose; each round the target writes one token."""

    def behind_prefill(self, call, prompts, states) -> None:
        pass

    def after_prefill(self, roots, feats, tokens) -> None:
        pass

    def propose(self, roots) -> Proposal:
        return Proposal([[] for _ in roots])

    def while_verifying(self, call, roots, proposal, masks) -> None:
        pass

    def after_accept(self, roots, verdicts, starts) -> None:
        pass


class StepDraft(NoDraft):
    """The draft graph called once per depth: a chain (width 1) or a dynamic tree (best tree_topk per depth,
    then the best tree_size nodes by path score); greedy or, for chains, sampled (speculative sampling)."""

    def __init__(self, draft, constraint, cfg: DecodeConfig, rng, clock: Clock):
        self.draft, self.constraint, self.cfg, self.rng, self.clock = draft, constraint, cfg, rng, clock

    def after_prefill(self, roots, feats, tokens) -> None:
        slots = prompt_slots(tokens, self.constraint.catalogue.layout)
        self._catch_up(roots, feats, tokens, slots, [0] * len(roots))

    def after_accept(self, roots, verdicts, starts) -> None:
        if any(not r.state.done for r in roots):
            self._catch_up(roots, *committed_pairs(roots, verdicts, self.constraint.catalogue.layout), starts)

    def _catch_up(self, roots, feats, tokens, slots, starts) -> None:
        """Feed the draft (target feature, next token) pairs of newly committed positions at step 0."""
        feeds, mask, lens = catch_up_feeds(feats, tokens, slots, starts, self.constraint.catalogue.layout)
        t = time.perf_counter()
        self.draft.discard()
        out = self.draft.forward(feeds, mask)
        self.clock.draft += time.perf_counter() - t
        self.draft.commit([np.arange(n) for n in lens])
        for b, n in enumerate(lens):
            if n:
                roots[b].draft_logits = out["logits"][b, n - 1]
                roots[b].draft_hidden = out["hidden"][b, n - 1]

    def propose(self, roots) -> Proposal:
        """Draft up to K tokens deep per row."""
        cfg, nodes = self.cfg, [[] for _ in roots]
        for b, r in enumerate(roots):
            if not r.state.done:
                self._add_children(nodes[b], -1, r.draft_logits, r.state, 0.0, 1)
        width = 1 if cfg.speculate == "chain" else cfg.tree_topk
        for depth in range(1, cfg.draft_steps):
            expand = []
            for row in nodes:
                level = [i for i, n in enumerate(row) if n.depth == depth and not n.state.done]
                level.sort(key=lambda i: -row[i].score)
                expand.append(level[:width])
            if not any(expand):
                break
            self._expand(roots, nodes, expand, depth)
        return Proposal([self._select(row) for row in nodes])

    def _expand(self, roots, nodes, expand, depth: int) -> None:
        """One draft call over the nodes to expand at `depth` (each sees its ancestors in the scratch KV)."""
        B, T, scratch = len(roots), max(len(e) for e in expand), self.draft.scratch
        H = next(r.draft_hidden.shape[-1] for r in roots if r.draft_hidden is not None)
        hid = np.zeros((B, T, H), np.float32)
        ids = np.full((B, T), PAD, np.int32)
        pos = np.zeros((B, T), np.int32)
        before = np.zeros((B, T), np.int64)  # tokens of the current item before each node's token
        mask = self_mask(B, T, scratch)
        for b, e in enumerate(expand):
            for t, i in enumerate(e):
                n = nodes[b][i]
                parent = roots[b] if n.parent < 0 else nodes[b][n.parent]
                hid[b, t] = roots[b].draft_hidden if n.parent < 0 else parent.hidden
                ids[b, t], pos[b, t], before[b, t] = n.token, roots[b].position + depth - 1, parent.state.depth
                a = n.parent
                while a >= 0:
                    mask[b, t, nodes[b][a].scratch] = True
                    a = nodes[b][a].parent
                n.scratch = scratch + t
        t0 = time.perf_counter()
        out = self.draft.forward({"hidden_in": hid, "input_ids": ids, "position_ids": pos,
                                  "step": np.full((B, T), depth, np.int32),
                                  "slot": self.constraint.catalogue.layout.slots(ids[..., None], before)[..., 0]},
                                 mask)
        self.clock.draft += time.perf_counter() - t0
        for b, e in enumerate(expand):
            for t, i in enumerate(e):
                n = nodes[b][i]
                n.hidden = out["hidden"][b, t]
                self._add_children(nodes[b], i, out["logits"][b, t], n.state, n.score, depth + 1)

    def _add_children(self, nodes, parent, logits, state, score, depth) -> None:
        con, cfg = self.constraint, self.cfg
        allowed = con.allowed(state)
        if len(allowed) == 0:
            return
        x = allowed_logits(logits, allowed, "draft")
        logq = log_softmax(x)
        if cfg.speculate == "chain" and not cfg.sampling.greedy:
            q = distribution(x, cfg.sampling)
            k = int(self.rng.choice(len(x), p=q))
            nodes.append(Node(int(allowed[k]), parent, depth, score + logq[k], con.advance(state, allowed[k]),
                              q=q, allowed=allowed))
            return
        width = 1 if cfg.speculate == "chain" else cfg.tree_topk
        for k in np.argsort(-x, kind="stable")[:width]:
            nodes.append(Node(int(allowed[k]), parent, depth, score + logq[k], con.advance(state, allowed[k])))

    def _select(self, nodes: list) -> list:
        """Best tree_size nodes by path score, closed under ancestors, parents before children."""
        if self.cfg.speculate == "chain":
            return nodes
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth, i))
        keep: dict = {}
        for i in order:
            if len(keep) == self.cfg.tree_size:
                break
            if nodes[i].parent < 0 or nodes[i].parent in keep:
                keep[i] = True
        chosen = sorted(keep, key=lambda i: (nodes[i].depth, i))
        remap = {old: new for new, old in enumerate(chosen)}
        return [Node(nodes[i].token, remap.get(nodes[i].parent, -1), nodes[i].depth, nodes[i].score,
                     nodes[i].state, nodes[i].q, nodes[i].allowed) for i in chosen]


def unknown_chains(roots: list, K: int) -> list:
    """Each live row's chain of K draft tokens, not yet known (a queued chain call computes them)."""
    return [[Node(PAD, i - 1, i + 1, 0.0, None) for i in range(K)] if not r.state.done else [] for r in roots]


class FusedChain(NoDraft):
    """Greedy chain rounds in one draft call each (the draft_chain graph): the pending catch-up pairs, then K
    tokens, each the draft's argmax over what the list grammar allows. The call is queued; the verify pass
    takes its tokens on the device and the host reads them back with the target's outputs."""

    def __init__(self, draft, constraint, clock: Clock):
        self.draft, self.constraint, self.clock = draft, constraint, clock

    def after_prefill(self, roots, feats, tokens) -> None:
        slots = prompt_slots(tokens, self.constraint.catalogue.layout)
        for r, f, t, sl in zip(roots, feats, tokens, slots):  # the first chain call catches up on the whole prompt
            r.pending = (f, t, sl, 0)

    def after_accept(self, roots, verdicts, starts) -> None:
        pairs = committed_pairs(roots, verdicts, self.constraint.catalogue.layout)
        for r, f, t, sl, s in zip(roots, *pairs, starts):
            r.pending = (f, t, sl, s) if not r.state.done else None

    def propose(self, roots) -> Proposal:
        feeds, mask, lens = chain_feeds(roots, self.constraint, self.draft.chain_steps)
        t = time.perf_counter()
        self.draft.discard()
        call = self.draft.launch(feeds, mask, graph="draft_chain")
        self.clock.draft += time.perf_counter() - t
        self.draft.commit([np.arange(n) for n in lens])
        for r in roots:
            r.pending = None
        return Proposal(unknown_chains(roots, self.draft.chain_steps), call)


class DeviceChain(FusedChain):
    """Fused chain rounds that go from one to the next without the host: each round's next chain is queued
    on the device behind its verify pass (`DeviceRounds`), the first one behind the prefill."""

    def __init__(self, draft, constraint, clock: Clock):
        super().__init__(draft, constraint, clock)
        self.rounds = DeviceRounds(constraint)
        self.queued = None  # the next round's chain, already queued on the device

    def behind_prefill(self, call, prompts, states) -> None:
        lens = [len(p) for p in prompts]
        H = call.device("hidden").shape[-1]
        layout = self.constraint.catalogue.layout
        tokens = [np.append(p[1:], PAD) for p in prompts]  # the last token and its slot: picked on the device
        feeds, mask, _ = catch_up_feeds([np.zeros((n, H), np.float32) for n in lens], tokens,
                                        prompt_slots(tokens, layout), [0] * len(prompts), layout)
        del feeds["step"]
        feeds["last"] = np.asarray(lens, np.int32) - 1
        self.queued = self.rounds.queue_first(self.draft, call, feeds, mask, lens, states, self.clock)

    def after_prefill(self, roots, feats, tokens) -> None:
        if self.queued is None:  # the prompt was past the largest bucket: the first chain starts from the host
            super().after_prefill(roots, feats, tokens)

    def propose(self, roots) -> Proposal:
        if self.queued is None:
            return super().propose(roots)
        proposal, self.queued = Proposal(unknown_chains(roots, self.draft.chain_steps), self.queued), None
        return proposal

    def while_verifying(self, call, roots, proposal, masks) -> None:
        self.queued = self.rounds.queue(self.draft, call, roots, proposal.trees, masks, self.clock)

    def after_accept(self, roots, verdicts, starts) -> None:
        if self.queued is None:
            return super().after_accept(roots, verdicts, starts)
        # the queued chain has this round's features already, on the device: keep its catch-up entries
        self.draft.commit([np.arange(len(v.path)) if v.tokens and not v.state.done else [] for v in verdicts])
