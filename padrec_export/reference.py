"""PyTorch reference decoding: the runtime's draft-verify loop driven by the torch models themselves."""
from __future__ import annotations

import numpy as np
import torch

from padrec_runtime.loop import DecodeConfig, DecodeSession, Generation, max_cache_len
from padrec_runtime.cache.host import KV_INPUT, KV_OUTPUT, CacheSpec, HostCalls, KVRunner, attention_mask
from padrec_runtime.grammar import BOS, ListConstraint

from .models import Draft, DraftChain, Target


def _tensor(v: np.ndarray, dtype) -> torch.Tensor:
    if v.dtype.kind == "f" or v.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(v))


def _call(model, feeds: dict, n_layers: int, draft: bool) -> dict:
    """Run a torch model on numpy feeds named as in the engine; float feeds take the model's dtype."""
    dtype = next(model.parameters()).dtype
    t = {k: _tensor(v, dtype) for k, v in feeds.items()}
    past = [(t[KV_INPUT[0] % i], t[KV_INPUT[1] % i]) for i in range(n_layers)]
    with torch.inference_mode():
        if draft:
            logits, hidden, new = model(t["hidden_in"], t["input_ids"], t["position_ids"], t["step"], t["slot"],
                                        t["attention_mask"], past)
        else:
            logits, hidden, new = model(t["input_ids"], t["position_ids"], t["attention_mask"], past)
    out = {"logits": logits.numpy(), "hidden": hidden.float().numpy()}
    for i, (k, v) in enumerate(new):
        out[KV_OUTPUT[0] % i], out[KV_OUTPUT[1] % i] = k.float().numpy(), v.float().numpy()
    return out


def _call_chain(chain: DraftChain, feeds: dict) -> dict:
    """Run a DraftChain on numpy feeds named as in the draft_chain engine."""
    dtype = next(chain.parameters()).dtype
    t = {k: _tensor(v, dtype) for k, v in feeds.items()}
    with torch.inference_mode():
        tokens, *finite, k, v = chain(t["hidden_in"], t["input_ids"], t["position_ids"], t["slot"], t["last"],
                                      t["node"], t["left"], torch.from_numpy(np.asarray(feeds["banned"], np.float16)),
                                      t["attention_mask"], [(t[KV_INPUT[0] % 0], t[KV_INPUT[1] % 0])])
    out = {"tokens": tokens.numpy(), KV_OUTPUT[0] % 0: k.float().numpy(), KV_OUTPUT[1] % 0: v.float().numpy()}
    return {**out, "finite": finite[0].numpy()} if finite else out  # with report_finite, as the engine


def next_token_logits(target: Target, ids) -> np.ndarray:
    """(V,) float32 logits after a whole token sequence, one causal pass without a cache."""
    ids = torch.as_tensor(np.asarray(ids, dtype=np.int32))[None]
    T = ids.shape[1]
    with torch.inference_mode():
        logits, _, _ = target(ids, torch.arange(T, dtype=torch.int32)[None],
                              torch.tril(torch.ones(T, T, dtype=torch.bool))[None], target.empty_past(1))
    return logits[0, -1].float().numpy()


def target_runner(target: Target, batch: int, max_len: int) -> KVRunner:
    c = target.cfg
    spec = CacheSpec(c.n_layers, c.n_kv_heads, c.head_dim, max_len)
    return KVRunner(lambda f: _call(target, f, c.n_layers, False), spec, batch)


def draft_runner(draft: Draft, batch: int, max_len: int, chain: DraftChain | None = None) -> KVRunner:
    """A host-cache runner over the draft; with `chain`, the fused draft-chain graph runs over the same cache."""
    c = draft.cfg
    spec = CacheSpec(1, c.n_kv_heads, c.head_dim, max_len)
    runner = KVRunner(lambda f: _call(draft, f, 1, True), spec, batch)
    if chain is not None:
        runner.attach("draft_chain", lambda f: _call_chain(chain, f), {"chain_steps": chain.steps})
    return runner


