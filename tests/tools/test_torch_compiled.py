"""The compiled PyTorch baseline (tools/torch_compiled.py) on CPU, eager, fp32: its greedy lists equal the PyTorch
reference's and the runtime's, its speculation equals its AR, its device grammar allows exactly what
ListConstraint allows, its static-cache steps equal the model's own forward, and its `steps` command writes
what the GPU run reports. (The compiled modes run on the GPU machine: tools/gpu_bench.py.)"""
import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
import torch_compiled as tc  # noqa: E402

from padrec_export.models import ChainGrammar  # noqa: E402
from padrec_export.reference import reference_generate  # noqa: E402
from padrec_runtime import DecodeParams, Recommender  # noqa: E402
from padrec_runtime.grammar import EOS, ListConstraint  # noqa: E402
from padrec_runtime.loop import DecodeConfig  # noqa: E402
from tests.conftest import LIMITS  # noqa: E402

MAX_LEN = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes run fastest on one thread (on a busy 2-core machine two threads wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tiny):
    """A private copy of the tiny target and draft (the baseline fuses their projections in place)."""
    cat, target, draft = tiny
    target, draft = copy.deepcopy((target, draft))  # one copy: the draft keeps sharing the target's embedding
    return cat, target, draft


def _histories(cat, seed: int, lens) -> list:
    rng = np.random.default_rng(seed)
    return [rng.choice(cat.item_ids, size=n, replace=False).tolist() for n in lens]


def _decoder(models, K: int = 3, max_batch: int = 4):
    cat, target, draft = models
    con = ListConstraint(cat, n_items=LIMITS.n_items)
    t = tc.CompiledTarget(target, max_batch, MAX_LEN, torch.float32, None)
    d = tc.CompiledDraft(draft, cat, K, max_batch, MAX_LEN, torch.float32, None)
    return tc.Decoder(t, d, con), con


def test_ar_lists_equal_reference_and_runtime(models, engines_master):
    """Batch 1 and a ragged batch: the baseline's AR == the PyTorch reference's AR == the runtime's AR."""
    dec, con = _decoder(models)
    rec = Recommender(engines_master)
    for seed, lens in ((0, [5]), (1, [2, 9, 4]), (2, [12, 1, 7, 3])):
        hist = _histories(models[0], seed, lens)
        ours = dec.ar(hist)
        ref = reference_generate(models[1], models[2], hist, con, DecodeConfig(speculate="off")).tokens
        runtime = [r.tokens for r in rec.recommend(hist, params=DecodeParams(speculate="off")).lists]
        assert ours.tokens == ref == runtime
        assert all(len(t) == con.list_length() and t[-1] == EOS for t in ours.tokens)


@pytest.mark.parametrize("K", [2, 5])
def test_speculation_equals_ar(models, K):
    """Chain rounds (draft K tokens, verify K + 1, keep the agreeing prefix): the same lists as AR, tokens accepted,
    and the same acceptance as the reference loop with the fused draft chain (the same draft round)."""
    dec, con = _decoder(models, K=K)
    for seed, lens in ((3, [6]), (4, [3, 10, 1, 5])):
        hist = _histories(models[0], seed, lens)
        ar, sd = dec.ar(hist), dec.speculate(hist)
        assert sd.tokens == ar.tokens
        ref = reference_generate(models[1], models[2], hist, con, DecodeConfig(speculate="chain", draft_steps=K))
        assert sd.tau == pytest.approx(ref.tau) and sd.tau > 1.0
        assert sd.rounds < con.list_length() - 1


def test_device_grammar_allows_what_list_constraint_allows(tiny):
    """Random walks through whole lists: at every token the mask's allowed set is ListConstraint.allowed and the
    state it advances to agrees (a missed ban would let an item repeat)."""
    cat = tiny[0]
    con = ListConstraint(cat, n_items=8)
    g = ChainGrammar(cat)
    ends = g.ends.float()
    rng = np.random.default_rng(0)
    for hist in _histories(cat, 5, [0, 4, 11]) + _histories(cat, 6, [20]):
        state = con.start(hist)
        at, left = torch.tensor([cat.chain_row(state)]), torch.tensor([con.n_items])
        banned = torch.from_numpy(con.chain_ban(state).astype(np.float32))[None]
        while not state.done:
            nxt, bias = g.allowed_bias(at, left, banned, ends)
            allowed = con.allowed(state)
            assert np.flatnonzero(bias[0].numpy() == 0).tolist() == allowed.tolist()
            tok = int(rng.choice(allowed))
            at, left, banned = g.advance(nxt, torch.tensor([[tok]]), left, banned)
            state = con.advance(state, tok)


