"""Engine feeds the loop builds on the host: prefill, verify (chain or tree) and the draft's catch-up pairs."""
from __future__ import annotations

import numpy as np

from ..grammar import PAD


def pad_rows(rows: list, fill, dtype) -> np.ndarray:
    """(B, T) array of ragged rows, padded with `fill`."""
    T = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), T) + np.shape(fill), fill, dtype=dtype)
    for b, r in enumerate(rows):
        if len(r):
            out[b, :len(r)] = r
    return out


def self_mask(B: int, T: int, scratch: int) -> np.ndarray:
    """Each token sees only itself: the mask of padding tokens."""
    m = np.zeros((B, T, scratch + T), dtype=bool)
    m[:, np.arange(T), scratch + np.arange(T)] = True
    return m


def prefill_feeds(prompts: list) -> tuple[dict, np.ndarray]:
    """The target's prefill over ragged prompts: padding tokens see only themselves."""
    B, lens = len(prompts), [len(p) for p in prompts]
    ids = pad_rows(prompts, PAD, np.int32)
    T = ids.shape[1]
    mask = np.tril(np.ones((T, T), dtype=bool))[None].repeat(B, 0)
    for b, n in enumerate(lens):
        mask[b, n:] = np.eye(T, dtype=bool)[n:]
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    return {"input_ids": ids, "position_ids": pos}, mask


def verify_feeds(roots: list, trees: list, chain: bool) -> tuple[dict, np.ndarray]:
    """Root + draft tokens per row at their positions, each seeing its ancestors (a chain: causal)."""
    B, T = len(roots), 1 + max(len(t) for t in trees)
    ids = np.full((B, T), PAD, np.int32)
    pos = np.zeros((B, T), np.int32)
    mask = self_mask(B, T, 0)
    causal = np.tri(T, dtype=bool)
    for b, (r, tree) in enumerate(zip(roots, trees)):
        if r.state.done:
            continue
        ids[b, 0], pos[b, 0] = r.token, r.position
        if chain:  # each node's parent is the one before it
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
    return {"input_ids": ids, "position_ids": pos}, mask


def catch_up_feeds(feats, tokens, slots, starts, layout) -> tuple[dict, np.ndarray, list]:
    """Draft feeds (step 0) and mask for (target feature, next token) pairs of newly committed positions; slots:
    per row, each token's item slot (`prompt_slots`, `committed_pairs`)."""
    B = len(tokens)
    lens = [len(t) for t in tokens]
    T = max(1, max(lens))
    H = feats[0].shape[-1]
    ids = np.full((B, T), PAD, np.int32)
    slot = np.full((B, T), layout.sep_slot + 1, np.int32)  # padding: the slot of a special token
    hid = np.zeros((B, T, H), dtype=np.float32)
    pos = np.zeros((B, T), dtype=np.int32)
    mask = np.repeat(np.eye(T, dtype=bool)[None], B, axis=0)  # padding tokens see only themselves
    causal = np.tri(T, dtype=bool)
    for b, n in enumerate(lens):
        if n:
            ids[b, :n] = tokens[b]
            slot[b, :n] = slots[b]
            hid[b, :n] = feats[b]
            pos[b, :n] = np.arange(starts[b], starts[b] + n)
            mask[b, :n, :n] = causal[:n, :n]
    feeds = {"hidden_in": hid, "input_ids": ids, "position_ids": pos, "step": np.zeros((B, T), np.int32),
             "slot": slot}
    return feeds, mask, lens


def prompt_slots(tokens: list, layout) -> list:
    """Per row, the item slots of the tokens after `<bos>` (a prompt's tail and the tokens after it)."""
    return [layout.slots(np.asarray(t, np.int64)) for t in tokens]


def chain_feeds(roots: list, constraint, K: int) -> tuple[dict, np.ndarray, list]:
    """The draft_chain call of a round: each row's pending catch-up pairs, its last index, and the grammar
    inputs (trie row, items left, banned trie nodes) the graph needs to pick K tokens itself."""
    H = next(r.pending[0].shape[-1] for r in roots if r.pending is not None)
    idle = (np.zeros((0, H), np.float32), np.zeros(0, np.int32), np.zeros(0, np.int32), 0)  # a finished row
    feats, tokens, slots, starts = zip(*[r.pending if r.pending is not None else idle for r in roots])
    cat = constraint.catalogue
    feeds, mask, lens = catch_up_feeds(feats, tokens, slots, starts, cat.layout)
    del feeds["step"]
    feeds["last"] = np.maximum(np.asarray(lens) - 1, 0).astype(np.int32)
    feeds["node"] = np.array([cat.chain_row(r.state) for r in roots], dtype=np.int32)
    feeds["left"] = np.array([constraint.n_items - r.state.n_done for r in roots], dtype=np.int32)
    feeds["banned"] = np.stack([constraint.chain_ban(r.state) for r in roots])
    return feeds, mask, lens


def committed_pairs(roots: list, verdicts: list, layout) -> tuple[list, list, list]:
    """Per row, the target features along the accepted path, the tokens after them and their item slots (empty
    for finished rows): what the draft catches up on after a round."""
    H = next(v.features.shape[-1] for v in verdicts if v.features is not None)
    live = [not r.state.done for r in roots]
    feats = [v.features if ok else np.zeros((0, H), np.float32) for v, ok in zip(verdicts, live)]
    tokens = [np.asarray(v.tokens if ok else [], np.int32) for v, ok in zip(verdicts, live)]
    slots = [layout.slots(t, start=v.depth) for t, v in zip(tokens, verdicts)]
    return feats, tokens, slots
