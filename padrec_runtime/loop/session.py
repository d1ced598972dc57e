"""The draft-verify loop: prefill, then rounds of propose -> verify -> accept -> commit; AR is the loop with no draft.

Backend-neutral: the target and draft are KV caches (`padrec_runtime.cache.KVCache`) over any engine (ONNX
Runtime, TensorRT, the PyTorch reference). Every choice is constrained by the list grammar, for draft and
target alike, so greedy speculative output equals greedy constrained target decoding token for token.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import BackendError, InputError
from ..grammar import ListConstraint
from .accept import Acceptor, ChainPicks, ChainSampler, TargetWalk, batch_picks, chain_states
from .feeds import prefill_feeds, verify_feeds
from .propose import DeviceChain, FusedChain, NoDraft, Proposer, StepDraft
from .sampling import allowed_logits, choose
from .state import Clock, DecodeConfig, Generation, Proposal, Root, Scored, Verdict

__all__ = ["DecodeConfig", "DecodeSession", "Generation", "generate", "max_cache_len", "pick_parts"]


def pick_parts(target, draft, constraint, cfg: DecodeConfig, rng, clock: Clock) -> tuple[Proposer, Acceptor]:
    """The proposer and acceptor for a request, chosen once from its config and the caches' capabilities."""
    if cfg.speculate == "off":
        return NoDraft(), TargetWalk(constraint, cfg.sampling, rng)
    if draft is None:
        raise InputError(f"speculate={cfg.speculate}: no draft engine loaded | use speculate='off' or load a draft")
    if cfg.speculate == "chain" and cfg.sampling.greedy and cfg.fused_chain and draft.chain_steps == cfg.draft_steps:
        queued = cfg.device_rounds and draft.queues_on_device and target.queues_on_device
        return (DeviceChain if queued else FusedChain)(draft, constraint, clock), ChainPicks(constraint)
    sampled_chain = cfg.speculate == "chain" and not cfg.sampling.greedy
    acceptor = ChainSampler if sampled_chain else TargetWalk
    return StepDraft(draft, constraint, cfg, rng, clock), acceptor(constraint, cfg.sampling, rng)


