"""Real-shaped feeds for one graph, from its manifest alone (numpy): QA parity and Polygraphy's data loader.

Cases: prefill, chain verify and tree verify over a past KV with a ragged (padded) row; for a draft, every
step index (one past the trained ones, too) and every item slot; for the fused draft chain (no step input, a
per-row `last`, trie `node`, items `left` and `banned` items), the first three with rows ending at different tokens.
"""
from __future__ import annotations

import numpy as np

from padrec_runtime.backends.base import numpy_dtype


def tree_mask(parents: list) -> np.ndarray:
    """(T, T) ancestor-or-self mask of a tree given each node's parent index (-1: root)."""
    T = len(parents)
    m = np.zeros((T, T), dtype=bool)
    for i, p in enumerate(parents):
        m[i, i] = True
        while p >= 0:
            m[i, p] = True
            p = parents[p]
    return m


def graph_cases(spec: dict, is_draft: bool, vocab_size: int | None = None, n_slots: int | None = None,
                n_steps: int = 9, seed: int = 0, batch: int = 2, past: int = 13) -> list:
    """(case name, feeds) pairs for the graph described by a manifest's graphs.<name> entry."""
    rng = np.random.default_rng(seed)
    kv = spec["kv"]
    vocab = vocab_size or spec["outputs"]["logits"]["shape"][-1]
    chain = "last" in spec["inputs"]
    slots = n_slots or 6
    H = spec["hidden_size"]
    fdt = numpy_dtype(kv["dtype"])

    def feeds(T, P, mask_new, step=None, slot=None):
        f = {"input_ids": rng.integers(5, vocab, (batch, T)).astype(np.int32),
             "position_ids": (P + np.arange(T, dtype=np.int32))[None].repeat(batch, 0)}
        mask = np.ones((batch, T, P + T), dtype=bool)
        mask[:, :, P:] = mask_new
        if P > 2:
            mask[0, :, P - 2:P] = False  # row 0 is shorter: its last two past slots are padding
        f["attention_mask"] = mask
        for i in range(kv["n_layers"]):
            for part in ("key", "value"):
                shape = (batch, kv["n_kv_heads"], P, kv["head_dim"])
                f[kv[f"{part}_input"] % i] = rng.standard_normal(shape).astype(np.float32).astype(fdt)
        if is_draft:
            f["hidden_in"] = rng.standard_normal((batch, T, H)).astype(np.float32).astype(fdt)
            f["step"] = np.full((batch, T), 0 if step is None else step, np.int32)
            f["slot"] = rng.integers(0, slots, (batch, T)).astype(np.int32) if slot is None else \
                np.full((batch, T), slot, np.int32)
        if chain:
            del f["step"]
            f["last"] = np.maximum(T - 1 - np.arange(batch), 0).astype(np.int32)  # row b ends b tokens early
            f["node"] = np.zeros(batch, np.int32)  # at the trie's root: an item starts
            f["left"] = np.array([1, 3] * batch, np.int32)[:batch]
            f["banned"] = np.zeros((batch, spec["inputs"]["banned"]["shape"][-1]), np.float16)
            f["banned"][:, ::3] = -np.inf  # every third trie node is used up
            f["banned"][:, -2:] = (-np.inf, 0)  # not a child; back to the root
        return f

    causal = np.tril(np.ones((11, 11), dtype=bool))
    cases = [("prefill", feeds(11, 0, causal)),
             ("chain-verify", feeds(5, past, causal[:5, :5])),
             ("tree-verify", feeds(7, past, tree_mask([-1, 0, 0, 1, 1, 2, 3])))]
    if is_draft and not chain:
        cases += [(f"step-{k}", feeds(3, past, tree_mask([-1, -1, 0]), step=k)) for k in range(n_steps)]
        cases += [(f"slot-{s}", feeds(2, past, causal[:2, :2], step=1, slot=s)) for s in range(slots)]
    return cases
