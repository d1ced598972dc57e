"""ONNX Runtime's GroupQueryAttention as a PyTorch op: its computation for the reference and the contrib op for
an exported graph (the in-place chain round, DraftChain.forward_in_place), and the rotary tables it reads."""
from __future__ import annotations

import torch


def rotary_cache(cfg, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (positions, head_dim / 2) in fp32 for positions 0.., as `rope` computes them: the tables ONNX
    Runtime's GroupQueryAttention rotates with (non-interleaved halves)."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv
    return freqs.cos(), freqs.sin()


class GroupQueryAttention(torch.autograd.Function):
    """ONNX Runtime's com.microsoft GroupQueryAttention over a cache written in place: packed q|k|v (B, S, .),
    rotary inside from cos / sin tables, each row's new tokens at positions seqlens_k - S + 1 .., causal over
    the row's cache. `forward` is the computation in PyTorch; an exported graph holds the contrib op."""

    @staticmethod
    def forward(ctx, qkv, cache_k, cache_v, seqlens_k, total, cos, sin, n_heads: int, n_kv: int, scale: float):
        B, S, _ = qkv.shape
        D, L = cache_k.shape[-1], cache_k.shape[2]
        qkv = qkv.view(B, S, n_heads + 2 * n_kv, D)
        pos = (seqlens_k.long() - S + 1)[:, None] + torch.arange(S, device=qkv.device)  # (B, S)
        c = torch.cat([cos[pos], cos[pos]], -1)[:, :, None].to(qkv.dtype)  # (B, S, 1, D)
        s = torch.cat([-sin[pos], sin[pos]], -1)[:, :, None].to(qkv.dtype)
        rot = n_heads + n_kv
        q, k = rotate(qkv[:, :, :rot], c, s).split([n_heads, n_kv], dim=2)
        v = qkv[:, :, rot:]
        rows = torch.arange(B, device=qkv.device)[:, None]
        present_k, present_v = cache_k.clone(), cache_v.clone()
        present_k[rows, :, pos] = k  # (B, S, kv heads, D) at each row's positions
        present_v[rows, :, pos] = v
        rep = n_heads // n_kv
        q = q.permute(0, 2, 1, 3)  # (B, heads, S, D)
        if rep > 1:  # query heads of a group share one K/V head. Plain multi-head attention (rep 1) skips the
            # reshape: a same-shape reshape of the permuted view breaks the TorchScript exporter's peephole pass
            q = q.reshape(B, n_kv, rep * S, D)
        scores = torch.matmul(q, present_k.transpose(-1, -2)) * scale  # (B, kv, rep * S, L)
        visible = torch.arange(L, device=qkv.device)[None, None, :] <= pos[:, :, None]  # (B, S, L)
        bias = torch.where(visible, 0.0, float("-inf")).to(scores.dtype).repeat(1, rep, 1)[:, None]
        out = torch.matmul(torch.softmax(scores + bias, dim=-1), present_v).reshape(B, n_heads, S, D)
        return out.transpose(1, 2).reshape(B, S, n_heads * D), present_k, present_v

    @staticmethod
    def symbolic(g, qkv, cache_k, cache_v, seqlens_k, total, cos, sin, n_heads: int, n_kv: int, scale: float):
        none = g.op("prim::Constant")  # an absent optional input (key and value: q|k|v come packed)
        none.setType(torch._C.OptionalType.ofTensor())
        out, k, v = g.op("com.microsoft::GroupQueryAttention", qkv, none, none, cache_k, cache_v, seqlens_k, total, cos,
                         sin, num_heads_i=n_heads, kv_num_heads_i=n_kv, do_rotary_i=1, rotary_interleaved_i=0,
                         scale_f=float(scale), outputs=3)
        head_dim = round(scale ** -2)  # the exporter cannot infer a contrib op's output types: set them
        out.setType(qkv.type().with_sizes([None, None, n_heads * head_dim]))
        k.setType(cache_k.type())
        v.setType(cache_v.type())
        return out, k, v


def rotate(x, cos, sin):
    """x * cos + x with its halves swapped * signed sin: rotary embedding in the Hugging Face rotate-half layout."""
    half = x.shape[-1] // 2
    swap = torch.cat([torch.arange(half, 2 * half, device=x.device), torch.arange(0, half, device=x.device)])
    return x * cos + x.index_select(-1, swap) * sin  # in the model's dtype, as Hugging Face does
