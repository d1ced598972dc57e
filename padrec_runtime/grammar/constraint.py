"""The list grammar: catalogue prefixes, no item twice, n_items items then eos; one immutable state per row."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import InputError
from .catalogue import EOS, SEP, Catalogue


class ConstraintState(NamedTuple):
    """Where one row stands in its list; immutable so that tree paths can branch cheaply (a named tuple: the
    decode loop makes one per token and row)."""

    n_done: int  # items completed in the list
    depth: int  # tokens of the current item written so far (the item slot of the next item token)
    node: int  # trie node of the current item prefix (a leaf when a separator or eos is due)
    used: frozenset  # catalogue indices that may not be written again
    done: bool = False  # eos written


def _memo(cache: dict, key, make, cap: int = 100_000):
    """cache[key], made by make() on a miss; a cache past `cap` entries starts over."""
    hit = cache.get(key)
    if hit is None:
        if len(cache) > cap:
            cache.clear()
        hit = cache[key] = make()
    return hit


@dataclass
class ListConstraint:
    """The list grammar: catalogue prefixes, no item twice, n_items items then eos."""

    catalogue: Catalogue
    n_items: int = 10
    exclude_history: bool = True  # never recommend an item the user already has
    _cache: dict = field(default_factory=dict, repr=False)
    _bans: dict = field(default_factory=dict, repr=False)  # used items -> chain_ban row
    _completions: dict = field(default_factory=dict, repr=False)  # (node, used items) -> completion_bans
    _sets: dict = field(default_factory=dict, repr=False)  # (node, used items) -> allowed tokens as a set
    _counts: dict = field(default_factory=dict, repr=False)  # used items -> Catalogue.used_counts

    def start(self, history_ids) -> ConstraintState:
        used = frozenset(self.catalogue.index_of(history_ids).tolist()) if self.exclude_history else frozenset()
        free = len(self.catalogue) - len(used)
        if not 1 <= self.n_items <= free:
            raise InputError(f"n_items: got {self.n_items} | expected 1..{free} for this history and catalogue")
        return ConstraintState(n_done=0, depth=0, node=0, used=used)

    def allowed(self, state: ConstraintState) -> np.ndarray:
        """Token ids that may come next, sorted; empty once eos is written."""
        if state.done:
            return np.zeros(0, dtype=np.int64)
        cat = self.catalogue
        if cat.ends_item(state.node):
            return np.array([EOS if state.n_done == self.n_items else SEP], dtype=np.int64)
        def make():
            nodes = cat.child_nodes[state.node]
            free = cat.subtree_size[nodes] - self._used_counts(state.used)[nodes]
            return cat.child_tokens[state.node][free > 0]
        return _memo(self._cache, (state.node, state.used), make)

    def _used_counts(self, used: frozenset) -> np.ndarray:
        """Catalogue.used_counts, cached per set of used items (it changes only when an item completes)."""
        return _memo(self._counts, used, lambda: self.catalogue.used_counts(used), cap=4096)

    def allows(self, state: ConstraintState, token: int) -> bool:
        """Whether `token` may come next (`token in allowed(state)`, from a set cached with it)."""
        if state.done:
            return False
        if self.catalogue.ends_item(state.node):
            return token == (EOS if state.n_done == self.n_items else SEP)
        return token in _memo(self._sets, (state.node, state.used), lambda: frozenset(self.allowed(state).tolist()))

    def advance(self, state: ConstraintState, token: int, checked: bool = False) -> ConstraintState:
        """State after writing token; raises InputError if the token is not allowed (checked: the caller has
        just looked it up in `allowed(state)`)."""
        token = int(token)
        if not checked:
            allowed = self.allowed(state)
            k = int(np.searchsorted(allowed, token))
            if k == len(allowed) or allowed[k] != token:
                raise InputError(f"constraint: token {token} not allowed here (allowed: {allowed[:8].tolist()}...)")
        cat = self.catalogue
        if cat.ends_item(state.node):
            if token == EOS:
                return ConstraintState(state.n_done, state.depth, 0, state.used, done=True)
            return ConstraintState(state.n_done, 0, 0, state.used)
        pos = int(np.searchsorted(cat.child_tokens[state.node], token))
        node = int(cat.child_nodes[state.node][pos])
        item = cat.leaf_item.get(node)
        if item is None:
            return ConstraintState(state.n_done, state.depth + 1, node, state.used)
        return ConstraintState(state.n_done + 1, state.depth + 1, node, state.used | {item})

    def chain_ban(self, state: ConstraintState) -> np.ndarray:
        """(n_nodes + 2,) float16 `banned` row of the draft-chain graph: -inf at trie nodes whose items are
        all used and at NOT_CHILD, 0 elsewhere (see Catalogue.chain_tables). Cached per set of used items."""
        def make():
            n = self.catalogue.n_nodes
            row = np.zeros(n + 2, dtype=np.float16)
            row[:n][self.catalogue.exhausted(state.used, self._used_counts(state.used))] = -np.inf
            row[n] = -np.inf
            return row
        return _memo(self._bans, state.used, make, cap=256)

    def completion_bans(self, state: ConstraintState) -> tuple[np.ndarray, np.ndarray]:
        """For a state whose next token may complete an item (`Catalogue.before_leaf`): the trie nodes from the
        root down to the state's node (depth + 1 of them) and, for each, whether completing one more item under
        it uses it up - so `chain_ban` after such a token is this state's row with those nodes and the new leaf
        at -inf."""
        def make():
            cat = self.catalogue
            nodes = np.append(cat.ancestors(state.node), state.node)
            return nodes, self._used_counts(state.used)[nodes] + 1 >= cat.subtree_size[nodes]
        return _memo(self._completions, (state.node, state.used), make)

    def list_length(self) -> int:
        """Tokens in the longest complete output list, eos included."""
        return self.n_items * (self.catalogue.max_depth + 1)
