"""The target (Llama-family decoder) and the PAD-Rec draft, with the engine signatures both ONNX graphs keep.

Target: (input_ids, position_ids, attention_mask, past KV) -> logits, hidden, new KV.
Draft:  (hidden_in, input_ids, position_ids, step, slot, attention_mask, past KV) -> logits, hidden, new KV.
attention_mask is (B, T, P+T) bool over past then new positions, so a draft tree verifies in one pass.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .gqa import GroupQueryAttention, rotary_cache, rotate


_EXPECTED = {"int": "an integer >= 1", "float": "a finite number", "bool": "true or false"}  # by field annotation
_AS = {"int": int, "float": float, "bool": bool}


def _valid(kind: str, x) -> bool:
    """Whether x is a config field's value of annotation `kind`: every int field is a size, so at least 1."""
    if kind == "bool":
        return isinstance(x, (bool, np.bool_))
    if isinstance(x, (bool, np.bool_)):
        return False
    return isinstance(x, Integral) and x >= 1 if kind == "int" else isinstance(x, Real) and math.isfinite(x)


class _Heads:
    """What both configs derive from their sizes."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def __post_init__(self):
        from padrec_runtime.errors import CheckpointError
        for f in fields(self):  # a config read from JSON: "128", 2.5 or 0 would fail later, far from the file
            v = getattr(self, f.name)
            if not _valid(f.type, v):
                raise CheckpointError(f"{type(self).__name__}.{f.name}: got {v!r:.40} | expected {_EXPECTED[f.type]} "
                                      "| fix the checkpoint's config")
            object.__setattr__(self, f.name, _AS[f.type](v))  # numpy scalars as Python ones (configs go to JSON)
        if self.hidden_size % self.n_heads or self.n_heads % self.n_kv_heads:
            raise CheckpointError(f"{type(self).__name__}: hidden {self.hidden_size}, heads {self.n_heads}, kv heads "
                                  f"{self.n_kv_heads} | heads must divide hidden and kv heads must divide heads")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TargetConfig(_Heads):
    """Size of a Llama / Qwen2 style decoder."""

    vocab_size: int
    hidden_size: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    intermediate_size: int = 344
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    qkv_bias: bool = False  # q/k/v projection biases: Qwen2, and Llama with attention_bias
    o_bias: bool = False  # output projection bias: Llama with attention_bias (Hugging Face gives o_proj one too)
    tie_embeddings: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.o_bias and not self.qkv_bias:
            from padrec_runtime.errors import CheckpointError
            raise CheckpointError("TargetConfig | o_bias without qkv_bias | expected both (Llama attention_bias) or "
                                  "qkv_bias alone (Qwen2)")


@dataclass(frozen=True)
class DraftConfig(_Heads):
    """The PAD-Rec draft: one decoder layer over fused target features, slot and step signals."""

    hidden_size: int
    vocab_size: int
    n_heads: int = 4
    n_kv_heads: int = 4
    intermediate_size: int = 344
    n_slots: int = 6  # L + 2
    max_steps: int = 8  # step embeddings; deeper steps reuse the last
    use_slot: bool = True  # item-slot embedding scaled by a learnable coefficient
    use_step: bool = True  # draft-step embedding mixed by a context-driven gate
    use_gates: bool = True  # off: the slot embedding added unscaled, the step embedding added ungated (ablation)
    alpha_init: float = 0.1
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope(position_ids, head_dim: int, theta: float):
    """cos, signed sin (B, 1, T, head_dim) for explicit positions, Hugging Face rotate-half layout.

    The rotate-half sign is folded into sin, so applying RoPE is a gather, two products and a sum.
    """
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    freqs = position_ids.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    sign = torch.cat([-torch.ones_like(inv), torch.ones_like(inv)])
    return emb.cos(), emb.sin() * sign


def rope_heads(position_ids, cfg, dtype):
    """cos, signed sin (B, T, heads, head_dim) for the fused q|k|v heads of one layer: q and k heads rotate,
    v heads get cos 1 and sin 0, which leaves them exactly as they are. One rotary pass then covers all
    three (fewer kernels per layer than rotating q and k apart)."""
    cos, sin = (t.transpose(1, 2) for t in rope(position_ids, cfg.head_dim, cfg.rope_theta))  # (B, T, 1, D)
    rot, plain = cfg.n_heads + cfg.n_kv_heads, cfg.n_kv_heads
    cos = torch.cat([cos.expand(-1, -1, rot, -1), torch.ones_like(cos).expand(-1, -1, plain, -1)], dim=2)
    sin = torch.cat([sin.expand(-1, -1, rot, -1), torch.zeros_like(sin).expand(-1, -1, plain, -1)], dim=2)
    return cos.to(dtype), sin.to(dtype)


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv: int, bias: bool, o_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, hidden // n_heads
        self.q_proj = nn.Linear(hidden, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, hidden, bias=o_bias)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        """cos, sin from `rope_heads`: (B, T, n_heads + 2 n_kv, head_dim). mask: (B, T, past + T) bool, or the
        additive bias it stands for, repeated per query head of a group: (B, 1, rep * T, past + T)."""
        B, T, _ = x.shape
        # one projection for q|k|v (the weights are concatenated at trace time and folded into one initializer)
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(x, w, b).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
        q, k, v = rotate(qkv, cos, sin).transpose(1, 2).split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        # grouped-query attention without repeating K/V: the query heads of a group share one K/V head
        rep = self.n_heads // self.n_kv
        q = q.reshape(B, self.n_kv, rep * T, self.head_dim)
        # scores and softmax in the model's dtype (GEMM and softmax accumulate in fp32 on GPU): no casts, fewer
        # kernels. Additive mask: every op stays on the GPU in ONNX Runtime (its CUDA Tile has no bool kernel,
        # and one CPU node rules out CUDA-graph capture); identical to masked_fill(-inf)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (self.head_dim ** -0.5)
        if mask.dtype == torch.bool:
            bias = torch.where(mask, 0.0, float("-inf")).to(scores.dtype).repeat(1, rep, 1)[:, None]
        else:  # already additive, (B, 1, rep * T, past + T) (the fused chain keeps one across its steps)
            bias = mask
        attn = torch.softmax(scores + bias, dim=-1)
        out = torch.matmul(attn, values).reshape(B, self.n_heads, T, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), k, v

    def forward_in_place(self, x, seqlens_k, total, cache_k, cache_v, cos, sin):
        """The same attention as GroupQueryAttention over a whole cache (B, kv heads, max_len, D): output and
        the cache with the new tokens' KV written at their positions."""
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        out, k, v = GroupQueryAttention.apply(F.linear(x, w, b), cache_k, cache_v, seqlens_k, total, cos, sin,
                                              self.n_heads, self.n_kv, self.head_dim ** -0.5)
        return self.o_proj(out), k, v