def test_static_cache_steps_equal_the_models_forward(tiny):
    """A prefill, two one-token steps and a 4-token verify over the static cache give the logits and hidden
    states of one causal pass of the model over the whole sequence, and a verify after a rejected one rewrites
    its positions (rollback by position)."""
    cat, target, _ = tiny
    target = copy.deepcopy(target)
    seq = torch.as_tensor(cat.prompt(cat.item_ids[:6]), dtype=torch.long)
    extra = torch.tensor([9, 14, 22, 3, 7, 16, 25])
    full = torch.cat([seq, extra])[None]
    T = full.shape[1]
    with torch.no_grad():
        want, hidden, _ = target(full.int(), torch.arange(T)[None].int(), torch.tril(torch.ones(T, T, dtype=torch.bool))[None],
                                 target.empty_past(1))
    ct = tc.CompiledTarget(target, 2, 64, torch.float32, None)
    n = len(seq)
    got, got_h = [], []
    with torch.no_grad():
        out = ct.prefill(full[:, :n], torch.arange(n)[None])
        got.append(out[0]), got_h.append(out[1])
        for i in (n, n + 1):
            out = ct.step(full[:, i:i + 1], torch.tensor([[i]]))
            got.append(out[0]), got_h.append(out[1])
        ct.step(torch.tensor([[5, 6, 7, 8]]), torch.arange(n + 2, n + 6)[None])  # a rejected verify
        out = ct.step(full[:, n + 2:n + 6], torch.arange(n + 2, n + 6)[None])
        got.append(out[0]), got_h.append(out[1])
    got, got_h = torch.cat(got, dim=1), torch.cat(got_h, dim=1)
    assert got.shape == (1, n + 6, want.shape[-1]) and got.dtype == torch.float32
    torch.testing.assert_close(got, want[:, :n + 6], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got_h, hidden[:, :n + 6], atol=2e-4, rtol=1e-4)


def test_decoder_refuses_a_cache_too_short_for_the_list(models):
    cat, target, draft = models
    con = ListConstraint(cat, n_items=LIMITS.n_items)
    dec = tc.Decoder(tc.CompiledTarget(target, 1, 32, torch.float32, None), None, con)
    with pytest.raises(tc.InputError, match=re.escape("max_len | got 32")):
        dec.ar(_histories(cat, 0, [5]))
    with pytest.raises(tc.InputError, match="no draft"):
        dec.speculate(_histories(cat, 0, [1]))


@pytest.mark.parametrize("name, gb", [("qwen-0.5b", 0.72), ("qwen-1.5b", 2.62), ("qwen-7b", 13.1)])
def test_llm_shapes_have_the_published_weight_sizes(name, gb):
    """Qwen2.5 shapes over the 1,100-token vocabulary in 16-bit weigh what the step floors are computed from."""
    target = tc.make_target(name, torch.bfloat16, "meta")
    assert (target.lm_head.weight is target.embed_tokens.weight) == (name in tc.TIED_HEAD)
    assert tc.weight_bytes(target) / 1e9 == pytest.approx(gb, rel=0.005)  # as the sizes are quoted


def test_steps_command_writes_timings_per_shape_and_mode(tmp_path):
    report = tc.steps_main(["--shapes", "tiny", "--dtype", "fp32", "--modes", "eager", "--device", "cpu",
                            "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "torch_compiled_steps.json").read_text())
    assert saved == json.loads(json.dumps(report))
    tiny = saved["shapes"]["tiny"]
    assert saved["card"] and saved["dtype"] == "fp32"
    assert tiny["weight_bytes"] == 4 * sum(p.numel() for p in tc.make_target("tiny", torch.float32, "meta").parameters())
    eager = tiny["modes"]["eager"]
    assert eager["step_ms_1"] > 0 and eager["step_ms_8"] > 0 and eager["cudagraph_skips"] == 0
    assert eager["x_floor_1"] == pytest.approx(eager["step_ms_1"] / tiny["floor_ms"])