class DecodeSession:
    """A batch being decoded, one round per `step()`: for services that stream lists as they grow."""

    def __init__(self, target, draft, prompts: list, histories: list, constraint: ListConstraint,
                 cfg: DecodeConfig):
        self.t0 = time.perf_counter()
        self.target, self.constraint, self.cfg = target, constraint, cfg
        self.draft = draft if cfg.speculate != "off" else None
        self.rng = np.random.default_rng(cfg.seed)
        self.clock = Clock()
        self.proposer, self.acceptor = pick_parts(target, self.draft, constraint, cfg, self.rng, self.clock)
        self.roots = self._prefill(prompts, histories)
        self.out = Generation(tokens=[[r.token] for r in self.roots], committed=[[] for _ in self.roots])

    @property
    def done(self) -> bool:
        return all(r.state.done for r in self.roots)

    def step(self) -> list:
        """Run one round; returns the tokens each row committed in it."""
        before = [len(t) for t in self.out.tokens]
        proposal = self.proposer.propose(self.roots)
        scored = self._verify(proposal)
        verdicts = [Verdict([], [], r.state) if r.state.done else self._accept(scored, b, r, tree)
                    for b, (r, tree) in enumerate(zip(self.roots, proposal.trees))]
        self._commit(verdicts)
        self.out.rounds += 1
        return [t[n:] for t, n in zip(self.out.tokens, before)]

    def result(self) -> Generation:
        self.out.time_draft_s, self.out.time_verify_s = self.clock.draft, self.clock.verify
        self.out.time_total_s = time.perf_counter() - self.t0
        return self.out

    def _prefill(self, prompts: list, histories: list) -> list:
        """Run the prompts through the target, choose each row's first token, let the draft catch up."""
        lens = [len(p) for p in prompts]
        feeds, mask = prefill_feeds(prompts)
        states = [self.constraint.start(h) for h in histories]
        t, drafted = time.perf_counter(), self.clock.draft
        call = self.target.launch(feeds, mask)
        self.proposer.behind_prefill(call, prompts, states)
        out = call.result()
        self.clock.verify += time.perf_counter() - t - (self.clock.draft - drafted)  # queueing counts as draft
        self.target.commit([np.arange(n) for n in lens])
        roots = []
        for b, n in enumerate(lens):
            allowed = self.constraint.allowed(states[b])
            x = allowed_logits(out["logits"][b, n - 1], allowed, "target")
            token = int(allowed[choose(x, self.cfg.sampling, self.rng)])
            roots.append(Root(token, n, self.constraint.advance(states[b], token)))
        feats = [out["hidden"][b, :n] for b, n in enumerate(lens)]
        self.proposer.after_prefill(roots, feats, [np.append(p[1:], r.token) for p, r in zip(prompts, roots)])
        return roots

    def _verify(self, proposal: Proposal) -> Scored:
        """One target pass over root + draft tokens per row (ancestor mask). A fused chain's tokens go from its
        queued call to the verify pass on the device; the host reads them while the pass runs and builds the
        grammar masks the walk needs meanwhile."""
        feeds, mask = verify_feeds(self.roots, proposal.trees, self.cfg.speculate == "chain")
        t0 = time.perf_counter()
        chain = proposal.chain
        call = self.target.launch(feeds, mask, take={"input_ids": (chain, "tokens", 1)} if chain else None)
        masks = None
        if chain is not None:
            V = self.constraint.catalogue.layout.vocab_size
            drafted = chain.result()
            if not all(ok for r, ok in zip(self.roots, drafted["finite"]) if not r.state.done):  # the graph's check
                raise BackendError("draft_chain: non-finite logits (NaN/inf) | the engine overflowed; rebuild in "
                                   "fp32 or bf16, or check the engine files")
            masks = [chain_states(r, tree, row, self.constraint, V) if not r.state.done else None
                     for r, tree, row in zip(self.roots, proposal.trees, drafted["tokens"])]
            self.proposer.while_verifying(call, self.roots, proposal, masks)
        out = call.result()
        self.clock.verify += time.perf_counter() - t0
        picks = batch_picks(out["logits"], masks) if masks is not None else None
        return Scored(out["logits"], out["hidden"], masks, picks)

    def _accept(self, scored: Scored, b: int, root: Root, tree: list) -> Verdict:
        v = self.acceptor.accept(scored, b, root, tree)
        v.features = scored.hidden[b, v.path]
        v.depth = root.state.depth
        return v

    def _commit(self, verdicts: list) -> None:
        """Keep the accepted paths' KV, record the committed tokens, advance the rows, feed the draft."""
        self.target.commit([v.path for v in verdicts])
        starts = []
        for b, (r, v) in enumerate(zip(self.roots, verdicts)):
            starts.append(r.position if not r.state.done else 0)
            if r.state.done:
                continue
            self.out.tokens[b].extend(v.tokens)
            self.out.committed[b].append(len(v.tokens))
            r.position += len(v.path)
            r.token, r.state = v.tokens[-1], v.state
        self.proposer.after_accept(self.roots, verdicts, starts)


def generate(target, draft, prompts: list, histories: list, constraint: ListConstraint,
             cfg: DecodeConfig) -> Generation:
    """Decode one list per prompt. Returns the output tokens and per-round acceptance."""
    session = DecodeSession(target, draft, prompts, histories, constraint, cfg)
    while not session.done:
        session.step()
    return session.result()


def max_cache_len(prompt_len: int, constraint: ListConstraint, cfg: DecodeConfig) -> int:
    """KV positions a row can need: prompt, the list, and one round of speculation on top."""
    K = cfg.draft_steps
    width = cfg.tree_topk if cfg.speculate == "tree" else 1
    verify = 1 + (cfg.tree_size if cfg.speculate == "tree" else K)  # target scratch: root + draft tokens
    drafting = K + 1 + (K - 1) * width  # draft scratch: catch-up pairs, then one level per step
    spec = 1 if cfg.speculate == "off" else max(verify, drafting)
    return prompt_len + constraint.list_length() + spec + 1
