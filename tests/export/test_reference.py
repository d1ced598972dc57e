"""PyTorch reference decoding: lossless greedy speculation, oracle acceptance, valid lists."""
import numpy as np
import pytest

from padrec_export.reference import reference_generate
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.grammar import EOS, SEP, ListConstraint

CONFIGS = {
    "gqa-L3": TinySpec(seed=1, levels=3, codebook=8, heads=4, kv_heads=2),
    "mha-L4": TinySpec(seed=2, levels=4, codebook=6, heads=4, kv_heads=4, n_items=80),
    "qwen2-L2": TinySpec(seed=3, levels=2, codebook=12, heads=4, kv_heads=1, qkv_bias=True, tie=True, n_items=70),
}
# the other token layouts (every mode of theirs against AR on engines: tests/runtime/test_layout_engines.py)
LAYOUT_CONFIGS = {
    "shared-L3": TinySpec(seed=1, levels=3, codebook=8, heads=4, kv_heads=2, kind="shared"),
    "digits-L3": TinySpec(seed=2, levels=3, codebook=12, heads=4, kv_heads=2, kind="digits"),  # items of 6..9 tokens
}


def _histories(cat, rng, batch):
    lens = rng.permutation([1, 3, 6, 9])[:batch] if batch > 1 else [int(rng.integers(1, 8))]
    return [rng.choice(cat.item_ids, size=int(n), replace=False).tolist() for n in lens]


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    return tiny_setup(CONFIGS[request.param])


_AR: dict = {}  # (model, histories) -> AR tokens: chain and tree compare against the same AR lists


def _ar_tokens(setup, con, hist):
    key = (id(setup[1]), con.n_items, str(hist))
    if key not in _AR:  # the entry keeps its target alive, so no later model can reuse its id
        _AR[key] = (setup[1], reference_generate(setup[1], setup[2], hist, con, DecodeConfig(speculate="off")).tokens)
    return _AR[key][1]


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_greedy_speculation_equals_ar(setup, mode, batch):
    cat, target, draft = setup
    con = ListConstraint(cat, n_items=5)
    accepted_some = False
    for seed in range(6):
        rng = np.random.default_rng(seed)
        hist = _histories(cat, rng, batch)
        ar = _ar_tokens(setup, con, hist)
        sd = reference_generate(target, draft, hist, con,
                                DecodeConfig(speculate=mode, draft_steps=int(rng.integers(2, 6)),
                                             tree_topk=3, tree_size=int(rng.integers(4, 12))))
        assert sd.tokens == ar
        accepted_some |= sd.tau > 1.0
    assert accepted_some, "the draft never got a token accepted; the test would not exercise acceptance"


def test_ragged_batch_rows_accept_differently():
    cat, target, draft = tiny_setup(CONFIGS["gqa-L3"])
    con = ListConstraint(cat, n_items=6)
    hist = _histories(cat, np.random.default_rng(7), 4)
    sd = reference_generate(target, draft, hist, con, DecodeConfig(speculate="chain", draft_steps=4))
    assert len({tuple(c) for c in sd.committed}) > 1
    for b, h in enumerate(hist):
        alone = reference_generate(target, draft, [h], con, DecodeConfig(speculate="chain", draft_steps=4))
        assert alone.tokens[0] == sd.tokens[b]


@pytest.mark.parametrize("K", [1, 3, 5])
def test_oracle_draft_accepts_everything(K):
    cat, target, draft = tiny_setup(CONFIGS["gqa-L3"])
    con = ListConstraint(cat, n_items=6)
    hist = _histories(cat, np.random.default_rng(K), 4)
    # a tree of width one runs the tree code path (selection, ancestor masks, walk) on the oracle's chain
    for mode in ("chain", "tree"):
        g = reference_generate(target, None, hist, con, DecodeConfig(speculate=mode, draft_steps=K, tree_topk=1,
                                                                     tree_size=K), oracle=True)
        for row in g.committed:
            assert row[:-1] == [K + 1] * (len(row) - 1)  # the last round ends at eos, it may be shorter
            assert row[-1] <= K + 1


@pytest.fixture(scope="module", params=list(CONFIGS) + list(LAYOUT_CONFIGS))
def any_setup(request):
    return tiny_setup({**CONFIGS, **LAYOUT_CONFIGS}[request.param])


def test_lists_are_valid(any_setup):
    """Valid lists (catalogue items spelled by the layout, none twice, none from the history), the same in every
    mode: the fused chain (greedy chain rounds) and the tree give AR's."""
    cat, target, draft = any_setup
    con = ListConstraint(cat, n_items=7)
    rng = np.random.default_rng(0)
    hist = _histories(cat, rng, 4)
    ar = reference_generate(target, draft, hist, con, DecodeConfig(speculate="off")).tokens
    for mode in ("chain", "tree"):
        assert reference_generate(target, draft, hist, con, DecodeConfig(speculate=mode)).tokens == ar, mode
    for h, toks in zip(hist, ar):
        items = cat.decode_list(toks)
        assert toks == cat.list_tokens(items).tolist()  # items spelled by the layout, <sep> between, <eos>
        assert toks[-1] == EOS and toks.count(SEP) == 6
        assert len(items) == 7 and len(set(items)) == 7
        assert not set(items) & set(h)


@pytest.mark.parametrize("mode", ["off", "chain", "tree"])
def test_torch_cache_runner_equals_ar(any_setup, mode):
    """The runner the GPU tools decode with (KV caches as torch tensors, the fused chain's outputs unpacked as
    the engine's) gives AR's lists in every layout; it runs here on CPU."""
    cat, target, draft = any_setup
    con = ListConstraint(cat, n_items=5)
    hist = _histories(cat, np.random.default_rng(3), 4)
    ar = reference_generate(target, draft, hist, con, DecodeConfig(speculate="off")).tokens
    sd = reference_generate(target, draft, hist, con, DecodeConfig(speculate=mode, draft_steps=4), torch_cache=True)
    assert sd.tokens == ar