def device_size(x, dim: int):
    """x.shape[dim] as a float32 tensor the device computes (x's shape without dim, each entry the size): in an
    exported graph a size read with .shape is shape arithmetic, which ONNX Runtime's CUDA provider runs on the
    CPU, and a CPU value feeding device work (a copy) makes it refuse to capture the graph as a CUDA graph."""
    return torch.ones_like(x, dtype=torch.float32).sum(dim)


def full_mask(mask, input_ids, past):
    """The (B, T, past + T) mask, its last column taken by index: the same tensor, but in an exported graph a
    Gather of column past + T - 1, so a narrower mask (a width-1 one would broadcast over every key) makes
    ONNX Runtime raise instead of attending where it should not; a wider one fails where it meets the scores.
    (A Reshape to the implied shape would not do: ONNX Runtime's optimizer rewrites it to fit any width.) On
    CUDA, whose Gather reads an index past the end as 0, a width-1 mask masks every key instead: non-finite
    logits, which the runtime refuses."""
    width = device_size(past[0][0][:1, :1, :, 0], 2) + device_size(input_ids[:1], 1)  # (1, 1) and (1,)
    last = mask.index_select(-1, (width.view(1) - 1).long())
    return torch.cat([mask[..., :-1], last], dim=-1)


def _drop(x, p: float, training: bool):
    """Training-time dropout; absent from eval and from every exported graph."""
    return F.dropout(x, p, True) if p and training else x


