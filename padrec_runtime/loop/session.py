"""The draft-verify loop: prefill, propose (chain or dynamic tree), verify, accept; AR is the loop with no draft.

Backend-neutral: the target and draft are KVRunners over any engine (PyTorch reference, ONNX Runtime,
TensorRT). Every choice is constrained by the list grammar, for draft and target alike, so greedy
speculative output equals greedy constrained target decoding token for token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import BackendError, InputError
from ..cache.host import KVRunner, take_on_host
from ..grammar import PAD, ConstraintState, ListConstraint
from ..cache.rounds import DeviceRounds
from .sampling import SamplingConfig, allowed_logits, choose, distribution, log_softmax

SPECULATE_MODES = ("off", "chain", "tree")


@dataclass(frozen=True)
class DecodeConfig:
    """How lists are decoded."""

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
    pending: tuple | None = None  # fused chain: (features, tokens, start) the draft has not seen yet


@dataclass
class Verdict:
    """Outcome of verifying one row's proposal."""

    path: list  # verify-order indices accepted, root (0) first
    tokens: list  # committed tokens: accepted draft tokens then the bonus token, if any
    state: ConstraintState  # constraint state after the committed tokens
    features: np.ndarray | None = None  # (len(path), H) target hidden states along the path, for the draft


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
class _Clock:
    # seconds in engine calls; a fused chain round queues the draft chain and waits for it together with the
    # verify pass, so there draft counts the queueing and verify the wait for both
    draft: float = 0.0  # seconds in draft engine calls
    verify: float = 0.0  # seconds in target engine calls


def _pad(rows: list, fill, dtype) -> np.ndarray:
    T = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), T) + np.shape(fill), fill, dtype=dtype)
    for b, r in enumerate(rows):
        if len(r):
            out[b, :len(r)] = r
    return out


def _self_mask(B: int, T: int, scratch: int) -> np.ndarray:
    """Each token sees only itself: the mask of padding tokens."""
    m = np.zeros((B, T, scratch + T), dtype=bool)
    m[:, np.arange(T), scratch + np.arange(T)] = True
    return m


class DecodeSession:
    """A batch being decoded, one round per `step()`: for services that stream lists as they grow."""

    def __init__(self, target: KVRunner, draft: KVRunner | None, prompts: list, histories: list,
                 constraint: ListConstraint, cfg: DecodeConfig):
        if cfg.speculate != "off" and draft is None:
            raise InputError(f"speculate={cfg.speculate}: no draft engine loaded | use speculate='off' or load a draft")
        self.t0 = time.perf_counter()
        self.target, self.draft = target, draft if cfg.speculate != "off" else None
        self.constraint, self.cfg = constraint, cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.clock = _Clock()
        self.fused = fused_chain(self.draft, cfg)
        self.device = DeviceRounds(constraint) if self.fused and device_rounds(target, self.draft, cfg) else None
        # the next round's draft chain, already queued on the device (with device rounds: from the prefill on)
        self.roots, self.queued = prefill(target, self.draft, prompts, histories, constraint, cfg, self.rng,
                                          self.clock, self.fused, self.device)
        self.out = Generation(tokens=[[r.token] for r in self.roots], committed=[[] for _ in self.roots])

    @property
    def done(self) -> bool:
        return all(r.state.done for r in self.roots)

    def step(self) -> list:
        """Run one round; returns the tokens each row committed in it."""
        before = [len(t) for t in self.out.tokens]
        chain = None
        if self.queued is not None:  # queued on the device by the last round
            trees, chain = _chains(self.roots, self.draft.chain_steps), self.queued
        elif self.fused:
            trees, chain = propose_fused(self.draft, self.roots, self.constraint, self.clock)
        elif self.draft is not None:
            trees = propose(self.draft, self.roots, self.constraint, self.cfg, self.rng, self.clock)
        else:
            trees = [[] for _ in self.roots]
        self.queued = None
        meanwhile = None
        if self.device is not None:
            def meanwhile(call, masks):
                self.queued = self.device.queue(self.draft, call, self.roots, trees, masks, self.clock)
        verdicts = verify(self.target, self.roots, trees, self.constraint, self.cfg, self.rng, self.clock, chain,
                          meanwhile)
        accept(self.target, self.draft, self.roots, verdicts, self.constraint, self.out, self.clock, self.fused,
               queued=self.queued is not None)
        self.out.rounds += 1
        return [t[n:] for t, n in zip(self.out.tokens, before)]

    def result(self) -> Generation:
        self.out.time_draft_s, self.out.time_verify_s = self.clock.draft, self.clock.verify
        self.out.time_total_s = time.perf_counter() - self.t0
        return self.out


