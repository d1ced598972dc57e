"""Tiny random models and catalogues, generated (never downloaded) for tests and smoke runs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from padrec_runtime.grammar import Catalogue, TokenLayout

from .models import Draft, DraftConfig, Target, TargetConfig


@dataclass(frozen=True)
class TinySpec:
    """A tiny target + draft + catalogue, fully determined by its fields."""

    seed: int = 0
    levels: int = 3
    codebook: int = 8
    n_items: int = 60
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    qkv_bias: bool = False
    tie: bool = False
    kind: str = "per_level"  # token layout (padrec_runtime/grammar/layout.py)


def tiny_catalogue(spec: TinySpec) -> Catalogue:
    layout = TokenLayout(levels=spec.levels, codebook=spec.codebook, kind=spec.kind)
    rng = np.random.default_rng(spec.seed)
    space = spec.codebook ** spec.levels
    if spec.n_items > space:
        raise ValueError(f"{spec.n_items} items do not fit {space} semantic IDs")
    flat = rng.choice(space, size=spec.n_items, replace=False)
    sids = np.stack([(flat // spec.codebook ** (spec.levels - 1 - l)) % spec.codebook
                     for l in range(spec.levels)], axis=1)
    titles = [f"Item {1000 + k}" for k in range(spec.n_items)]
    return Catalogue(layout, np.arange(1000, 1000 + spec.n_items), sids, titles)


def tiny_models(spec: TinySpec, layout: TokenLayout) -> tuple[Target, Draft]:
    torch.manual_seed(spec.seed)
    tc = TargetConfig(vocab_size=layout.vocab_size, hidden_size=spec.hidden, n_layers=spec.layers,
                      n_heads=spec.heads, n_kv_heads=spec.kv_heads, intermediate_size=2 * spec.hidden,
                      qkv_bias=spec.qkv_bias, tie_embeddings=spec.tie)
    target = Target(tc).eval()
    for p in target.parameters():  # larger weights: sharper, less tie-prone distributions
        p.data.mul_(3.0 if p.dim() > 1 else 1.0)
    dc = DraftConfig(hidden_size=spec.hidden, vocab_size=layout.vocab_size, n_heads=spec.heads,
                     n_kv_heads=spec.kv_heads, intermediate_size=2 * spec.hidden, n_slots=layout.n_slots)
    draft = Draft(dc, target).eval()
    return target, draft


def tiny_setup(spec: TinySpec = TinySpec()):
    cat = tiny_catalogue(spec)
    target, draft = tiny_models(spec, cat.layout)
    return cat, target, draft
