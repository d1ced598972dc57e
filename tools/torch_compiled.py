"""The strongest PyTorch baseline a user would write, over our own target and draft: a static KV cache (gpt-fast
style), fixed shapes compiled with `torch.compile` (CUDA graphs), greedy AR and the same chain speculation as
ours, the list grammar on the device. Also a command that times the target step at LLM shapes:

    PYTHONPATH=$PWD python tools/torch_compiled.py steps --shapes qwen-0.5b,qwen-1.5b,qwen-7b --dtype bf16 --out DIR

mode None runs every function eagerly (CPU tests); "reduce-overhead" and "max-autotune" compile them with CUDA
graphs. Lists are lossless by construction: the target's pick is the argmax over what the grammar allows, the
draft's tokens are kept up to the first one the target would not have written.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from padrec_export.gqa import rotate
from padrec_export.models import ChainGrammar, DraftChain, Target, TargetConfig, rope
from padrec_export.sizes import SIZES
from padrec_runtime.errors import InputError
from padrec_runtime.grammar import EOS, PAD, ListConstraint

MODES = ("reduce-overhead", "max-autotune")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# The released Qwen2.5 0.5B and 1.5B share the input embedding with the output head (7B does not). The step timings
# keep that layout, so their weights weigh the published sizes; the targets we train keep the two apart.
TIED_HEAD = frozenset({"qwen-0.5b", "qwen-1.5b"})


def make_target(name: str, dtype: torch.dtype, device, seed: int = 0, vocab_size: int = 1100) -> Target:
    """A Target of the shape sizes.SIZES[name], as the Qwen2.5 family builds it (q/k/v biases, rope theta 1e6,
    the head tied where TIED_HEAD says), with random weights, made in `dtype` on `device` directly (no
    full-precision copy on the host): N(0, 0.02) matrices and biases, norms at one."""
    s, tie = SIZES[name], name in TIED_HEAD
    cfg = TargetConfig(vocab_size=vocab_size, hidden_size=s.hidden, n_layers=s.layers, n_heads=s.heads,
                       n_kv_heads=s.kv_heads, intermediate_size=s.intermediate, rope_theta=1e6, qkv_bias=True,
                       tie_embeddings=tie)
    with torch.device("meta"):
        target = Target(cfg)
    target = target.to_empty(device=device).to(dtype).eval()
    if tie:  # to_empty gives every parameter its own storage
        target.lm_head.weight = target.embed_tokens.weight
    if torch.device(device).type == "meta":  # sizes only
        return target.requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param_name, p in target.named_parameters():
            if param_name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return target.requires_grad_(False)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def floor_ms(n_bytes: int, bandwidth_gbs: float) -> float:
    """The weight-bandwidth floor of one step: every weight read once at the card's copy bandwidth."""
    return n_bytes / (bandwidth_gbs * 1e9) * 1e3


def copy_bandwidth_gbs(device, n_bytes: int = 1 << 30) -> float:
    """Device copy bandwidth (read + write) over an n_bytes buffer (1 GiB: past every cache)."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    return 2 * x.numel() * 4 * 10 / (time.perf_counter() - t0) / 1e9


def compiled(fn, mode: str | None):
    """fn under torch.compile in `mode` (whole graph, static shapes: one graph per shape), or fn itself."""
    if mode is None:
        return fn
    if mode not in MODES:
        raise InputError(f"compile mode | got {mode!r} | expected one of {', '.join(MODES)} or None (eager)")
    import torch._dynamo
    import torch._inductor.config as inductor
    # gpt-fast's settings; each shape (batch, tokens per call, prompt bucket) and each model compiles once
    inductor.coordinate_descent_tuning = True
    inductor.triton.unique_kernel_names = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def cudagraph_skips() -> int:
    """Graphs torch.compile ran without CUDA graphs so far in this process (0 when all were captured)."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


def compile_cache_counts() -> dict:
    """Inductor's FX-graph cache hits and misses so far in this process (a hit: a graph compiled before, by any
    process of this user, e.g. tools/compile_cache.py, loaded instead of compiled)."""
    from torch._dynamo.utils import counters
    return {k: int(counters["inductor"][f"fxgraph_cache_{k}"]) for k in ("hit", "miss")}