class DecoderLayer(nn.Module):
    dropout = 0.0  # residual-branch dropout while training (set by train_target; not part of the model)

    def __init__(self, hidden, n_heads, n_kv, intermediate, eps, bias=False, o_bias=False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, n_heads, n_kv, bias, o_bias)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        return self._mlp(x + _drop(a, self.dropout, self.training)), k, v

    def forward_in_place(self, x, seqlens_k, total, cache_k, cache_v, cos, sin):
        """`forward` with Attention.forward_in_place: returns the output and the whole updated cache."""
        a, k, v = self.self_attn.forward_in_place(self.input_layernorm(x), seqlens_k, total, cache_k, cache_v, cos, sin)
        return self._mlp(x + a), k, v

    def _mlp(self, x):
        h = self.post_attention_layernorm(x)
        m = self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return x + _drop(m, self.dropout, self.training)


class Target(nn.Module):
    """Llama-family decoder returning logits, the last hidden state (after the final norm) and new KV."""

    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.rms_eps, cfg.qkv_bias,
                         cfg.o_bias)
            for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def empty_past(self, batch: int, device=None, dtype=None):
        c = self.cfg
        dtype = dtype or self.embed_tokens.weight.dtype
        z = torch.zeros(batch, c.n_kv_heads, 0, c.head_dim, device=device, dtype=dtype)
        return [(z, z) for _ in range(c.n_layers)]

    def set_dropout(self, p: float) -> None:
        """Dropout on the embeddings and every residual branch while training (0 = none)."""
        self.dropout = p
        for layer in self.layers:
            layer.dropout = p

    dropout = 0.0
    checkpointing = False  # activation checkpointing while training (set by new_target; not part of the model)

    def forward(self, input_ids, position_ids, attention_mask, past):
        attention_mask = full_mask(attention_mask, input_ids, past)
        x = _drop(self.embed_tokens(input_ids), self.dropout, self.training)  # int32 ids: no cast
        cos, sin = rope_heads(position_ids, self.cfg, x.dtype)
        new = []
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for layer, (pk, pv) in zip(self.layers, past):
            if recompute:  # keep only each layer's input; its activations are recomputed in backward
                x, k, v = checkpoint(layer, x, cos, sin, attention_mask, pk, pv, use_reentrant=False)
            else:
                x, k, v = layer(x, cos, sin, attention_mask, pk, pv)
            new.append((k, v))
        hidden = self.norm(x)
        # logits in fp32 whatever the weights' precision: fp16 logits round to 1/256 near 7, where a greedy pick
        # between two items often differs by less; the one-token step and the verify pass would then break such
        # ties by their own rounding (an H100 bench list once differed from AR at one token so)
        return F.linear(hidden.float(), self.lm_head.weight.float()), hidden, new