def generate(target: KVRunner, draft: KVRunner | None, prompts: list, histories: list,
             constraint: ListConstraint, cfg: DecodeConfig) -> Generation:
    """Decode one list per prompt. Returns the output tokens and per-round acceptance."""
    session = DecodeSession(target, draft, prompts, histories, constraint, cfg)
    while not session.done:
        session.step()
    return session.result()


def fused_chain(draft, cfg: DecodeConfig) -> bool:
    """Whether rounds use the fused draft-chain graph: greedy chain speculation with the K it was exported for."""
    return (cfg.fused_chain and draft is not None and cfg.speculate == "chain" and cfg.sampling.greedy
            and getattr(draft, "chain_steps", 0) == cfg.draft_steps)


def device_rounds(target, draft, cfg: DecodeConfig) -> bool:
    """Whether rounds queue their successor's draft chain on the device: asked for, and both caches bound to
    the device with static buckets (the chain's inputs are written into its bound input buffers there)."""
    return (cfg.device_rounds and getattr(draft, "static", False) and hasattr(target, "launch")
            and hasattr(draft, "xp"))


def max_cache_len(prompt_len: int, constraint: ListConstraint, cfg: DecodeConfig) -> int:
    """KV positions a row can need: prompt, the list, and one round of speculation on top."""
    K = cfg.draft_steps
    width = cfg.tree_topk if cfg.speculate == "tree" else 1
    verify = 1 + (cfg.tree_size if cfg.speculate == "tree" else K)  # target scratch: root + draft tokens
    drafting = K + 1 + (K - 1) * width  # draft scratch: catch-up pairs, then one level per step
    spec = 1 if cfg.speculate == "off" else max(verify, drafting)
    return prompt_len + constraint.list_length() + spec + 1


def prefill(target, draft, prompts, histories, constraint, cfg, rng, clock, fused: bool = False,
            device: DeviceRounds | None = None) -> tuple:
    """Run the prompts through the target (and the draft), choose each row's first token. Returns the rows'
    roots and the first round's chain where `device` queued it right behind the prefill (else None)."""
    B = len(prompts)
    lens = [len(p) for p in prompts]
    ids = _pad(prompts, PAD, np.int32)
    T = ids.shape[1]
    mask = np.tril(np.ones((T, T), dtype=bool))[None].repeat(B, 0)
    for b, n in enumerate(lens):
        mask[b, n:] = np.eye(T, dtype=bool)[n:]
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    states = [constraint.start(h) for h in histories]
    t = time.perf_counter()
    call = _launch(target, {"input_ids": ids, "position_ids": pos}, mask)
    queued = None
    if device is not None:  # the first chain's catch-up: the prompt, then the token the device picks
        before = clock.draft
        H = call.device("hidden").shape[-1]
        feeds, chain_mask, _ = _catch_up_feeds([np.zeros((n, H), np.float32) for n in lens],
                                               [np.append(p[1:], PAD) for p in prompts], [0] * B, constraint)
        del feeds["step"]
        feeds["last"] = np.asarray(lens, np.int32) - 1
        queued = device.queue_first(draft, call, feeds, chain_mask, lens, states, clock)
        t += clock.draft - before  # the queueing counts as draft time
    out = call.result()
    clock.verify += time.perf_counter() - t
    target.commit([np.arange(n) for n in lens])
    roots = []
    for b, n in enumerate(lens):
        allowed = constraint.allowed(states[b])
        x = allowed_logits(out["logits"][b, n - 1], allowed, "target")
        token = int(allowed[choose(x, cfg.sampling, rng)])
        roots.append(Root(token, n, constraint.advance(states[b], token)))
    if draft is not None and queued is None:
        feats = [out["hidden"][b, :n] for b, n in enumerate(lens)]
        tokens = [np.append(prompts[b][1:], roots[b].token) for b in range(B)]
        if fused:  # the first round's chain call catches up on the whole prompt: no draft call of its own
            for b in range(B):
                roots[b].pending = (feats[b], tokens[b], 0)
        else:
            _draft_catch_up(draft, roots, feats, tokens, [0] * B, constraint, clock)
    return roots, queued


