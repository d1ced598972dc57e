"""Greedy fused-chain rounds queued on the device: each round's next draft chain runs behind its verify pass,
its inputs worked out there from tables the host builds while the verify pass runs."""
from __future__ import annotations

import time

import numpy as np

from .layout import ListConstraint


class DeviceRounds:
    """Greedy fused-chain rounds that go from one to the next without waiting for the host.

    While a round's verify pass runs, the host has the round's draft tokens and builds, for every verify
    position, what the list grammar allows there, plus the trie row, items left and `banned` row after each
    possible number of accepted tokens. `queue` sends those tables to the device and queues, behind the
    verify pass: the target's constrained picks (one masked argmax), the accepted count (the leading picks
    that equal the draft's tokens), the bonus token, and from them the next chain call's inputs (the verify
    pass's features, the picks as tokens, the trie row after the bonus, ...), then the next chain call. The
    host reads the verify pass and walks the same picks for the output (`_walk_chain`, same masks) while the
    next chain already runs. `banned` is the row of the state before the bonus token, updated on the device
    where the bonus token completes an item (`ListConstraint.completion_bans`). Not queued when a row might
    finish in the round (the call would only delay the next request)."""

    def __init__(self, constraint: ListConstraint):
        self.constraint = constraint

    def _device_tables(self, draft) -> dict:
        """The catalogue's chain tables on the draft's device, made once per runner (`BoundKVRunner.extras`)."""
        tables = draft.extras.get("chain_tables")
        if tables is None:
            cat = self.constraint.catalogue
            t = cat.chain_tables()
            leaf_row = len(t["next_node"]) - 1
            host = {"next_node": t["next_node"].astype(np.int64), "row_of": t["row_of"].astype(np.int64),
                    "is_leaf": (t["row_of"] == leaf_row).astype(np.int64),
                    "slot_of": cat.layout.slots(np.arange(cat.layout.vocab_size)).astype(np.int64)}
            with draft._guard, draft.stream:
                tables = draft.extras["chain_tables"] = {k: draft.xp.asarray(v) for k, v in host.items()}
        return tables

    def _may_end(self, root, chain) -> bool:
        """Whether the row's list can end in this round: eos due (or written) at a position the walk reaches."""
        L, n_items = self.constraint.catalogue.layout.levels, self.constraint.n_items
        for s in [root.state] + [n.state for n in chain]:
            if s is None:
                return False
            if s.done or (s.level == L and s.n_done == n_items):
                return True
        return False

    def queue(self, draft, call, roots, trees, masks, clock):
        """Queue the next round's chain behind `call` (the verify pass); returns its Pending, or None."""
        live = [m is not None for m in masks]
        if not any(live) or all(self._may_end(r, tree) for r, tree, ok in zip(roots, trees, live) if ok):
            return None
        t0 = time.perf_counter()
        con, cat = self.constraint, self.constraint.catalogue
        B, K = len(roots), draft.chain_steps
        T1, V = K + 1, cat.layout.vocab_size
        n_ban, L = len(cat.child_codes) + 2, cat.layout.levels
        staging = draft.extras.get(("rounds_staging", K))
        if staging is None:  # packed page-locked host and device buffers, made once per runner
            specs = {"mask": ((B, T1, V), np.bool_), "tokens": ((B, K), np.int64), "rows": ((B, T1), np.int64),
                     "left": ((B, T1), np.int64), "banned": ((B, T1, n_ban), np.float16),
                     "path": ((B, T1, L), np.int64), "ends": ((B, T1, L), np.bool_)}
            with draft._guard, draft.stream:
                staging = draft.extras[("rounds_staging", K)] = draft._packed(specs, host=True)
        blob, dev, hblob, host = staging
        for arr in host.values():
            arr[...] = 0
        for b, (r, tree, mask) in enumerate(zip(roots, trees, masks)):
            if mask is None:
                continue
            host["mask"][b] = mask
            host["tokens"][b] = [n.token for n in tree]
            for m, s in enumerate([r.state] + [n.state for n in tree]):
                if s is None:
                    break
                host["rows"][b, m] = cat.chain_row(s)
                host["left"][b, m] = con.n_items - s.n_done
                host["banned"][b, m] = con.chain_ban(s)
                if s.level == L - 1:  # the bonus token may complete an item
                    host["path"][b, m], host["ends"][b, m] = con.completion_bans(s)
                if s.done:
                    break
        tab = self._device_tables(draft)
        xp = draft.xp
        with draft._guard, draft.stream:
            if xp is not np:
                blob.set(hblob)
            logits, hidden = call.device("logits")[:, :T1], call.device("hidden")[:, :T1]
            picks = xp.where(dev["mask"], logits, -xp.inf).argmax(axis=2)  # first maximum, as `_walk_chain`
            accepted = xp.cumprod((picks[:, :K] == dev["tokens"]).astype(np.int64), axis=1).sum(axis=1)
            at = accepted[:, None]
            bonus = xp.take_along_axis(picks, at, axis=1)[:, 0]
            reached = tab["next_node"][xp.take_along_axis(dev["rows"], at, axis=1)[:, 0], bonus]
            rows = xp.arange(B)
            banned = dev["banned"][rows, accepted]  # the state's row, then what a completed item uses up
            done = tab["is_leaf"][reached].astype(bool)
            path, ends = dev["path"][rows, accepted], dev["ends"][rows, accepted] & done[:, None]
            banned[rows[:, None], path] = xp.where(ends, -xp.inf, banned[rows[:, None], path])
            banned[rows, reached] = xp.where(done, -xp.inf, banned[rows, reached])
            take = {"hidden_in": (hidden, None, 0), "input_ids": (picks, None, 0),
                    "slot": (tab["slot_of"][picks], None, 0), "last": (accepted, None, 0),
                    "node": (tab["row_of"][reached], None, 0),
                    "left": (xp.take_along_axis(dev["left"], at, axis=1)[:, 0] - tab["is_leaf"][reached], None, 0),
                    "banned": (banned, None, 0)}
        H = hidden.shape[-1]
        pos = np.zeros((B, T1), np.int32)
        mask = np.repeat(np.eye(T1, dtype=bool)[None], B, axis=0)  # finished rows: padding
        for b, r in enumerate(roots):
            if live[b]:
                pos[b] = np.arange(r.position, r.position + T1)
                mask[b] = np.tri(T1, dtype=bool)  # catch-up rows past the accepted ones are never used
        feeds = {"hidden_in": np.zeros((B, T1, H), np.float32), "input_ids": np.zeros((B, T1), np.int32),
                 "position_ids": pos, "slot": np.zeros((B, T1), np.int32), "last": np.zeros(B, np.int32),
                 "node": np.zeros(B, np.int32), "left": np.zeros(B, np.int32),
                 "banned": np.zeros((B, n_ban), np.float16)}
        draft.discard()
        queued = draft.launch(feeds, mask, graph="draft_chain", take=take)
        clock.draft += time.perf_counter() - t0
        return queued
