"""Token layouts: how an item's L semantic-ID codes are spelled as tokens, and the item slot of every token.

Every layout shares the five special tokens and the list form: a list is ``item <sep> item ... item <eos>``,
a prompt ``<bos> item <sep> ... item <list>``. They differ in the code tokens (ids from 5 on):

- ``per_level``: level l has its own C tokens, an item is L tokens ``<a_12><b_7><c_31>``; vocab 5 + L*C.
- ``shared``: one codebook of C tokens used at every level, an item is L tokens ``<12><7><31>``; vocab 5 + C.
- ``digits``: each code in decimal with the digit tokens 0..9 (shared by every level and code), closed by a
  code-end token ``;``: item (12, 7, 31) is ``1 2 ; 7 ; 3 1 ;``, a variable-length span; vocab 5 + 11.
  Why a code end after every code, the last one too: an item's spelling must never begin another item's
  (with ends only between codes, (1, 2, 3) = ``1;2;3`` begins (1, 2, 34) = ``1;2;34``), so that the item
  trie's leaves are exactly the items and the grammar knows an item is complete at its last token, as in
  the other layouts. Decimal without leading zeros spells each code one way, so items and spellings are
  one-to-one (1 is ``1 ;``, 12 is ``1 2 ;``).

Item slot (the draft's position signal): a token's position inside its item span, 0 .. max_item_tokens - 1;
max_item_tokens for ``<sep>`` and ``<eos>``; max_item_tokens + 1 for the other special tokens. In per_level
the position equals the code's level, so the token id already tells it; in shared and digits only the
position does. Pure numpy, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>", "<list>")
PAD, BOS, EOS, SEP, LIST = range(len(SPECIAL_TOKENS))


@dataclass(frozen=True)
class PerLevel:
    """Level l, code c -> code token l*C + c (one token per code)."""

    def code_vocab(self, levels: int, codebook: int) -> int:
        return levels * codebook

    def code_rows(self, levels: int) -> int:
        return levels

    def code_width(self, codebook: int) -> int:
        return 1

    def spell(self, level: int, code: int, codebook: int) -> tuple:
        return (level * codebook + code,)

    def code_slots(self, levels: int, codebook: int):
        """Each code token's slot, which its id tells: its level."""
        return np.repeat(np.arange(levels), codebook)


@dataclass(frozen=True)
class Shared:
    """Code c at any level -> code token c."""

    def code_vocab(self, levels: int, codebook: int) -> int:
        return codebook

    def code_rows(self, levels: int) -> int:
        return 1

    def code_width(self, codebook: int) -> int:
        return 1

    def spell(self, level: int, code: int, codebook: int) -> tuple:
        return (code,)

    def code_slots(self, levels: int, codebook: int):
        return None  # a code token stands at any level


@dataclass(frozen=True)
class Digits:
    """Code c -> its decimal digits (code tokens 0..9), then the code end (code token 10)."""

    END = 10

    def code_vocab(self, levels: int, codebook: int) -> int:
        return 11

    def code_rows(self, levels: int) -> int:
        return 1

    def code_width(self, codebook: int) -> int:
        return len(str(codebook - 1)) + 1

    def spell(self, level: int, code: int, codebook: int) -> tuple:
        return tuple(int(d) for d in str(code)) + (self.END,)

    def code_slots(self, levels: int, codebook: int):
        return None  # a digit stands anywhere in an item


SPELLINGS = {"per_level": PerLevel(), "shared": Shared(), "digits": Digits()}
LAYOUT_KINDS = tuple(SPELLINGS)


@dataclass(frozen=True)
class TokenLayout:
    """Where every kind of token lives in the vocabulary, how items are spelled and what slot a token has."""

    levels: int = 4  # L: codes per item
    codebook: int = 256  # C: codes per level
    kind: str = "per_level"  # one of LAYOUT_KINDS (the module docstring shows each)

    def __post_init__(self):
        if self.kind not in SPELLINGS:
            raise InputError(f"layout kind: got {self.kind!r} | expected one of {', '.join(LAYOUT_KINDS)} | "
                             "pick one of those")

    @property
    def n_special(self) -> int:
        return len(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.n_special + SPELLINGS[self.kind].code_vocab(self.levels, self.codebook)

    @property
    def max_item_tokens(self) -> int:
        """Tokens of the longest item spelling (separator not counted)."""
        return self.levels * SPELLINGS[self.kind].code_width(self.codebook)

    @property
    def sep_slot(self) -> int:
        """The slot of <sep> and <eos>."""
        return self.max_item_tokens

    @property
    def n_slots(self) -> int:
        """Slots: 0..max_item_tokens-1 item tokens, then separator / eos, then any other special token."""
        return self.max_item_tokens + 2

    @property
    def code_grid(self) -> tuple[int, int]:
        """(rows, tokens per row) of the code tokens in id order: (L, C) per_level, (1, C) shared, (1, 11) digits
        (the digits 0..9, then the code end)."""
        spelling = SPELLINGS[self.kind]
        rows = spelling.code_rows(self.levels)
        return rows, spelling.code_vocab(self.levels, self.codebook) // rows

    def token_slots(self) -> np.ndarray | None:
        """(V,) int64: each token's slot where the token alone tells it, whatever stands before it (per_level);
        None in layouts where only the position does (`slots` works for every layout)."""
        codes = SPELLINGS[self.kind].code_slots(self.levels, self.codebook)
        if codes is None:
            return None
        out = np.full(self.vocab_size, self.sep_slot + 1, dtype=np.int64)
        out[[SEP, EOS]] = self.sep_slot
        out[self.n_special:] = codes
        return out

    def to_json(self) -> dict:
        return {"levels": self.levels, "codebook": self.codebook, "kind": self.kind}

    def spell(self, codes) -> tuple:
        """One item's L codes -> its token ids."""
        spelling = SPELLINGS[self.kind]
        return tuple(self.n_special + t for level, code in enumerate(codes)
                     for t in spelling.spell(level, int(code), self.codebook))

    def slots(self, tokens, start=0) -> np.ndarray:
        """Item slot of every token of token streams (..., T), int32. A code token's slot is the number of code
        tokens since the last special token before it, or, with none in the stream, since its start plus
        `start` (broadcast over the leading axes): the tokens of the current item written before the stream."""
        tokens = np.asarray(tokens)
        idx = np.arange(tokens.shape[-1])
        special = tokens < self.n_special
        last = np.maximum.accumulate(np.where(special, idx, -1), axis=-1)
        depth = np.where(last >= 0, idx - last - 1, idx + np.asarray(start)[..., None])
        slot = np.where(special, self.sep_slot + 1, np.minimum(depth, self.max_item_tokens - 1))
        slot = np.where((tokens == SEP) | (tokens == EOS), self.sep_slot, slot)
        return slot.astype(np.int32)