def _catch_up_feeds(feats, tokens, starts, constraint) -> tuple[dict, np.ndarray, list]:
    """Draft feeds (step 0) and mask for (target feature, next token) pairs of newly committed positions."""
    B = len(tokens)
    lens = [len(t) for t in tokens]
    T = max(1, max(lens))
    H = feats[0].shape[-1]
    ids = np.full((B, T), PAD, np.int32)
    hid = np.zeros((B, T, H), dtype=np.float32)
    pos = np.zeros((B, T), dtype=np.int32)
    mask = np.repeat(np.eye(T, dtype=bool)[None], B, axis=0)  # padding tokens see only themselves
    causal = np.tri(T, dtype=bool)
    for b, n in enumerate(lens):
        if n:
            ids[b, :n] = tokens[b]
            hid[b, :n] = feats[b]
            pos[b, :n] = np.arange(starts[b], starts[b] + n)
            mask[b, :n, :n] = causal[:n, :n]
    feeds = {"hidden_in": hid, "input_ids": ids, "position_ids": pos, "step": np.zeros((B, T), np.int32),
             "slot": constraint.catalogue.layout.slots(ids)}
    return feeds, mask, lens


def _draft_catch_up(draft, roots, feats, tokens, starts, constraint, clock) -> None:
    """Feed the draft (target feature, next token) pairs of newly committed positions at step 0."""
    feeds, mask, lens = _catch_up_feeds(feats, tokens, starts, constraint)
    t = time.perf_counter()
    draft.discard()
    out = draft.forward(feeds, mask)
    clock.draft += time.perf_counter() - t
    draft.commit([np.arange(n) for n in lens])
    for b, n in enumerate(lens):
        if n:
            roots[b].draft_logits = out["logits"][b, n - 1]
            roots[b].draft_hidden = out["hidden"][b, n - 1]


def _add_children(nodes, parent, logits, state, score, depth, constraint, cfg, rng) -> None:
    allowed = constraint.allowed(state)
    if len(allowed) == 0:
        return
    x = allowed_logits(logits, allowed, "draft")
    logq = log_softmax(x)
    if cfg.speculate == "chain" and not cfg.sampling.greedy:
        q = distribution(x, cfg.sampling)
        k = int(rng.choice(len(x), p=q))
        nodes.append(Node(int(allowed[k]), parent, depth, score + logq[k],
                          constraint.advance(state, allowed[k]), q=q, allowed=allowed))
        return
    width = 1 if cfg.speculate == "chain" else cfg.tree_topk
    for k in np.argsort(-x, kind="stable")[:width]:
        nodes.append(Node(int(allowed[k]), parent, depth, score + logq[k], constraint.advance(state, allowed[k])))


def propose(draft, roots, constraint, cfg, rng, clock) -> list:
    """Draft up to K tokens deep per row; returns each row's selected nodes, parents before children."""
    B = len(roots)
    nodes = [[] for _ in range(B)]
    for b, r in enumerate(roots):
        if not r.state.done:
            _add_children(nodes[b], -1, r.draft_logits, r.state, 0.0, 1, constraint, cfg, rng)
    layout = constraint.catalogue.layout
    for depth in range(1, cfg.draft_steps):
        expand = []
        for b in range(B):
            level = [i for i, n in enumerate(nodes[b]) if n.depth == depth and not n.state.done]
            level.sort(key=lambda i: -nodes[b][i].score)
            expand.append(level[:1 if cfg.speculate == "chain" else cfg.tree_topk])
        if not any(expand):
            break
        T = max(len(e) for e in expand)
        scratch = draft.scratch
        H = next(r.draft_hidden.shape[-1] for r in roots if r.draft_hidden is not None)
        hid = np.zeros((B, T, H), np.float32)
        ids = np.full((B, T), PAD, np.int32)
        pos = np.zeros((B, T), np.int32)
        mask = _self_mask(B, T, scratch)
        for b, e in enumerate(expand):
            for t, i in enumerate(e):
                n = nodes[b][i]
                hid[b, t] = roots[b].draft_hidden if n.parent < 0 else nodes[b][n.parent].hidden
                ids[b, t] = n.token
                pos[b, t] = roots[b].position + depth - 1
                a = n.parent
                while a >= 0:
                    mask[b, t, nodes[b][a].scratch] = True
                    a = nodes[b][a].parent
                n.scratch = scratch + t
        t0 = time.perf_counter()
        out = draft.forward({"hidden_in": hid, "input_ids": ids, "position_ids": pos,
                             "step": np.full((B, T), depth, np.int32), "slot": layout.slots(ids)}, mask)
        clock.draft += time.perf_counter() - t0
        for b, e in enumerate(expand):
            for t, i in enumerate(e):
                n = nodes[b][i]
                n.hidden = out["hidden"][b, t]
                _add_children(nodes[b], i, out["logits"][b, t], n.state, n.score, depth + 1, constraint, cfg, rng)
    return [_select(row, cfg) for row in nodes]