class Draft(nn.Module):
    """PAD-Rec draft: an EAGLE-style draft plus gated item-slot and draft-step embeddings; with use_slot and
    use_step off it is the plain EAGLE draft, with use_gates off both signals are added as they are."""

    def __init__(self, cfg: DraftConfig, target: Target):
        super().__init__()
        if cfg.hidden_size != target.cfg.hidden_size or cfg.vocab_size != target.cfg.vocab_size:
            from padrec_runtime.errors import CheckpointError
            raise CheckpointError(
                f"draft | hidden {cfg.hidden_size}, vocab {cfg.vocab_size} | target has hidden "
                f"{target.cfg.hidden_size}, vocab {target.cfg.vocab_size} | train the draft against this target")
        self.cfg = cfg
        H = cfg.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.slot_embed = nn.Embedding(cfg.n_slots, H)
        self.alpha = nn.Parameter(torch.tensor(cfg.alpha_init))
        self.step_embed = nn.Embedding(cfg.max_steps, H)
        self.gate = nn.Linear(2 * H, H, bias=True)
        self.layer = DecoderLayer(H, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.rms_eps)
        self.norm = RMSNorm(H, cfg.rms_eps)
        nn.init.normal_(self.slot_embed.weight, std=0.02)
        nn.init.normal_(self.step_embed.weight, std=0.02)
        # the target's embedding and head, frozen and shared (not part of the draft checkpoint)
        self.embed_tokens = target.embed_tokens
        self.lm_head = target.lm_head

    def trainable_state(self) -> dict:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}

    def empty_past(self, batch: int, device=None, dtype=None):
        c = self.cfg
        dtype = dtype or self.fc.weight.dtype
        z = torch.zeros(batch, c.n_kv_heads, 0, c.head_dim, device=device, dtype=dtype)
        return [(z, z)]

    def features(self, hidden_in, input_ids, slot):
        """fc over (token embedding, target feature) plus the slot signal (ids and slots int32 or int64)."""
        e = self.embed_tokens(input_ids).to(hidden_in.dtype)
        x = self.fc(torch.cat([e, hidden_in], dim=-1))
        # a switched-off signal is multiplied by an exact zero, so every draft graph keeps the same inputs
        return x + self.slot_scale(x.dtype) * self.slot_embed(slot)

    def slot_scale(self, dtype):
        """The slot signal's coefficient: the learnt alpha, 1 without gates, an exact 0 when the signal is off."""
        if not self.cfg.use_slot:
            return 0.0
        return self.alpha.to(dtype) if self.cfg.use_gates else 1.0

    def step_signal(self, x, s, pre=None):
        """What the step embedding s adds to x: s gated by the context (pre: the gate's pre-activation, when the
        caller has it already) or, without gates, s itself."""
        if not self.cfg.use_gates:
            return s
        if pre is None:
            pre = self.gate(torch.cat([x, s], dim=-1))
        return torch.sigmoid(pre) * s

    def forward(self, hidden_in, input_ids, position_ids, step, slot, attention_mask, past):
        h, k, v = self.layer_out(hidden_in, input_ids, position_ids, step, slot, attention_mask, past)
        return self.lm_head(self.norm(h)).float(), h, [(k, v)]

    def layer_out(self, hidden_in, input_ids, position_ids, step, slot, attention_mask, past):
        """The decoder layer's output (the draft's feature, before the head) and the new KV."""
        x = self.layer_in(hidden_in, input_ids, step, slot)
        cos, sin = rope_heads(position_ids, self.cfg, x.dtype)
        (pk, pv), = past
        attention_mask = full_mask(attention_mask, input_ids, past)
        return self.layer(x, cos, sin, attention_mask, pk, pv)

    def layer_in(self, hidden_in, input_ids, step, slot):
        """The decoder layer's input: features plus the step signal."""
        x = self.features(hidden_in, input_ids, slot)
        s = self.step_embed(step.long().clamp(0, self.cfg.max_steps - 1))  # int64: CUDA has no int32 Clip
        if self.cfg.use_step:
            return x + self.step_signal(x, s)
        return x + 0.0 * s