def _static(t: torch.Tensor) -> torch.Tensor:
    """Mark a state buffer's address as fixed, so CUDA graphs write it in place instead of copying it."""
    if t.is_cuda:
        import torch._dynamo
        torch._dynamo.mark_static_address(t)
    return t


def _fuse(linears: list, bias: bool) -> tuple[nn.Parameter, torch.Tensor | None]:
    """One weight (and bias) for several projections of one input; each module's weight becomes a view of it,
    so the weights stay in memory once."""
    w = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
    b = torch.cat([m.bias for m in linears]) if bias else None
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(w.data[start:start + n], requires_grad=False)
        start += n
    return w, b


class StaticKV(nn.Module):
    """Our decoder layers over a preallocated KV cache (layers, batch, kv heads, max_len, head dim). A call writes
    its tokens' KV at their positions and attends to every cache position up to its own: a rejected draft's KV is
    overwritten by the next tokens at those positions (rollback by position), and padding never shows."""

    def __init__(self, layers: list, cfg, max_batch: int, max_len: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)  # the model's own modules, not copies
        p = next(self.layers.parameters())
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # q|k|v and gate|up as one matmul each (the modules' weights become views of the fused ones)
        self.qkv_w, self.mlp_w, qkv_b = nn.ParameterList(), nn.ParameterList(), []
        for layer in layers:
            a = layer.self_attn
            w, b = _fuse([a.q_proj, a.k_proj, a.v_proj], a.q_proj.bias is not None)
            self.qkv_w.append(w)
            qkv_b.append(b)
            self.mlp_w.append(_fuse([layer.gate_proj, layer.up_proj], False)[0])
        for i, b in enumerate(qkv_b):
            self.register_buffer(f"qkv_b{i}", b, persistent=False)
        shape = (len(layers), max_batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.register_buffer("k", _static(torch.zeros(shape, dtype=p.dtype, device=p.device)), persistent=False)
        self.register_buffer("v", _static(torch.zeros(shape, dtype=p.dtype, device=p.device)), persistent=False)
        cos, sin = rope(torch.arange(max_len, device=p.device)[None], cfg.head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos[0, 0].to(p.dtype), persistent=False)  # (max_len, head_dim)
        self.register_buffer("sin", sin[0, 0].to(p.dtype), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_len, device=p.device), persistent=False)

    def forward(self, x, positions):
        """x (B, T, H) at positions (B, T) int64 -> the last layer's output (B, T, H)."""
        B, T, _ = x.shape
        rep = self.n_heads // self.n_kv
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # (B, T, 1, D)
        # each query sees the cache up to its own position; query heads of a group share one K/V head, so the
        # rep heads of a group are stacked as rep * T queries against it (no repeated K/V)
        mask = (self.key_pos <= positions[:, :, None]).repeat(1, rep, 1)[:, None]  # (B, 1, rep * T, max_len)
        rows = torch.arange(B, device=x.device)[:, None]
        for i, layer in enumerate(self.layers):
            x = self._layer(i, layer, x, cos, sin, mask, rows, positions)
        return x

    def _layer(self, i, layer, x, cos, sin, mask, rows, positions):
        B, T, _ = x.shape
        nq, nkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = F.linear(layer.input_layernorm(x), self.qkv_w[i], getattr(self, f"qkv_b{i}"))
        qkv = qkv.view(B, T, nq + 2 * nkv, D)
        q, k = rotate(qkv[:, :, :nq + nkv], cos, sin).split([nq, nkv], dim=2)
        keys, values = self.k[i, :B], self.v[i, :B]
        keys[rows, :, positions] = k  # (B, T, kv heads, D) at each row's positions
        values[rows, :, positions] = qkv[:, :, nq + nkv:]
        q = q.transpose(1, 2).reshape(B, nkv, (nq // nkv) * T, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + layer.self_attn.o_proj(out.reshape(B, nq, T, D).transpose(1, 2).reshape(B, T, nq * D))
        gate, up = F.linear(layer.post_attention_layernorm(x), self.mlp_w[i]).chunk(2, dim=-1)
        return x + layer.down_proj(F.silu(gate) * up)


class CompiledTarget(nn.Module):
    """Our Target over a static KV cache: `step(tokens (B, T), positions (B, T))` -> (fp32 logits (B, T, V),
    hidden (B, T, H)), compiled per shape (T = 1 for AR, K + 1 for a verify pass); `prefill` the same for prompt
    shapes. Moves the target to `dtype` (in place, as Module.to does)."""

    def __init__(self, target: Target, max_batch: int, max_len: int, dtype: torch.dtype, mode: str | None):
        super().__init__()
        self.target = target.to(dtype).eval().requires_grad_(False)
        self.mode, self.max_batch, self.max_len, self.cfg = mode, max_batch, max_len, target.cfg
        self.kv = StaticKV(list(target.layers), target.cfg, max_batch, max_len)
        # logits in fp32, as Target.forward: fp16 logits would break near-ties by their own rounding
        self.register_buffer("head32", target.lm_head.weight.detach().float(), persistent=False)
        self.step = compiled(self.forward, mode)

    def warm_up(self, tokens=(1, 8), batch: int = 1, calls: int = 3) -> float:
        """Compile and capture the step for each number of tokens (the first calls of a shape do); seconds taken."""
        dev, t0 = self.head32.device, time.perf_counter()
        with torch.no_grad():
            for T in tokens:
                ids = torch.zeros(batch, T, dtype=torch.long, device=dev)
                positions = torch.arange(T, device=dev).expand(batch, T).contiguous()  # the strides timed later
                for _ in range(calls):
                    self.step(ids, positions)
        _sync(dev)
        return time.perf_counter() - t0

    def prefill(self, tokens, positions):
        """Prompts (B, P) at positions 0..P-1 (each row's padding after its prompt: the next tokens overwrite its
        KV): the compiled step at the prompt's shape."""
        return self.step(tokens, positions)

    def forward(self, tokens, positions):
        x = self.kv(self.target.embed_tokens(tokens), positions)
        hidden = self.target.norm(x)
        return F.linear(hidden.float(), self.head32), hidden


class CompiledDraft(nn.Module):
    """Our Draft over a static KV cache, running DraftChain's greedy round: the catch-up pass over (target feature,
    next token) pairs at their positions (step 0, their slots), then K-1 chain steps, each token the argmax over
    what the grammar allows (DraftChain.propose, the same code as the exported draft_chain graph)."""

    def __init__(self, draft, catalogue, steps: int, max_batch: int, max_len: int, dtype: torch.dtype,
                 mode: str | None):
        super().__init__()
        if catalogue.layout.token_slots() is None:
            raise InputError(f"compiled draft | the {catalogue.layout.kind} layout: a catch-up token's slot is its place "
                             "in its item, not its id | expected the per_level layout | use the runtime for this one")
        p = next(draft.parameters())
        self.chain = DraftChain(draft.to(dtype).eval().requires_grad_(False), catalogue, steps).to(p.device)
        self.steps, self.mode = steps, mode
        self.kv = StaticKV([draft.layer], draft.cfg, max_batch, max_len)

    def forward(self, hidden_in, tokens, positions, last, at, left, banned):
        """Catch-up pairs (B, T) at positions (B, T), each row's last real one at `last` (B,); the grammar state
        after it (at, left, banned) -> the K proposed tokens (B, K) int64."""
        d, B = self.chain.draft, tokens.shape[0]
        x = d.layer_in(hidden_in, tokens, torch.zeros_like(tokens), self.chain.slot_of[tokens])
        h = self.kv(x, positions)
        idx = last.view(B, 1)
        at_last = positions.gather(1, idx)  # chain step j runs at the position after at_last + j - 1
        tokens, _ = self.chain.propose(h, idx, at, left, banned, lambda j, x: self.kv(x, at_last + j))
        return tokens.long()


@dataclass
class Lists:
    """Greedy lists of one call and what it took."""

    tokens: list  # per row, the list's tokens (eos included)
    tau: float  # tokens committed per target pass after the prefill (1 for AR)
    rounds: int  # target passes after the prefill


class Decoder(nn.Module):
    """Greedy constrained lists on the device: `ar(histories)` and, with a draft, `speculate(histories)` (chain
    rounds: the draft proposes K tokens, the target verifies K + 1 in one pass, the longest agreeing prefix and
    the target's next pick are kept). The grammar is ChainGrammar's tables: a pick is a gather and an argmax, no
    host walk per token. Every piece of state lives in fixed buffers the compiled functions update in place; the
    host only checks, once a round, whether every list is done."""

    def __init__(self, target: CompiledTarget, draft: CompiledDraft | None, constraint: ListConstraint):
        super().__init__()
        self.target, self.draft, self.constraint = target, draft, constraint
        self.grammar = draft.chain if draft is not None else ChainGrammar(constraint.catalogue)
        self.K = draft.steps if draft is not None else 0
        cat, dev = constraint.catalogue, target.head32.device
        if len(set(cat.item_depth.tolist())) != 1:  # `ar` writes list_length() tokens, unchecked
            raise InputError(f"compiled decoder | the {cat.layout.kind} layout's items vary in length | expected "
                             "items of one length | use the runtime for this layout")
        self.grammar.to(dev)
        B, K = target.max_batch, self.K
        n_nodes = cat.n_nodes
        buffers = {"root": (B,), "pos": (B,), "at": (B,), "left": (B,), "seq": (B, target.max_len),
                   "committed": (B,), "live_rounds": (B,), "proposed": (B, K)}
        for name, shape in buffers.items():
            self.register_buffer(name, _static(torch.zeros(shape, dtype=torch.long, device=dev)), persistent=False)
        self.register_buffer("banned", _static(torch.zeros(B, n_nodes + 2, device=dev)), persistent=False)
        self.register_buffer("done", _static(torch.zeros(B, dtype=torch.bool, device=dev)), persistent=False)
        self.register_buffer("ends32", self.grammar.ends.float(), persistent=False)
        self.register_buffer("ahead", torch.arange(K + 1, device=dev), persistent=False)
        mode = target.mode
        self._prefill_ar = compiled(self._prefill, mode)
        self._prefill_spec = compiled(self._prefill_draft, mode)
        self._ar = compiled(self._ar_step, mode)
        self._spec = compiled(self._spec_round, mode)

    # -- the host side: prompts in, lists out ---------------------------------------------------------------------
    def warm_up(self, histories: list) -> float:
        """Compile and capture every function for this batch size and prompt bucket; seconds taken."""
        t0 = time.perf_counter()
        for _ in range(3):
            self.ar(histories)
            if self.draft is not None:
                self.speculate(histories)
        return time.perf_counter() - t0

    def ar(self, histories: list) -> Lists:
        B, lens = self._start(histories, spec=False)
        for _ in range(self.constraint.list_length() - 1):  # every list has the same length: no check per token
            self._ar(B)
        return self._lists(B, lens, rounds=self.constraint.list_length() - 1, spec=False)

    def speculate(self, histories: list) -> Lists:
        if self.draft is None:
            raise InputError("speculate | no draft | build the Decoder with a CompiledDraft, or use ar()")
        B, lens = self._start(histories, spec=True)
        rounds = 0
        while not bool(self.done[:B].all()):  # the one host sync of a round
            self._spec(B)
            rounds += 1
        return self._lists(B, lens, rounds, spec=True)

    def _start(self, histories: list, spec: bool):
        """Validate, reset the state to each row's start, run the prefill (and the draft's prompt round)."""
        con, cat, t = self.constraint, self.constraint.catalogue, self.target
        B = len(histories)
        if not 1 <= B <= t.max_batch:
            raise InputError(f"histories | got {B} | expected 1..{t.max_batch} (max_batch) | split the batch")
        states = [con.start(h) for h in histories]
        prompts = [cat.prompt(h) for h in histories]
        lens = [len(p) for p in prompts]
        need = max(lens) + con.list_length() + 2 * self.K + 1
        if need > t.max_len:
            raise InputError(f"max_len | got {t.max_len} | expected >= {need} for prompts of {max(lens)} tokens, "
                             f"{con.list_length()}-token lists and K={self.K} | build with a larger max_len")
        P = min(-(-max(lens) // 16) * 16, t.max_len)  # prompt bucket: few shapes, few graphs
        ids = np.full((B, P), PAD, np.int64)
        for b, p in enumerate(prompts):
            ids[b, :len(p)] = p
        dev = self.root.device
        ids = torch.from_numpy(ids).to(dev)
        with torch.no_grad():
            self.at[:B] = torch.as_tensor([cat.chain_row(s) for s in states], device=dev)
            self.left[:B] = con.n_items
            self.banned[:B] = torch.from_numpy(np.stack([con.chain_ban(s) for s in states]).astype(np.float32))
            self.done[:B] = False
            self.committed[:B] = 0
            self.live_rounds[:B] = 0
            self.seq[:B, :P] = ids
            positions = torch.arange(P, device=dev).expand(B, P).contiguous()
            last = torch.as_tensor(lens, device=dev) - 1
            (self._prefill_spec if spec else self._prefill_ar)(ids, positions, last)
        return B, lens

    def _lists(self, B: int, lens: list, rounds: int, spec: bool) -> Lists:
        n = self.constraint.list_length()
        seq = self.seq[:B].cpu().numpy()
        tokens = [seq[b, m:m + n].tolist() for b, m in enumerate(lens)]
        if not spec:
            return Lists(tokens, 1.0, rounds)
        live = int(self.live_rounds[:B].sum())
        return Lists(tokens, float(self.committed[:B].sum()) / max(live, 1), rounds)

    # -- the compiled functions: fixed shapes, state updated in place --------------------------------------------
    def _pick(self, logits, B):
        """Each row's constrained greedy token (B, 1) after its state, and the table row it leads from."""
        nxt, bias = self.grammar.allowed_bias(self.at[:B], self.left[:B], self.banned[:B], self.ends32)
        return torch.argmax(logits + bias, dim=-1, keepdim=True), nxt

    def _commit_one(self, B, tok, nxt, pos):
        """Write token tok (B, 1) at positions pos (B,) and advance the grammar: it is the new root."""
        at, left, banned = self.grammar.advance(nxt, tok, self.left[:B], self.banned[:B])
        self.at[:B], self.left[:B], self.banned[:B] = at, left, banned
        self.root[:B], self.pos[:B] = tok[:, 0], pos
        self.seq[:B].scatter_(1, pos[:, None], tok)

    def _prefill(self, ids, positions, last):
        """The target over the prompts (B, P); each row's first token from its logits at `last`."""
        B = ids.shape[0]
        logits, hidden = self.target.forward(ids, positions)
        row = logits.gather(1, last[:, None, None].expand(-1, 1, logits.shape[-1]))[:, 0]
        tok, nxt = self._pick(row, B)
        self._commit_one(B, tok, nxt, last + 1)
        return hidden, tok

    def _prefill_draft(self, ids, positions, last):
        """The prefill, then the draft's first round over the prompt: the pairs (feature i, token i + 1), the
        first chosen token after the last prompt feature."""
        B = ids.shape[0]
        hidden, tok = self._prefill(ids, positions, last)
        nxt_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).scatter(1, last[:, None], tok)
        self.proposed[:B] = self.draft(hidden, nxt_ids, positions, last, self.at[:B], self.left[:B], self.banned[:B])

    def _ar_step(self, B: int):
        logits, _ = self.target.forward(self.root[:B, None], self.pos[:B, None])
        tok, nxt = self._pick(logits[:, 0], B)
        self._commit_one(B, tok, nxt, self.pos[:B] + 1)

    def _spec_round(self, B: int):
        """One round: verify the proposed chain, keep its agreeing prefix and the target's next pick (rows already
        done change nothing), let the draft catch up on them and propose the next chain."""
        live = ~self.done[:B]
        draft, p = self.proposed[:B], self.pos[:B]  # (B, K): overwritten last, by the next chain
        ids = torch.cat([self.root[:B, None], draft], dim=1)  # (B, K + 1): root, then the draft's tokens
        positions = p[:, None] + self.ahead
        logits, hidden = self.target.forward(ids, positions)
        n_ok, bonus, bonus_ok = self._accept(B, ids, logits, live)
        # committed tokens in verify order: the accepted draft tokens, then the bonus; PAD after them
        slot = self.ahead[None]
        ext = torch.cat([draft, torch.full_like(draft[:, :1], PAD)], dim=1)
        committed = torch.where(slot < n_ok[:, None], ext,
                                torch.where((slot == n_ok[:, None]) & bonus_ok[:, None], bonus, PAD))
        n_new = n_ok + bonus_ok.long()
        after = positions + 1
        self.seq[:B].scatter_(1, after, torch.where(live[:, None], committed, self.seq[:B].gather(1, after)))
        last = committed.gather(1, (n_new - 1).clamp(min=0)[:, None])[:, 0]
        self.root[:B] = torch.where(live, last, self.root[:B])
        self.pos[:B] = torch.where(live, p + n_new, p)
        self.committed[:B] += torch.where(live, n_new, 0)
        self.live_rounds[:B] += live.long()
        self.done[:B] = self.done[:B] | ~bonus_ok | (bonus[:, 0] == EOS)
        # the draft's pairs: (target feature, next token) along the kept path, the last one at n_ok
        self.proposed[:B] = self.draft(hidden, committed, positions, n_ok, self.at[:B], self.left[:B],
                                       self.banned[:B])

    def _accept(self, B: int, ids, logits, live):
        """The greedy walk of a verify pass over ids (B, K + 1): the target's constrained pick at every position
        (the grammar state after each draft token along the chain), draft tokens kept while the target picks
        them and no eos came before, then the bonus pick. Advances live rows' grammar state past the kept tokens
        and the bonus; returns (kept draft tokens (B,), bonus (B, 1), whether there is a bonus (B,))."""
        K, g = self.K, self.grammar
        at, left, banned = self.at[:B], self.left[:B], self.banned[:B]
        states, picks = [], []
        for i in range(K + 1):
            nxt, bias = g.allowed_bias(at, left, banned, self.ends32)
            states.append((at, left, banned, nxt))
            picks.append(torch.argmax(logits[:, i] + bias, dim=-1))
            if i < K:
                at, left, banned = g.advance(nxt, ids[:, i + 1:i + 2], left, banned)
        picks = torch.stack(picks, dim=1)  # (B, K + 1)
        agree = (picks[:, :K] == ids[:, 1:]) & (ids[:, :K] != EOS)
        n_ok = agree.long().cumprod(dim=1).sum(dim=1)
        bonus_ok = ids.gather(1, n_ok[:, None])[:, 0] != EOS  # no bonus after an accepted eos
        bonus = picks.gather(1, n_ok[:, None])
        rows = torch.arange(B, device=ids.device)
        at_a, left_a, banned_a, nxt_a = (torch.stack([s[j] for s in states])[n_ok, rows] for j in range(4))
        at_b, left_b, banned_b = g.advance(nxt_a, bonus, left_a, banned_a)
        self.at[:B] = torch.where(live, torch.where(bonus_ok, at_b, at_a), self.at[:B])
        self.left[:B] = torch.where(live, torch.where(bonus_ok, left_b, left_a), self.left[:B])
        keep = (live & bonus_ok)[:, None]
        self.banned[:B] = torch.where(live[:, None], torch.where(keep, banned_b, banned_a), self.banned[:B])
        return n_ok, bonus, bonus_ok


# -- timing ---------------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats: int = 7, inner: int = 20, warm: int = 3) -> float:
    """Median over `repeats` of the mean ms of `inner` back-to-back calls (after `warm` calls)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - t0) / inner * 1e3)
    return float(np.median(times))


def step_times(target: CompiledTarget, tokens=(1, 8), at: int | None = None, repeats: int = 7) -> dict:
    """ms of one target step at batch 1 for each number of tokens, its tokens at positions `at`.. (default: the
    middle of the cache, so attention reads a realistic past); the first calls compile and capture."""
    dev = target.head32.device
    at = target.max_len // 2 if at is None else at
    out = {}
    with torch.no_grad():
        for T in tokens:
            ids = torch.zeros(1, T, dtype=torch.long, device=dev)
            positions = (at + torch.arange(T, device=dev))[None]
            out[f"step_ms_{T}"] = time_ms(lambda: target.step(ids, positions), dev, repeats)
    return out


# -- the `steps` command ---------------------------------------------------------------------------------------------
def card(device) -> str:
    return torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else (platform.processor() or "cpu")


def time_shape(name: str, dtype: torch.dtype, device, modes: list, max_len: int, vocab: int, seed: int = 0) -> dict:
    """One shape: random weights, then per compile mode the target step at 1 and 8 tokens (batch 1)."""
    target = make_target(name, dtype, device, seed, vocab)
    return {"shape": {**asdict(SIZES[name]), "tie": name in TIED_HEAD}, "weight_bytes": weight_bytes(target),
            "modes": time_modes(target, dtype, device, modes, max_len, name)}


def time_modes(target: Target, dtype: torch.dtype, device, modes: list, max_len: int, label: str = "",
               at: int | None = None) -> dict:
    """mode -> the target's step at 1 and 8 tokens (batch 1) compiled in that mode, with its compile time."""
    res = {}
    for mode in modes:
        skips = cudagraph_skips()
        ct = CompiledTarget(target, 1, max_len, dtype, mode)
        compile_s = ct.warm_up((1, 8))
        res[mode or "eager"] = {**step_times(ct, at=at), "compile_s": compile_s,
                                "cudagraph_skips": cudagraph_skips() - skips}
        log(label, mode or "eager", json.dumps(res[mode or "eager"]))
        del ct
        torch._dynamo.reset()
    return res


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def steps_main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="torch_compiled.py steps", description="target step times, random weights")
    ap.add_argument("--shapes", default="qwen-0.5b,qwen-1.5b,qwen-7b", help=f"of {', '.join(SIZES)}")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--modes", default=",".join(MODES), help="compile modes; 'eager' for none")
    ap.add_argument("--max-len", type=int, default=256, help="KV cache positions")
    ap.add_argument("--vocab", type=int, default=1100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True, help="directory for torch_compiled_steps.json")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SIZES]
    if unknown:
        raise InputError(f"--shapes | got {unknown} | expected names of {', '.join(SIZES)}")
    modes = [None if m == "eager" else m for m in args.modes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_cuda = torch.device(args.device).type == "cuda"
    bw = copy_bandwidth_gbs(args.device, 1 << 30 if on_cuda else 1 << 26)
    report = {"card": card(args.device), "device": args.device, "torch": torch.__version__, "dtype": args.dtype,
              "max_len": args.max_len, "vocab": args.vocab, "copy_bandwidth_gb_s": bw, "shapes": {}}
    for name in shapes:
        res = time_shape(name, DTYPES[args.dtype], args.device, modes, args.max_len, args.vocab)
        res["floor_ms"] = floor_ms(res["weight_bytes"], bw)
        for m in res["modes"].values():
            m.update({f"x_floor_{k[8:]}": m[k] / res["floor_ms"] for k in list(m) if k.startswith("step_ms_")})
        report["shapes"][name] = res
        (out / "torch_compiled_steps.json").write_text(json.dumps(report, indent=2) + "\n")  # after every shape
        if on_cuda:
            torch.cuda.empty_cache()
    log("wrote", out / "torch_compiled_steps.json")
    return report


if __name__ == "__main__":
    if sys.argv[1:2] != ["steps"]:
        sys.exit("usage: python tools/torch_compiled.py steps --shapes ... --dtype bf16|fp16 --out DIR")
    try:
        steps_main(sys.argv[2:])
    except InputError as exc:  # the command line's boundary: one line, exit 1
        sys.exit(f"torch_compiled.py: {exc}")