class _Done:
    """The result of an engine call that has run already (runners without `launch`)."""

    def __init__(self, out: dict):
        self.out = out

    def result(self) -> dict:
        return self.out


def _launch(runner, feeds: dict, mask: np.ndarray, graph: str | None = None, take: dict | None = None):
    """Queue an engine call where the runner can (device caches: `launch`), else run it now; either way the
    returned object's `result()` gives the outputs. take: see BoundKVRunner.launch."""
    if hasattr(runner, "launch"):
        return runner.launch(feeds, mask, graph, take)
    feeds = take_on_host(feeds, take)
    return _Done(runner.forward(feeds, mask, graph=graph) if graph else runner.forward(feeds, mask))


def propose_fused(draft, roots, constraint, clock) -> tuple:
    """A greedy chain round's draft in one engine call (the draft_chain graph): the pending catch-up pairs,
    then K draft tokens, each the draft's argmax over what the list grammar allows. Returns each row's chain,
    its tokens not yet known, and the queued call that computes them: `verify` hands them to the target on
    the device and reads them back with its own outputs, so a round waits for the device once."""
    H = next(r.pending[0].shape[-1] for r in roots if r.pending is not None)
    idle = (np.zeros((0, H), np.float32), np.zeros(0, np.int32), 0)  # a finished row: nothing to catch up
    feats, tokens, starts = zip(*[r.pending if r.pending is not None else idle for r in roots])
    feeds, mask, lens = _catch_up_feeds(feats, tokens, starts, constraint)
    del feeds["step"]
    feeds["last"] = np.maximum(np.asarray(lens) - 1, 0).astype(np.int32)
    cat = constraint.catalogue
    feeds["node"] = np.array([cat.chain_row(r.state) for r in roots], dtype=np.int32)
    feeds["left"] = np.array([constraint.n_items - r.state.n_done for r in roots], dtype=np.int32)
    feeds["banned"] = np.stack([constraint.chain_ban(r.state) for r in roots])
    t = time.perf_counter()
    draft.discard()
    call = _launch(draft, feeds, mask, graph="draft_chain")
    clock.draft += time.perf_counter() - t
    draft.commit([np.arange(n) for n in lens])
    for r in roots:
        r.pending = None
    return _chains(roots, draft.chain_steps), call


def _chains(roots, K: int) -> list:
    """Each live row's chain of K draft tokens, not yet known (the queued chain call computes them)."""
    return [[Node(PAD, i - 1, i + 1, 0.0, None) for i in range(K)] if not r.state.done else [] for r in roots]


def _select(nodes: list, cfg: DecodeConfig) -> list:
    """Best tree_size nodes by path score, closed under ancestors, parents before children."""
    if cfg.speculate == "chain":
        return nodes
    order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth, i))
    keep: dict = {}
    for i in order:
        if len(keep) == cfg.tree_size:
            break
        if nodes[i].parent < 0 or nodes[i].parent in keep:
            keep[i] = True
    chosen = sorted(keep, key=lambda i: (nodes[i].depth, i))
    remap = {old: new for new, old in enumerate(chosen)}
    return [Node(nodes[i].token, remap.get(nodes[i].parent, -1), nodes[i].depth, nodes[i].score,
                 nodes[i].state, nodes[i].q, nodes[i].allowed) for i in chosen]


