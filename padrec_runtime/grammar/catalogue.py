"""The item catalogue, shared by exporter and runtime: items, their semantic IDs and the item trie.

Items are spelled as tokens by the catalogue's TokenLayout (layout.py); the trie runs over those tokens, so
the grammar, the chain tables and decoding work alike for every layout. Pure numpy, no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError, ManifestError
from ..integrity import parse_json
from .layout import BOS, EOS, LIST, PAD, SEP, SPECIAL_TOKENS, TokenLayout

__all__ = ["BOS", "EOS", "LIST", "PAD", "SEP", "SPECIAL_TOKENS", "Catalogue", "TokenLayout"]


class Catalogue:
    """Items, their semantic IDs (one-to-one) and the prefix trie over their token spellings used to constrain
    decoding."""

    MAX_ITEMS = 1 << 24
    MAX_ID = (1 << 63) - 1  # ids are int64

    def __init__(self, layout: TokenLayout, item_ids, sids, titles=None):
        self.layout = layout
        self.item_ids = _int_array(item_ids, "catalogue.item_ids", "ids", 0, self.MAX_ID)
        _check_rows(sids, layout.levels)
        self.sids = _int_array(sids, "catalogue.sids", "codes", 0, layout.codebook - 1)
        n = len(self.item_ids)
        if self.item_ids.ndim != 1 or not 0 < n <= self.MAX_ITEMS:
            raise ManifestError(f"catalogue.item_ids | got shape {self.item_ids.shape} | expected a list of "
                                f"1..{self.MAX_ITEMS} item ids | re-export the engines")
        if self.sids.shape != (n, layout.levels):
            raise ManifestError(f"catalogue.sids | got shape {self.sids.shape} | expected ({n}, {layout.levels}) | "
                                "re-export the engines")
        if len(np.unique(self.item_ids)) != n:
            raise ManifestError("catalogue.item_ids | duplicate item ids | every item id must appear once")
        if len(np.unique(self.sids, axis=0)) != n:
            raise ManifestError("catalogue.sids | two items share a semantic ID | resolve collisions on export")
        self.titles = _titles(titles, n)
        self.item_tokens = [layout.spell(row) for row in self.sids.tolist()]  # each item's token spelling
        self._index = {int(i): k for k, i in enumerate(self.item_ids)}
        self._by_tokens = None  # each item's tokens -> its id (decode_list), made on first use
        self._row_of = None  # each trie node's chain-table row (chain_row), made on first use
        self._an_item = None  # for each trie node, an item below it (ancestors), made on first use
        self._build_trie()

    def _build_trie(self) -> None:
        """The trie over the items' token spellings. item_nodes (n, D + 1): each item's node at token depth d
        (0 = root, D = the longest spelling), NOT_CHILD (= n_nodes) past a shorter item's leaf."""
        n, spelled = len(self.item_ids), self.item_tokens
        item_nodes = np.full((n, max(map(len, spelled)) + 1), -1, dtype=np.int64)
        item_nodes[:, 0] = 0
        children: list[dict[int, int]] = [{}]
        for k, tokens in enumerate(spelled):
            node = 0
            for d, tok in enumerate(tokens, start=1):
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                node = item_nodes[k, d] = nxt
        n_nodes = len(children)
        item_nodes[item_nodes < 0] = n_nodes
        self.item_nodes = item_nodes
        self.item_depth = np.array([len(s) for s in spelled], dtype=np.int64)
        leaves = item_nodes[np.arange(n), self.item_depth]
        if any(children[leaf] for leaf in leaves.tolist()):  # the layout's spellings must be prefix-free
            raise ManifestError(f"catalogue | an item's {self.layout.kind} spelling begins another's | the "
                                "layout must spell items prefix-free")
        self.subtree_size = np.bincount(item_nodes[:, 1:].ravel(), minlength=n_nodes + 1)[:n_nodes]
        self.subtree_size[0] = n
        self.child_tokens = [np.array(sorted(c), dtype=np.int64) for c in children]
        self.child_nodes = [np.array([c[k] for k in sorted(c)], dtype=np.int64) for c in children]
        self.leaf_item = {int(leaf): k for k, leaf in enumerate(leaves.tolist())}
        self.node_depth = np.zeros(n_nodes, dtype=np.int64)
        for d in range(1, item_nodes.shape[1]):
            real = item_nodes[:, d] < n_nodes
            self.node_depth[item_nodes[real, d]] = d
        # nodes with a leaf child: the next token may complete an item there
        self.before_leaf = np.zeros(n_nodes, dtype=bool)
        self.before_leaf[item_nodes[np.arange(n), self.item_depth - 1]] = True

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def n_nodes(self) -> int:
        """Trie nodes; chain tables use n_nodes as NOT_CHILD and n_nodes + 1 as ROOT_AGAIN."""
        return len(self.child_tokens)

    @property
    def max_depth(self) -> int:
        """Tokens of the longest item spelling in this catalogue."""
        return self.item_nodes.shape[1] - 1

    def ends_item(self, node: int) -> bool:
        """Whether a trie node is a leaf: an item is complete there, a separator or eos is due."""
        return node in self.leaf_item

    def _chain_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(inner nodes, row_of) of chain_tables: the trie's inner nodes (those with children, the root first)
        and each node's table row, leaves sharing the last one; NOT_CHILD and ROOT_AGAIN map to the root's row."""
        inner = np.flatnonzero([len(c) > 0 for c in self.child_tokens])
        row_of = np.full(self.n_nodes + 2, len(inner), dtype=np.int64)
        row_of[inner] = np.arange(len(inner))
        row_of[self.n_nodes:] = 0
        return inner, row_of

    def chain_tables(self) -> dict:
        """The trie as tables for the fused draft-chain graph. Rows are the trie's inner nodes plus one row for
        every leaf (a finished item). next_node (rows, V): the trie node each token leads to from a row, or
        NOT_CHILD = n_nodes where the token may not follow (separator and eos after a leaf lead to ROOT_AGAIN
        = n_nodes + 1); row_of (n_nodes + 2,): each node's row (leaves share the last row); is_leaf
        (n_nodes + 2,): 1 where a node ends an item; node_slot (n_nodes + 2,): the item slot of the token that
        leads to each node (its depth less one; ROOT_AGAIN: the separator's slot; the root and NOT_CHILD: the
        other specials' slot), so a token's slot is node_slot[next_node[row, token]] whatever the layout. The
        grammar as data, in one place: the chain graph, the device accept kernel and the host walk's trie come
        from here."""
        lay, n_nodes = self.layout, self.n_nodes
        inner, row_of = self._chain_rows()
        leaf_row = len(inner)
        next_node = np.full((leaf_row + 1, lay.vocab_size), n_nodes, dtype=np.int32)
        for r, node in enumerate(inner):
            next_node[r, self.child_tokens[node]] = self.child_nodes[node]
        next_node[leaf_row, [SEP, EOS]] = n_nodes + 1
        node_slot = np.full(n_nodes + 2, lay.sep_slot + 1, dtype=np.int64)
        node_slot[1:n_nodes] = np.minimum(self.node_depth[1:] - 1, lay.max_item_tokens - 1)
        node_slot[n_nodes + 1] = lay.sep_slot
        return {"next_node": next_node, "row_of": row_of, "is_leaf": (row_of == leaf_row).astype(np.int64),
                "node_slot": node_slot}

    def leaf_paths(self) -> np.ndarray:
        """(n_nodes + 2, max_depth) int64: for each leaf, its item's nodes at depth 1 .. its depth, right-aligned
        (the leaf last), NOT_CHILD before them and in every other node's row."""
        D = self.max_depth
        paths = np.full((self.n_nodes + 2, D), self.n_nodes, dtype=np.int64)
        for k, depth in enumerate(self.item_depth.tolist()):
            paths[self.item_nodes[k, depth], D - depth:] = self.item_nodes[k, 1:depth + 1]
        return paths

    def used_counts(self, used: frozenset) -> np.ndarray:
        """(n_nodes,) int: how many items of `used` lie under each trie node (the root: all of them)."""
        idx = np.fromiter(used, dtype=np.int64, count=len(used))
        count = np.bincount(self.item_nodes[idx, 1:].ravel(), minlength=self.n_nodes + 1)[:self.n_nodes]
        count[0] = len(used)
        return count

    def exhausted(self, used: frozenset, counts: np.ndarray | None = None) -> np.ndarray:
        """(n_nodes,) bool: trie nodes every item under which is in `used` (counts: its `used_counts`)."""
        count = self.used_counts(used) if counts is None else counts
        out = count >= self.subtree_size
        out[0] = len(used) >= len(self)
        return out

    def ancestors(self, node: int) -> np.ndarray:
        """The trie nodes from the root down to `node`, excluding it (depth of `node` entries)."""
        if self._an_item is None:  # for each trie node, an item below it; published whole (threads share it)
            an_item = np.zeros(self.n_nodes + 1, dtype=np.int64)  # the last entry takes NOT_CHILD padding
            for d in range(self.item_nodes.shape[1]):
                an_item[self.item_nodes[:, d]] = np.arange(len(self.item_nodes))
            self._an_item = an_item
        path = self.item_nodes[self._an_item[node]]
        return path[:int(np.flatnonzero(path == node)[0])]

    def chain_row(self, state: "ConstraintState") -> int:
        """The draft-chain table row (see chain_tables) of a decoding state's trie position."""
        if self._row_of is None:
            self._row_of = self._chain_rows()[1]
        return int(self._row_of[state.node])

    def check_known(self, item_ids, what: str = "history") -> None:
        """Raise InputError naming `what` and its ids that are not in this catalogue."""
        unknown = [int(i) for i in item_ids if int(i) not in self._index]
        if unknown:
            lo, hi, n = int(self.item_ids.min()), int(self.item_ids.max()), len(self.item_ids)
            span = f"ids {lo}..{hi}" if hi - lo + 1 == n else f"ids between {lo} and {hi}, not all of them"
            raise InputError(f"{what}: unknown item ids {unknown[:10]} | expected ids of the engine's catalogue "
                             f"({n} items, {span}) | use ids from its catalogue.json")

    def index_of(self, item_ids) -> np.ndarray:
        """Catalogue indices of item ids; unknown ids raise InputError naming them."""
        self.check_known(item_ids)
        return np.array([self._index[int(i)] for i in item_ids], dtype=np.int64)

    def _items_with(self, item_ids, sep: int, end: int) -> list:
        """The items' tokens, each followed by `sep`, the last one by `end`."""
        out: list = []
        for k in self.index_of(item_ids).tolist():
            out += self.item_tokens[k]
            out.append(sep)
        if out:
            out[-1] = end
        return out

    def prompt(self, history_ids) -> np.ndarray:
        """Token ids of the prompt for one history of item ids: <bos> item <sep> ... item <list>."""
        return np.array([BOS] + self._items_with(history_ids, SEP, LIST), dtype=np.int32)

    def list_tokens(self, item_ids) -> np.ndarray:
        """Token ids of a complete output list of these items: item <sep> ... item <eos>."""
        return np.array(self._items_with(item_ids, SEP, EOS), dtype=np.int32)

    def decode_list(self, tokens) -> list[int]:
        """Item ids written in a generated token list (special tokens skipped; an unfinished last item ignored)."""
        n_sp = self.layout.n_special
        by_tokens = self._by_tokens
        if by_tokens is None:
            by_tokens = self._by_tokens = {t: int(i) for t, i in zip(self.item_tokens, self.item_ids)}
        items, span = [], []
        for t in tokens:
            if t >= n_sp:
                span.append(int(t))
            elif span:
                items.append(by_tokens.get(tuple(span)))
                span = []
        if span:
            items.append(by_tokens.get(tuple(span)))
        if None not in items:
            return items
        return self._walk_items(tokens)

    def _walk_items(self, tokens) -> list[int]:
        """decode_list down the trie: names the first token no item continues with."""
        items, node, depth = [], 0, 0
        for t in (int(t) for t in tokens if t >= self.layout.n_special):
            pos = np.searchsorted(self.child_tokens[node], t)
            if pos >= len(self.child_tokens[node]) or self.child_tokens[node][pos] != t:
                raise InputError(f"tokens: token {t} at position {depth} of an item is not in the catalogue "
                                 f"({self.layout.kind} layout)")
            node, depth = int(self.child_nodes[node][pos]), depth + 1
            if node in self.leaf_item:
                items.append(int(self.item_ids[self.leaf_item[node]]))
                node, depth = 0, 0
        return items

    def to_json(self) -> dict:
        out = {"item_ids": self.item_ids.tolist(), "sids": self.sids.tolist()}
        if self.titles is not None:
            out["titles"] = self.titles
        return out

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @classmethod
    def from_json(cls, data, layout: TokenLayout) -> "Catalogue":
        """The catalogue from its parsed JSON: exactly `item_ids` (integers), `sids` (one list of L integer codes
        per item) and optionally `titles` (one string per item); anything else is a ManifestError."""
        if not isinstance(data, dict):
            raise ManifestError(f"catalogue | got {type(data).__name__} | expected an object with item_ids, sids "
                                "and optionally titles | re-export the engines")
        extra = sorted(set(data) - {"item_ids", "sids", "titles"}, key=str)
        missing = sorted({"item_ids", "sids"} - set(data))
        if extra or missing:
            raise ManifestError(f"catalogue | unknown keys {extra[:3]}, missing {missing} | expected item_ids, sids "
                                "and optionally titles | re-export the engines")
        if not isinstance(data["sids"], list):
            raise ManifestError("catalogue.sids | expected one list of codes per item | re-export the engines")
        _check_rows(data["sids"], layout.levels)
        for key, rows in (("item_ids", [data["item_ids"]]), ("sids", data["sids"])):
            for row in rows:  # JSON integers only: no floats, strings or booleans coerced into ids or codes
                if not isinstance(row, list) or not all(type(v) is int for v in row):
                    raise ManifestError(f"catalogue.{key} | got {str(row)[:60]} | expected lists of integers | "
                                        "re-export the engines")
        return cls(layout, data["item_ids"], data["sids"], data.get("titles"))

    @classmethod
    def load(cls, path: Path, layout: TokenLayout) -> "Catalogue":
        """An exporter's catalogue file (the runtime reads the engines' through Manifest.load_catalogue)."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ManifestError(f"catalogue {path}: unreadable ({exc}) | re-export the engines") from None
        return cls.from_json(parse_json(raw, f"catalogue {path}"), layout)


def _check_rows(sids, levels: int) -> None:
    """A list of semantic IDs has one row of `levels` codes per item: a short or ragged row is named by index
    (as an array of objects it would only show up as a row that is not an integer)."""
    if isinstance(sids, np.ndarray) or not isinstance(sids, (list, tuple)):
        return
    for i, row in enumerate(sids):
        if not isinstance(row, (list, tuple)) or len(row) != levels:
            raise ManifestError(f"catalogue.sids[{i}] | got {str(row)[:40]!r} | expected a list of {levels} codes, "
                                "one per level | re-export the engines")


def _int_array(values, what: str, noun: str, lo: int, hi: int) -> np.ndarray:
    """int64 array of integer values in lo..hi; anything else (floats, strings, booleans, out of range) is a
    ManifestError naming the first such value."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":  # the exporter's own arrays
        bad = values[(values < lo) | (values > hi)].ravel()[:1].tolist()
        arr = values
    else:
        arr = np.asarray(values, dtype=object)
        bad = [v for v in arr.ravel().tolist() if not isinstance(v, (int, np.integer)) or
               isinstance(v, (bool, np.bool_)) or not lo <= v <= hi][:1]
    if bad:
        raise ManifestError(f"{what} | got {str(bad[0])[:40]!r}: not an integer or {noun} outside "
                            f"{lo}..{hi} | expected integers in {lo}..{hi} | re-export the engines")
    return arr.astype(np.int64)


def _titles(titles, n: int):
    """None, or one string per item."""
    if titles is None:
        return None
    if not isinstance(titles, (list, tuple)) or len(titles) != n or not all(isinstance(t, str) for t in titles):
        size = len(titles) if hasattr(titles, "__len__") else "?"
        raise ManifestError(f"catalogue.titles | got {type(titles).__name__} of {size} | expected {n} strings, one "
                            "per item, or no titles | re-export the engines")
    return list(titles)
