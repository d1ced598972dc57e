"""Target vocabulary maps: where padrec's tokens (5 special tokens, then the layout's code tokens) sit in a
checkpoint's own vocabulary, and the target cut down to those rows.

A recommender LLM usually keeps its text vocabulary (say 32k tokens) and adds the SID tokens at some offset,
with its own ids for begin / end / separator tokens. padrec.json's optional "vocab" says where they are:

    "vocab": {"special": {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<sep>": "<sep>", "<list>": 32017},
              "codes": {"pattern": "<{level}_{code}>", "levels": ["a", "b", "c", "d"]}}

Each special token is an id or a token name; codes are named by a pattern ({level} from "levels", {code}
0..C-1), an id table ("ids": L lists of C ids) or one contiguous block ("offset": id of level 0 code 0).
That is the per_level layout's grid of code tokens (TokenLayout.code_grid); the shared layout has one row of
C codes, the digits layout one row of 11 (the digits 0..9, then the code end as {code} 10).
Names are looked up in the checkpoint's tokenizer.json (added tokens and the model vocabulary).
The exported target keeps only the mapped rows of its embedding and output head, in padrec's order, so the
runtime's grammar runs unchanged. Constrained decoding never allows another token, so the lists (greedy or
sampled: the constraint renormalises over the allowed tokens either way) are the full model's.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from padrec_runtime.errors import CheckpointError
from padrec_runtime.grammar import SPECIAL_TOKENS, TokenLayout

from .models import Target


@dataclass(frozen=True)
class VocabMap:
    """padrec token id -> the checkpoint's token id (len = the layout's vocab_size)."""

    token_ids: tuple

    def __post_init__(self):
        special = self.token_ids[1:]  # <pad> may share an id (it is never written, only padded with)
        if len(set(special)) != len(special):
            raise CheckpointError("padrec.json vocab | two padrec tokens map to one checkpoint id | every code and "
                                  "special token other than <pad> needs its own id")


def _names(checkpoint_dir: Path) -> dict:
    """token name -> id from tokenizer.json (added tokens over the model vocabulary)."""
    path = checkpoint_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"padrec.json vocab names tokens | no {path} | add the tokenizer, or give ids")
    data = json.loads(path.read_text())
    vocab = (data.get("model") or {}).get("vocab") or {}
    names = dict(vocab) if isinstance(vocab, dict) else {}
    names.update({t["content"]: t["id"] for t in data.get("added_tokens") or []})
    return names


def _resolve(value, what: str, lookup) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CheckpointError(f"padrec.json vocab {what} | got {value!r} | expected a token id or name")
    if isinstance(value, int):
        return value
    table = lookup()
    if value not in table:
        raise CheckpointError(f"padrec.json vocab {what} | token {value!r} not in tokenizer.json | check the name")
    return int(table[value])


def _code_ids(codes: dict, layout: TokenLayout, lookup) -> list:
    L, C = layout.code_grid
    if "offset" in codes:
        return [int(codes["offset"]) + i for i in range(L * C)]
    if "ids" in codes:
        table = codes["ids"]
        if len(table) != L or any(len(row) != C for row in table):
            raise CheckpointError(f"padrec.json vocab codes.ids | expected {L} lists of {C} ids | fix padrec.json")
        return [int(i) for row in table for i in row]
    if "pattern" in codes:
        levels = codes.get("levels") or list(range(L))
        if len(levels) != L:
            raise CheckpointError(f"padrec.json vocab codes.levels | got {len(levels)} | expected {L} level names")
        return [_resolve(codes["pattern"].format(level=levels[l], code=c), f"codes level {l} code {c}", lookup)
                for l in range(L) for c in range(C)]
    raise CheckpointError("padrec.json vocab codes | expected one of offset, ids, pattern | fix padrec.json")


def vocab_map(meta: dict, layout: TokenLayout, checkpoint_dir, vocab_size: int) -> VocabMap | None:
    """The map padrec.json's "vocab" describes (None without one), every id checked against vocab_size."""
    spec = meta.get("vocab")
    if spec is None:
        return None
    cache: dict = {}

    def lookup():
        if not cache:
            cache.update(_names(Path(checkpoint_dir)))
        return cache

    special = spec.get("special") or {}
    missing = [t for t in SPECIAL_TOKENS if t not in special]
    if missing:
        raise CheckpointError(f"padrec.json vocab.special | missing {missing} | name the checkpoint's id or token for "
                              f"each of {', '.join(SPECIAL_TOKENS)}")
    ids = [_resolve(special[t], f"special {t}", lookup) for t in SPECIAL_TOKENS]
    ids += _code_ids(spec.get("codes") or {}, layout, lookup)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise CheckpointError(f"padrec.json vocab | ids {bad[:5]} | expected 0..{vocab_size - 1} (config.json "
                              "vocab_size) | fix the map")
    return VocabMap(tuple(ids))


def compact_target(target: Target, vmap: VocabMap) -> Target:
    """The target with only the mapped rows of its embedding and output head, in padrec's token order (in place:
    the other weights are not copied)."""
    ids = torch.tensor(vmap.token_ids, dtype=torch.long)
    embed = target.embed_tokens.weight.detach()[ids].clone()
    target.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=False)
    head = nn.Linear(target.cfg.hidden_size, len(ids), bias=False, dtype=embed.dtype)
    if target.cfg.tie_embeddings:
        head.weight = target.embed_tokens.weight
    else:
        head.weight = nn.Parameter(target.lm_head.weight.detach()[ids].clone())
    target.lm_head = head
    target.cfg = dataclasses.replace(target.cfg, vocab_size=len(ids))
    return target