def verify(target, roots, trees, constraint, cfg, rng, clock, chain=None, meanwhile=None) -> list:
    """One target pass over root + draft tokens per row (ancestor mask), then walk the accepted path.
    chain: the queued draft-chain call whose tokens the trees (chains) carry, from `propose_fused`;
    meanwhile(verify call, grammar masks): run once the chain's tokens are in, before the verify pass is read."""
    B = len(roots)
    T = 1 + max(len(t) for t in trees)
    ids = np.full((B, T), PAD, np.int32)
    pos = np.zeros((B, T), np.int32)
    mask = _self_mask(B, T, 0)
    causal = np.tri(T, dtype=bool)
    for b, (r, tree) in enumerate(zip(roots, trees)):
        if r.state.done:
            continue
        ids[b, 0], pos[b, 0] = r.token, r.position
        if cfg.speculate == "chain":  # each node's parent is the one before it: a causal mask
            n = len(tree) + 1
            ids[b, 1:n] = [node.token for node in tree]
            pos[b, :n] = np.arange(r.position, r.position + n)
            mask[b, :n, :n] = causal[:n, :n]
            continue
        for t, node in enumerate(tree, start=1):
            ids[b, t], pos[b, t] = node.token, r.position + node.depth
            mask[b, t, 0] = True
            a = node.parent
            while a >= 0:
                mask[b, t, a + 1] = True
                a = tree[a].parent
    t0 = time.perf_counter()
    take = {"input_ids": (chain, "tokens", 1)} if chain is not None else None
    call = _launch(target, {"input_ids": ids, "position_ids": pos}, mask, take=take)
    masks = None
    if chain is not None:  # the chain's tokens arrive while the verify pass still runs: walk the grammar along
        V = constraint.catalogue.layout.vocab_size  # them meanwhile
        masks = [_chain_states(r, tree, row, constraint, V) if not r.state.done else None
                 for r, tree, row in zip(roots, trees, chain.result()["tokens"])]
        if meanwhile is not None:
            meanwhile(call, masks)
    out = call.result()
    clock.verify += time.perf_counter() - t0
    picks = None
    if masks is not None:  # the target's constrained choice at every position of every row, in one pass
        live = [b for b, m in enumerate(masks) if m is not None]
        picks = [None] * B
        if live:
            T1 = masks[live[0]].shape[0]
            for b, p in zip(live, _masked_picks(out["logits"][live, :T1], np.stack([masks[b] for b in live]))):
                picks[b] = p
    verdicts = []
    for b, (r, tree) in enumerate(zip(roots, trees)):
        if r.state.done:
            verdicts.append(Verdict([], [], r.state))
            continue
        logits = out["logits"][b]
        if cfg.speculate == "chain" and not cfg.sampling.greedy:
            v = _accept_chain_sampled(logits, r, tree, constraint, cfg, rng)
        elif masks is not None:
            v = _walk_chain(logits, r, tree, masks[b], constraint, picks[b])
        else:
            v = _walk(logits, r, tree, constraint, cfg, rng)
        v.features = out["hidden"][b, v.path]
        verdicts.append(v)
    return verdicts


def _chain_states(root, chain, tokens, constraint, V: int) -> np.ndarray:
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