class ChainGrammar(nn.Module):
    """The list grammar as device tables (Catalogue.chain_tables) and its two moves, for graphs that pick tokens
    themselves: the additive mask of what may come next, and the state after a token. A row's state: `at`, its
    table row; `left`, items still to write; `banned` (B, n_nodes + 2), 0 / -inf per trie node
    (ListConstraint.chain_ban). An item a token completes is banned from then on, with every prefix it used up,
    as ListConstraint does, so a greedy pick under this mask is the constrained argmax of the host walk."""

    def __init__(self, catalogue):
        super().__init__()
        from padrec_runtime.grammar import EOS, SEP
        t = catalogue.chain_tables()
        # int64 tables: gathers index with them directly, no cast per step
        self.register_buffer("next_node", torch.as_tensor(t["next_node"]).long(), persistent=False)
        self.register_buffer("row_of", torch.as_tensor(t["row_of"]), persistent=False)
        self.register_buffer("is_leaf", torch.as_tensor(t["is_leaf"]), persistent=False)
        # each leaf's item path from depth 1, right-aligned (the nodes a completed item may use up); NOT_CHILD
        # before it and for other nodes
        self.register_buffer("path_of", torch.as_tensor(catalogue.leaf_paths()), persistent=False)
        lay = catalogue.layout
        ends = torch.zeros(2, lay.vocab_size)
        ends[0, EOS] = ends[1, SEP] = float("-inf")  # row 0: items left, no eos; row 1: none left, no separator
        self.register_buffer("ends", ends, persistent=False)
        # the item slot of the token that leads to each trie node (a token's slot: its place in its item)
        self.register_buffer("node_slot", torch.as_tensor(t["node_slot"]), persistent=False)
        fixed = lay.token_slots()  # per_level: each token's slot from its id alone (catch-up pairs without a state)
        if fixed is not None:
            self.register_buffer("slot_of", torch.as_tensor(fixed), persistent=False)

    def allowed_bias(self, at, left, banned, ends):
        """(nxt, bias), both (B, V): the trie node each token leads to from each row's state, and 0 where the
        grammar allows the token, -inf elsewhere (ends: the `ends` table in banned's dtype)."""
        nxt = self.next_node[at]
        return nxt, banned.gather(1, nxt) + torch.where((left <= 0)[:, None], ends[1], ends[0])

    def token_slot(self, nxt, tok):
        """(B,) the item slot of each row's token tok (B, 1), written from the state `nxt` came from."""
        return self.node_slot[nxt.gather(1, tok).flatten()]

    def advance(self, nxt, tok, left, banned):
        """The state (at, left, banned) after each row writes tok (B, 1) from the state `nxt` came from."""
        reached = nxt.gather(1, tok).flatten()
        return self.row_of[reached], left - self.is_leaf[reached], self.ban_completed(banned, reached)

    def ban_completed(self, banned, reached):
        """`banned` (B, n_nodes + 2) after the rows whose token reached a leaf completed its item: the leaf and
        every prefix node on its path with no other free item go to -inf (the grammar's `chain_ban` with the
        item used). A prefix node is used up when its child on the path is and no other child is free."""
        path = self.path_of[reached]  # (B, D) the leaf's path, right-aligned; NOT_CHILD (always banned) elsewhere
        B, D = path.shape
        kids = self.next_node[self.row_of[path[:, :-1]]]  # (B, D-1, V): each inner path node's children
        free = (banned.gather(1, kids.flatten(1)) == 0).view(B, D - 1, -1).sum(-1)  # (B, D-1), path child too
        used_up = [self.is_leaf[reached].bool()]  # deepest first: the leaf itself
        for d in range(D - 2, -1, -1):
            used_up.append(used_up[-1] & (free[:, d] <= 1))
        flags = torch.stack(used_up[::-1], dim=1)  # (B, D) in path order
        return banned.scatter(1, path, torch.where(flags, float("-inf"), banned.gather(1, path)))


