"""Token layout and item catalogue, shared by exporter and runtime: vocabulary, slots, the item trie.

A list is ``item <sep> item <sep> ... item <eos>``; an item is L semantic-ID codes, level l drawn from
its own token range. The prompt is ``<bos> item <sep> ... item <list>``. Pure numpy, no torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, ManifestError
from ..integrity import parse_json

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>", "<list>")
PAD, BOS, EOS, SEP, LIST = range(len(SPECIAL_TOKENS))


@dataclass(frozen=True)
class TokenLayout:
    """Where every kind of token lives in the vocabulary."""

    levels: int = 4  # L: codes per item
    codebook: int = 256  # C: codes per level

    @property
    def n_special(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.n_special + self.levels * self.codebook

    @property
    def n_slots(self) -> int:
        """Slots: 0..L-1 item codes, L separator / eos, L+1 any other special token."""
        return self.levels + 2

    def code_tokens(self, sids: np.ndarray) -> np.ndarray:
        """(..., L) codes -> (..., L) token ids."""
        return self.n_special + np.arange(self.levels) * self.codebook + np.asarray(sids)

    def slots(self, tokens: np.ndarray) -> np.ndarray:
        """Item slot of every token, int32, same shape."""
        tokens = np.asarray(tokens)
        slot = np.full(tokens.shape, self.levels + 1, dtype=np.int32)
        code = tokens >= self.n_special
        slot[code] = (tokens[code] - self.n_special) // self.codebook
        slot[(tokens == SEP) | (tokens == EOS)] = self.levels
        return slot


class Catalogue:
    """Items, their semantic IDs (one-to-one) and the prefix trie used to constrain decoding."""

    MAX_ITEMS = 1 << 24
    MAX_ID = (1 << 63) - 1  # ids are int64

    def __init__(self, layout: TokenLayout, item_ids, sids, titles=None):
        self.layout = layout
        self.item_ids = _int_array(item_ids, "catalogue.item_ids", "ids", 0, self.MAX_ID)
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
        self._index = {int(i): k for k, i in enumerate(self.item_ids)}
        self._by_tokens = None  # each item's code tokens -> its id (decode_list), made on first use
        self._row_of = None  # each trie node's chain-table row (chain_row), made on first use
        self._an_item = None  # for each trie node, an item below it (ancestors), made on first use
        self._build_trie()

    def _build_trie(self) -> None:
        L = self.layout.levels
        n = len(self.item_ids)
        self.item_nodes = np.zeros((n, L + 1), dtype=np.int64)  # node at depth d (0 = root)
        children: list[dict[int, int]] = [{}]
        for k in range(n):
            node = 0
            for level in range(L):
                code = int(self.sids[k, level])
                nxt = children[node].get(code)
                if nxt is None:
                    nxt = len(children)
                    children[node][code] = nxt
                    children.append({})
                node = nxt
                self.item_nodes[k, level + 1] = node
        self.subtree_size = np.bincount(self.item_nodes[:, 1:].ravel(), minlength=len(children))
        self.subtree_size[0] = n
        self.child_codes = [np.array(sorted(c), dtype=np.int64) for c in children]
        self.child_nodes = [np.array([c[k] for k in sorted(c)], dtype=np.int64) for c in children]
        self.leaf_item = {int(self.item_nodes[k, L]): k for k in range(n)}

    def __len__(self) -> int:
        return len(self.item_ids)

    def _chain_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(inner nodes, row_of) of chain_tables: the trie's inner nodes (depth < L, the root first) and each
        node's table row, leaves sharing the last one; NOT_CHILD and ROOT_AGAIN map to the root's row."""
        n_nodes = len(self.child_codes)
        inner = np.unique(self.item_nodes[:, :self.layout.levels])
        row_of = np.full(n_nodes + 2, len(inner), dtype=np.int64)
        row_of[inner] = np.arange(len(inner))
        row_of[n_nodes:] = 0
        return inner, row_of

    def chain_tables(self) -> dict:
        """The trie as tables for the fused draft-chain graph. Rows are the trie's inner nodes plus one row for
        every leaf (a finished item). next_node (rows, V): the trie node each token leads to from a row, or
        NOT_CHILD = n_nodes where the token may not follow (separator and eos after a leaf lead to ROOT_AGAIN
        = n_nodes + 1); row_of (n_nodes + 2,): each node's row (leaves share the last row); is_leaf
        (n_nodes + 2,): 1 where a node ends an item; slot_of (V,): every token's item slot. The grammar as data,
        in one place: the chain graph, the device accept kernel and the host walk's trie come from here."""
        lay, L, C = self.layout, self.layout.levels, self.layout.codebook
        n_nodes = len(self.child_codes)
        inner, row_of = self._chain_rows()
        leaf_row = len(inner)
        depth = np.zeros(n_nodes, dtype=np.int64)
        for d in range(L + 1):
            depth[self.item_nodes[:, d]] = d
        next_node = np.full((leaf_row + 1, lay.vocab_size), n_nodes, dtype=np.int32)
        for r, node in enumerate(inner):
            next_node[r, lay.n_special + depth[node] * C + self.child_codes[node]] = self.child_nodes[node]
        next_node[leaf_row, [SEP, EOS]] = n_nodes + 1
        return {"next_node": next_node, "row_of": row_of, "is_leaf": (row_of == leaf_row).astype(np.int64),
                "slot_of": lay.slots(np.arange(lay.vocab_size)).astype(np.int64)}

    def used_counts(self, used: frozenset) -> np.ndarray:
        """(n_nodes,) int: how many items of `used` lie under each trie node (the root: all of them)."""
        idx = np.fromiter(used, dtype=np.int64, count=len(used))
        count = np.bincount(self.item_nodes[idx, 1:].ravel(), minlength=len(self.child_codes))
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
            an_item = np.zeros(len(self.child_codes), dtype=np.int64)
            for d in range(self.layout.levels + 1):
                an_item[self.item_nodes[:, d]] = np.arange(len(self.item_nodes))
            self._an_item = an_item
        path = self.item_nodes[self._an_item[node]]
        return path[:int(np.flatnonzero(path == node)[0])]

    def chain_row(self, state: "ConstraintState") -> int:
        """The draft-chain table row (see chain_tables) of a decoding state's trie position."""
        if self._row_of is None:
            self._row_of = self._chain_rows()[1]
        return int(self._row_of[state.node])

    def index_of(self, item_ids) -> np.ndarray:
        """Catalogue indices of item ids; unknown ids raise InputError naming them."""
        unknown = [int(i) for i in item_ids if int(i) not in self._index]
        if unknown:
            raise InputError(f"history: unknown item ids {unknown[:10]} | use ids from the engine's catalogue")
        return np.array([self._index[int(i)] for i in item_ids], dtype=np.int64)

    def prompt(self, history_ids) -> np.ndarray:
        """Token ids of the prompt for one history of item ids."""
        idx = self.index_of(history_ids)
        codes = self.layout.code_tokens(self.sids[idx])  # (H, L)
        body = np.concatenate([codes, np.full((len(idx), 1), SEP)], axis=1).ravel()[:-1]
        return np.concatenate([[BOS], body, [LIST]]).astype(np.int32)

    def decode_list(self, tokens) -> list[int]:
        """Item ids written in a generated token list (codes only; separators skipped)."""
        L, n_sp, C = self.layout.levels, self.layout.n_special, self.layout.codebook
        codes = [int(t) for t in tokens if t >= n_sp]
        by_tokens = self._by_tokens
        if by_tokens is None:
            toks = self.layout.code_tokens(self.sids).tolist()
            by_tokens = self._by_tokens = {tuple(t): int(i) for t, i in zip(toks, self.item_ids)}
        items = [by_tokens.get(tuple(codes[s:s + L])) for s in range(0, len(codes) - L + 1, L)]
        if None not in items:
            return items
        items = []  # a code outside the catalogue: the trie walk names it
        for start in range(0, len(codes) - L + 1, L):
            node = 0
            for level, tok in enumerate(codes[start:start + L]):
                code = tok - n_sp - level * C
                pos = np.searchsorted(self.child_codes[node], code)
                if pos >= len(self.child_codes[node]) or self.child_codes[node][pos] != code:
                    raise InputError(f"tokens: code {code} at level {level} is not in the catalogue")
                node = int(self.child_nodes[node][pos])
            items.append(int(self.item_ids[self.leaf_item[node]]))
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
        if not isinstance(data["sids"], list) or not all(isinstance(row, list) for row in data["sids"]):
            raise ManifestError("catalogue.sids | expected one list of codes per item | re-export the engines")
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
