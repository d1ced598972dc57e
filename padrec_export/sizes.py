"""Target shapes by name (Qwen2.5-0.5B / 1.5B / 7B over our semantic-ID vocabulary), their parameter counts,
and the training recipe each size needs to fit one GPU and not diverge."""
from __future__ import annotations

from dataclasses import dataclass

from padrec_runtime.errors import InputError


@dataclass(frozen=True)
class ModelSize:
    """A decoder's shape; the vocabulary comes from the catalogue's token layout."""

    hidden: int = 256
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 688


@dataclass(frozen=True)
class Recipe:
    """How a size is trained on one GPU (target and drafts)."""

    lr: float  # target's peak learning rate: smaller as the model widens
    draft_lr: float  # the drafts' (one decoder layer of the target's width)
    batch_tokens: int = 16384  # tokens per optimizer step (sequences per step = this // longest sequence)
    warmup_steps: int = 30
    weights: str = "bfloat16"  # target weights and optimizer states: bfloat16 (no fp32 copies) | float32
    checkpointing: bool = False  # recompute each decoder layer in backward (activations of one layer live)
    micro_batch: int = 0  # sequences per target forward (0: the whole step), gradients accumulated
    draft_micro_batch: int = 0  # sequences per draft forward (0: the whole step); its unrolled attention is wide


SIZES = {
    "tiny": ModelSize(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64),
    "qwen-0.5b": ModelSize(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    "qwen-1.5b": ModelSize(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
    "qwen-7b": ModelSize(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944),
}
RECIPES = {
    "tiny": Recipe(lr=3e-3, draft_lr=3e-3, batch_tokens=2048, warmup_steps=2, weights="float32"),
    "qwen-0.5b": Recipe(lr=1e-3, draft_lr=1e-3, weights="float32"),  # fits with fp32 master weights: kept
    "qwen-1.5b": Recipe(lr=3e-4, draft_lr=6e-4),
    # 7B: weights + grads + bf16 Adam states are 52 GB; without recomputation its activations at 16k tokens
    # would need about 100 GB more
    "qwen-7b": Recipe(lr=1.5e-4, draft_lr=3e-4, checkpointing=True, draft_micro_batch=32),
}


def size_by_name(name: str) -> ModelSize:
    if name not in SIZES:
        raise InputError(f"--size: got {name!r} | expected one of {', '.join(SIZES)} | pick one of those")
    return SIZES[name]


def recipe_by_name(name: str) -> Recipe:
    size_by_name(name)
    return RECIPES[name]


def param_count(size: ModelSize, vocab: int, qkv_bias: bool = False, tied: bool = False) -> int:
    """Parameters of a target of this shape (our Target: SwiGLU MLP, RMSNorms, optional q/k/v biases, an
    embedding and an output head, tied or not)."""
    head_dim = size.hidden // size.heads
    q, kv = size.heads * head_dim, size.kv_heads * head_dim
    attention = size.hidden * (q + 2 * kv) + q * size.hidden + ((q + 2 * kv) if qkv_bias else 0)
    layer = attention + 3 * size.hidden * size.intermediate + 2 * size.hidden
    return size.layers * layer + vocab * size.hidden * (1 if tied else 2) + size.hidden