class DraftChain(ChainGrammar):
    """A greedy draft round in one graph: the catch-up pass over newly committed positions, then K-1 draft
    steps, each token the argmax over what the list grammar allows after the tokens before it. One engine
    call per round instead of K: no host round trip between draft steps.

    The grammar rides in the graph: the catalogue trie as tables (Catalogue.chain_tables), the trie nodes
    whose items are all used (history and list so far) as a per-row input, and eos only once the list is
    complete. An item the chain completes is banned for its later steps, with every prefix it used up, as
    the step-by-step loop's grammar does: the two propose the same tokens, so acceptance is the same.
    Inputs as the draft's (step is 0 for catch-up and j for the j-th chain step) plus, per row, `last`: the
    index of its last real catch-up token, `node`: the table row after that token, `left`: items still to
    write, and `banned` (B, n_nodes + 2): ListConstraint.chain_ban. Outputs the K proposed tokens and the new
    KV of the catch-up tokens followed by the K-1 chain steps (the runtime keeps only the catch-up's).
    max_len: the draft cache's length, for `forward_in_place` (the round over a whole cache written in place).
    """

    def __init__(self, draft: Draft, catalogue, steps: int, max_len: int = 0, report_finite: bool = False):
        super().__init__(catalogue)
        if steps < 1:
            raise ValueError("steps must be >= 1")
        # report_finite: also return `finite` (B,) bool, false where a step's logits are NaN / inf at a token the
        # grammar allows (the exported graph's flag: the runtime raises on it as it does for the draft's logits)
        self.draft, self.steps, self.report_finite = draft, steps, report_finite
        if max_len:  # forward_in_place: GroupQueryAttention's rotary tables (padding of a bucket may run past)
            cos, sin = rotary_cache(draft.cfg, max_len + 256)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, hidden_in, input_ids, position_ids, slot, last, node, left, banned, attention_mask, past):
        d = self.draft
        B = input_ids.shape[0]
        step = torch.zeros_like(input_ids)
        h, k, v = d.layer_out(hidden_in, input_ids, position_ids, step, slot, attention_mask, past)
        (pk, pv), = past
        idx = last.long().view(B, 1)
        pick = idx[:, :, None]
        pos = position_ids.gather(1, idx)
        row = attention_mask.gather(1, pick.expand(-1, -1, attention_mask.shape[-1]))  # (B, 1, past + seq)
        rep = d.cfg.n_heads // d.cfg.n_kv_heads
        bias = torch.where(row, 0.0, float("-inf")).to(h.dtype)[:, None].expand(-1, -1, rep, -1)
        zero = torch.zeros_like(bias[..., :1])
        kv = {"keys": torch.cat([pk, k], dim=2), "values": torch.cat([pv, v], dim=2), "bias": bias}
        if self.steps > 1:  # every chain step's rotary tables in one pass (positions pos + 1 .. pos + K - 1)
            ahead = pos + torch.arange(1, self.steps, dtype=pos.dtype, device=pos.device)
            cos, sin = rope_heads(ahead, d.cfg, h.dtype)
            cos, sin = cos.split(1, dim=1), sin.split(1, dim=1)

        def layer(j, x):  # the draft layer for chain step j over the cache, the catch-up and steps before j
            kv["bias"] = torch.cat([kv["bias"], zero], dim=-1)
            out, k1, v1 = d.layer(x, cos[j - 1], sin[j - 1], kv["bias"], kv["keys"], kv["values"])
            kv["keys"], kv["values"] = torch.cat([kv["keys"], k1], dim=2), torch.cat([kv["values"], v1], dim=2)
            return out

        tokens, finite = self.propose(h, idx, node, left, banned, layer)
        S = pk.shape[2]
        return (tokens,) + ((finite,) if self.report_finite else ()) + (kv["keys"][:, :, S:], kv["values"][:, :, S:])

    def forward_in_place(self, hidden_in, input_ids, slot, last, node, left, banned, seqlens_k, total, cache_k,
                         cache_v):
        """The same round over the draft's whole cache (B, kv heads, max_len, D) with GroupQueryAttention, which
        writes the catch-up tokens' KV at positions seqlens_k - seq + 1 .. and chain step j's right behind the
        row's last real catch-up token (over padding). Returns the tokens and the updated cache."""
        d = self.draft
        B = input_ids.shape[0]
        x = d.layer_in(hidden_in, input_ids, torch.zeros_like(input_ids), slot)
        cos, sin = self.rotary_cos.to(x.dtype), self.rotary_sin.to(x.dtype)
        h, ck, cv = d.layer.forward_in_place(x, seqlens_k, total, cache_k, cache_v, cos, sin)
        cache = {"k": ck, "v": cv}
        # (B,) int32: the position of each row's last real catch-up token (T from the device, see device_size)
        at_last = seqlens_k - device_size(input_ids, 1).to(seqlens_k.dtype) + 1 + last

        def layer(j, x):
            out, cache["k"], cache["v"] = d.layer.forward_in_place(x, at_last + j, total, cache["k"], cache["v"],
                                                                   cos, sin)
            return out

        tokens, finite = self.propose(h, last.long().view(B, 1), node, left, banned, layer)
        return (tokens,) + ((finite,) if self.report_finite else ()) + (cache["k"], cache["v"])

    def propose(self, h, idx, node, left, banned, layer):
        """The K greedy grammar-masked draft tokens from the catch-up's output h (at each row's index idx);
        layer(j, x) runs the draft layer for step j."""
        d = self.draft
        h = h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1]))  # (B, 1, H) at each row's last catch-up token
        # in the model's dtype: the grammar's bias is 0 or -inf, exact. flatten, not [:, 0]: in the exported
        # graph a Flatten / Reshape to a constant shape aliases its input where an index is a Gather kernel
        logits = d.lm_head(d.norm(h)).flatten(1)
        at, left = node.long(), left.long()  # (B,) table row after the last committed token, items to go
        banned = banned.to(h.dtype)
        ends = self.ends.to(h.dtype)
        # Draft.features for a chain token, split: fc over (embedding, feature) is a per-token table (its
        # embedding half and fc's bias, folded at export), plus the slot signal of the token's place in its item
        # (a per-slot table, indexed through the trie node the token leads to), plus a matmul of the feature
        H = h.shape[-1]
        w = d.fc.weight.to(h.dtype)
        alpha = d.slot_scale(h.dtype)
        token_part = F.linear(d.embed_tokens.weight.to(h.dtype), w[:, :H], d.fc.bias.to(h.dtype))
        slot_part = alpha * d.slot_embed.weight.to(h.dtype)  # (n_slots, H)
        w_hidden = w[:, H:]
        # the step signal: the gate's half over the step embedding is a constant per step (folded at export),
        # so a step costs one matmul for it, not a concat and a wider one
        use_step, gated = d.cfg.use_step, d.cfg.use_gates
        if use_step:
            steps = d.step_embed.weight.to(h.dtype)[[min(j, d.cfg.max_steps - 1) for j in range(self.steps)]]
        if use_step and gated:
            wg = d.gate.weight.to(h.dtype)
            gate_x, gate_s = wg[:, :H], F.linear(steps, wg[:, H:], d.gate.bias.to(h.dtype))  # (K, H) per step
        tokens, finite = [], None
        for j in range(1, self.steps + 1):
            nxt, bias_v = self.allowed_bias(at, left, banned, ends)  # (B, V) node each token leads to, its mask
            tok = torch.argmax(logits + bias_v, dim=-1, keepdim=True)  # (B, 1) int64
            tokens.append(tok)
            if self.report_finite:  # bias_v is 0 where the grammar allows a token, -inf elsewhere
                ok = (torch.isfinite(logits) | torch.isinf(bias_v)).all(dim=-1)
                finite = ok if finite is None else finite & ok
            if j == self.steps:
                break
            slot = self.token_slot(nxt, tok)
            at, left, banned = self.advance(nxt, tok, left, banned)
            x = (token_part[tok.flatten()] + slot_part[slot])[:, None] + F.linear(h, w_hidden)
            if use_step:
                x = x + d.step_signal(x, steps[j], F.linear(x, gate_x) + gate_s[j] if gated else None)
            h = layer(j, x)
            logits = d.lm_head(d.norm(h)).flatten(1)
        return torch.cat(tokens, dim=1).to(torch.int32), finite