def _masked_picks(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Argmax over the last axis among what `mask` allows; the first maximum wins ties (the lowest token id, as
    argmax over the sorted allowed ids in `_walk`). Non-finite allowed logits are an engine failure, as in
    `allowed_logits`."""
    if not np.all(np.isfinite(logits[mask])):
        raise BackendError("target: non-finite logits (NaN/inf) | the engine overflowed; rebuild in fp32 or bf16, "
                           "or check the engine files")
    return np.where(mask, logits, -np.inf).argmax(axis=-1)


def _walk_chain(logits, root, chain, mask, constraint, picks=None) -> Verdict:
    """`_walk` for a greedy fused chain whose grammar masks `_chain_states` built: the target's constrained
    argmax at every position at once (`picks`, when the caller has them for every row), accepted up to the
    first position where it differs from the draft."""
    if picks is None:
        picks = _masked_picks(logits[:len(chain) + 1], mask[:len(chain) + 1])
    path, tokens, state = [0], [], root.state
    for i, node in enumerate(chain):
        if state.done:
            return Verdict(path, tokens, state)
        token = int(picks[i])
        tokens.append(token)
        if token != node.token:  # the bonus token
            return Verdict(path, tokens, constraint.advance(state, token))
        state = node.state
        path.append(i + 1)
    if state.done:
        return Verdict(path, tokens, state)
    token = int(picks[len(chain)])
    tokens.append(token)
    return Verdict(path, tokens, constraint.advance(state, token))


def _walk(logits, root, tree, constraint, cfg, rng) -> Verdict:
    """Follow the target's own choice down the tree: lossless for greedy and for deterministic drafts.

    At each node the target picks (argmax or a sample of its distribution); if a child carries that
    token the path goes on, otherwise the pick is the bonus token. The output is exactly what the target
    alone would have written.
    """
    children: dict = {}
    for i, n in enumerate(tree):
        children.setdefault(n.parent, {})[n.token] = i
    path, tokens, cur, state = [0], [], -1, root.state
    while not state.done:
        allowed = constraint.allowed(state)
        x = allowed_logits(logits[cur + 1], allowed, "target")
        token = int(allowed[choose(x, cfg.sampling, rng)])
        nxt = children.get(cur, {}).get(token)
        tokens.append(token)
        if nxt is None:
            return Verdict(path, tokens, constraint.advance(state, token))
        cur, state = nxt, tree[nxt].state if tree[nxt].state is not None else constraint.advance(state, token)
        path.append(cur + 1)
    return Verdict(path, tokens, state)


def _accept_chain_sampled(logits, root, chain, constraint, cfg, rng) -> Verdict:
    """Speculative sampling (Leviathan et al.): accept x with min(1, p/q), else resample max(0, p-q)."""
    path, tokens, state = [0], [], root.state
    for i, n in enumerate(chain):
        p = distribution(allowed_logits(logits[i], n.allowed, "target"), cfg.sampling)
        k = int(np.searchsorted(n.allowed, n.token))
        if rng.random() < min(1.0, p[k] / n.q[k]):
            path.append(i + 1)
            tokens.append(n.token)
            state = n.state
            continue
        residual = np.maximum(p - n.q, 0.0)
        k = int(rng.choice(len(p), p=residual / residual.sum()))
        tokens.append(int(n.allowed[k]))
        return Verdict(path, tokens, constraint.advance(state, n.allowed[k]))
    if state.done:
        return Verdict(path, tokens, state)
    allowed = constraint.allowed(state)
    k = choose(allowed_logits(logits[len(chain)], allowed, "target"), cfg.sampling, rng)
    tokens.append(int(allowed[k]))
    return Verdict(path, tokens, constraint.advance(state, allowed[k]))


def accept(target, draft, roots, verdicts, constraint, out, clock, fused: bool = False, queued: bool = False) -> None:
    """Keep the accepted path's KV, record the committed tokens, feed the draft the real features (with the
    fused chain: hand them to the next round's chain call; queued: that call already runs on the device,
    its catch-up over this round's committed positions is kept)."""
    target.commit([v.path for v in verdicts])
    if queued:
        draft.commit([np.arange(len(v.path)) if v.tokens and not v.state.done else [] for v in verdicts])
    starts = []
    for b, (r, v) in enumerate(zip(roots, verdicts)):
        if not r.state.done:
            out.tokens[b].extend(v.tokens)
            out.committed[b].append(len(v.tokens))
            starts.append(r.position)
            r.position += len(v.path)
            r.token, r.state = v.tokens[-1], v.state
        else:
            starts.append(0)
    if queued:  # the next chain already has these features, on the device
        return
    H = next(v.features.shape[-1] for v in verdicts if v.features is not None)
    live = [not r.state.done for r in roots]
    feats = [v.features if ok else np.zeros((0, H), np.float32) for v, ok in zip(verdicts, live)]
    tokens = [np.asarray(v.tokens if ok else [], np.int32) for v, ok in zip(verdicts, live)]
    if fused:
        for r, f, t, s in zip(roots, feats, tokens, starts):
            r.pending = (f, t, s) if not r.state.done else None
    elif draft is not None and any(not r.state.done for r in roots):
        _draft_catch_up(draft, roots, feats, tokens, starts, constraint, clock)