class TorchKVRunner(HostCalls):
    """The KVRunner interface over a torch model whose KV cache stays on its device (PyTorch eager baseline).

    Cache: (layers, key|value, batch, kv_heads, max_len, head_dim); each call attends over the whole buffer
    with a mask, writes the new tokens' KV behind each row's entries, and `commit` gathers accepted paths.
    """

    def __init__(self, model, batch: int, max_len: int, draft: bool, chain: DraftChain | None = None):
        c = model.cfg
        p = next(model.parameters())
        self.model, self.draft, self.device, self.dtype = model, draft, p.device, p.dtype
        self.chain, self.chain_steps = chain, chain.steps if chain is not None else 0
        n_layers = 1 if draft else c.n_layers
        self.spec = CacheSpec(n_layers, c.n_kv_heads, c.head_dim, max_len)
        self.cache = torch.zeros(n_layers, 2, batch, c.n_kv_heads, max_len, c.head_dim, device=p.device, dtype=p.dtype)
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.scratch = 0

    def forward(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None) -> dict:
        S = self.spec.max_len
        B, T = feeds["input_ids"].shape
        mask = attention_mask(self.lengths, self.scratch, new_mask, S, S)
        dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, non_blocking=True)  # noqa: E731
        past = [(self.cache[i, 0, :B], self.cache[i, 1, :B]) for i in range(self.spec.n_layers)]
        with torch.inference_mode():
            if graph == "draft_chain":
                tokens, *finite, k, v = self.chain(dev(feeds["hidden_in"]).to(self.dtype), dev(feeds["input_ids"]),
                                          dev(feeds["position_ids"]), dev(feeds["slot"]), dev(feeds["last"]),
                                          dev(feeds["node"]), dev(feeds["left"]),
                                          dev(np.asarray(feeds["banned"], np.float16)), dev(mask), past)
                self._write([(k[:, :, :T], v[:, :, :T])], T)
                self.scratch += T
                out = {"tokens": tokens.cpu().numpy()}
                return {**out, "finite": finite[0].cpu().numpy()} if finite else out  # as the engine's outputs
            if self.draft:
                logits, hidden, new = self.model(dev(feeds["hidden_in"]).to(self.dtype), dev(feeds["input_ids"]),
                                                 dev(feeds["position_ids"]), dev(feeds["step"]), dev(feeds["slot"]),
                                                 dev(mask), past)
            else:
                logits, hidden, new = self.model(dev(feeds["input_ids"]), dev(feeds["position_ids"]), dev(mask), past)
            self._write(new, T)
            out = {"logits": logits.float().cpu().numpy(), "hidden": hidden.float().cpu().numpy()}
        self.scratch += T
        return out

    def _write(self, new: list, T: int) -> None:
        """Every row's new (B, H, T, D) keys and values behind its entries: one indexed write per layer (a
        per-row loop costs B launches a layer, which made the eager baseline launch-bound)."""
        B = new[0][0].shape[0]
        rows = torch.arange(B, device=self.device)[:, None]
        cols = torch.as_tensor(self.lengths[:B, None] + self.scratch + np.arange(T), device=self.device)
        for i, (k, v) in enumerate(new):  # cache[i, j][rows, :, cols] is (B, T, H, D)
            self.cache[i, 0][rows, :, cols] = k.transpose(1, 2).to(self.dtype)
            self.cache[i, 1][rows, :, cols] = v.transpose(1, 2).to(self.dtype)

    def commit(self, select) -> None:
        """Gather each row's accepted entries to just behind its committed ones, all rows in one indexed copy.
        Rows accept different counts: the short ones repeat their last (destination, source) pair, which
        rewrites the same value, and rows accepting nothing copy position 0 onto itself."""
        counts = np.array([len(idx) for idx in select], dtype=np.int64)
        width = int(counts.max(initial=0))
        if width:
            B = len(select)
            src = np.zeros((B, width), np.int64)
            dst = np.zeros((B, width), np.int64)
            for b, idx in enumerate(select):
                if counts[b]:
                    n = int(self.lengths[b])
                    pad = width - counts[b]
                    src[b] = n + np.concatenate([idx, np.repeat(idx[-1:], pad)])
                    dst[b] = n + np.concatenate([np.arange(counts[b]), np.repeat(counts[b] - 1, pad)])
            rows = torch.arange(B, device=self.device)[:, None]
            src_t, dst_t = (torch.as_tensor(a, device=self.device) for a in (src, dst))
            self.cache[:, :, rows, :, dst_t] = self.cache[:, :, rows, :, src_t]
            self.lengths[:B] += counts
        self.scratch = 0

    def discard(self) -> None:
        self.scratch = 0


class OracleDraftRunner(KVRunner):
    """A draft that is the target itself: at draft position i it runs the target on token i+1.

    Its proposals are exactly the target's next-token choices, so every proposal must be accepted.
    The draft never sees the prompt's first token, which is always <bos>; the oracle adds it.
    """

    def __init__(self, target: Target, batch: int, max_len: int):
        self.inner = target_runner(target, batch, max_len + 1)
        self.spec, self.lengths = self.inner.spec, self.inner.lengths
        self.scratch = 0
        self.chain_steps = 0

    def forward(self, feeds: dict, new_mask: np.ndarray, graph: str | None = None) -> dict:
        B = feeds["input_ids"].shape[0]
        if self.inner.lengths.max() == 0 and self.inner.scratch == 0:
            self.inner.forward({"input_ids": np.full((B, 1), BOS, np.int32),
                                "position_ids": np.zeros((B, 1), np.int32)}, np.ones((B, 1, 1), bool))
            self.inner.commit([[0]] * B)
        out = self.inner.forward({"input_ids": feeds["input_ids"], "position_ids": feeds["position_ids"] + 1},
                                 new_mask)
        self.scratch = self.inner.scratch
        return out

    def commit(self, select) -> None:
        self.inner.commit(select)
        self.scratch = 0

    def discard(self) -> None:
        self.inner.discard()
        self.scratch = 0


def reference_generate(target: Target, draft: Draft | None, histories: list, constraint: ListConstraint,
                       cfg: DecodeConfig, oracle: bool = False, fused_chain: bool = True,
                       torch_cache: bool | None = None) -> Generation:
    """Decode with the PyTorch models; `oracle` swaps the draft for the target itself (tests). Greedy chain
    rounds use the fused draft chain (as the runtime does with a draft_chain graph) unless fused_chain=False.
    torch_cache: KV caches as torch tensors on the models' device (TorchKVRunner); default: when not on CPU."""
    session = reference_session(target, draft, histories, constraint, cfg, oracle, fused_chain, torch_cache)
    while not session.done:
        session.step()
    return session.result()


def reference_session(target: Target, draft: Draft | None, histories: list, constraint: ListConstraint,
                      cfg: DecodeConfig, oracle: bool = False, fused_chain: bool = True,
                      torch_cache: bool | None = None) -> DecodeSession:
    """The prefilled DecodeSession `reference_generate` steps to the end (tools that watch each round use it)."""
    cat = constraint.catalogue
    prompts = [cat.prompt(h) for h in histories]
    n = max_cache_len(max(len(p) for p in prompts), constraint, cfg)
    B = len(prompts)
    on_device = next(target.parameters()).device.type != "cpu" if torch_cache is None else torch_cache
    t = TorchKVRunner(target, B, n, False) if on_device else target_runner(target, B, n)
    if cfg.speculate == "off":
        d = None
    elif oracle:
        d = OracleDraftRunner(target, B, n)
    else:
        chain = None
        if fused_chain and cfg.speculate == "chain" and cfg.sampling.greedy:
            chain = DraftChain(draft, cat, cfg.draft_steps, report_finite=True)
            chain = chain.to(next(draft.parameters()).device).eval()
        d = TorchKVRunner(draft, B, n, True, chain) if on_device else draft_runner(draft, B, n, chain)
    return DecodeSession(t, d, prompts, histories, constraint, cfg)
