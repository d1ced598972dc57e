"""Speculative sampling keeps the target's distribution: chi-square against the enumerated list law."""

import numpy as np
import pytest
from scipy.stats import chi2

import padrec_runtime.loop.state as decode
from padrec_runtime.loop.accept import ChainSampler
from padrec_export.reference import next_token_logits, reference_generate
from padrec_export.tiny import TinySpec, tiny_setup
from padrec_runtime.loop import DecodeConfig
from padrec_runtime.grammar import LAYOUT_KINDS, ListConstraint
from padrec_runtime.loop.sampling import SamplingConfig, allowed_logits, distribution

# per layout, a seed whose list law is spread enough for every case (at least 6 lists, none above 0.9)
SPECS = {"per_level": TinySpec(seed=4, levels=2, codebook=3, n_items=6, hidden=32, heads=2, kv_heads=1),
         "shared": TinySpec(seed=8, levels=2, codebook=3, n_items=6, hidden=32, heads=2, kv_heads=1, kind="shared"),
         "digits": TinySpec(seed=7, levels=2, codebook=12, n_items=6, hidden=32, heads=2, kv_heads=1,
                            kind="digits")}  # codes 10 and 11 among them: items of 4 to 6 tokens
SPEC = SPECS["per_level"]
HISTORY = [1000]
N_SAMPLES = 3000


def exact_law(target, con, sampling):
    """Probability of every complete list, by enumerating the grammar and running the target."""
    prompt = con.catalogue.prompt(HISTORY)
    law = {}

    def walk(prefix, state, prob):
        if state.done:
            law[tuple(prefix)] = prob
            return
        logits = next_token_logits(target, np.concatenate([prompt, prefix]))
        allowed = con.allowed(state)
        p = distribution(allowed_logits(logits, allowed, "target"), sampling)
        for tok, pt in zip(allowed, p):
            if pt > 0:
                walk(prefix + [int(tok)], con.advance(state, tok), prob * pt)

    walk([], con.start(HISTORY), 1.0)
    return law


def sample_counts(target, draft, con, cfg):
    counts = {}
    for seed in range(N_SAMPLES // 500):
        g = reference_generate(target, draft, [HISTORY] * 500, con,
                               DecodeConfig(speculate=cfg.speculate, draft_steps=cfg.draft_steps,
                                            tree_topk=cfg.tree_topk, tree_size=cfg.tree_size,
                                            sampling=cfg.sampling, seed=seed))
        for toks in g.tokens:
            counts[tuple(toks)] = counts.get(tuple(toks), 0) + 1
    return counts, g


def chi_square_p(law, counts):
    """p-value of the counts under the law; bins with small expectation are pooled."""
    n = sum(counts.values())
    assert set(counts) <= set(law), "sampled a list the law gives probability 0"
    big = [k for k in law if law[k] * n >= 5]
    exp = [law[k] * n for k in big] + [n * (1 - sum(law[k] for k in big))]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    if exp[-1] < 1e-9:
        exp, obs = exp[:-1], obs[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return chi2.sf(stat, len(exp) - 1)


def make_models(kind: str):
    cat, target, draft = tiny_setup(SPECS[kind])
    return ListConstraint(cat, n_items=2), target, draft


@pytest.fixture(scope="module", params=LAYOUT_KINDS)
def models(request):
    """(constraint, target, draft) of each token layout."""
    return make_models(request.param)


@pytest.fixture(scope="module")
def per_level_models():
    return make_models("per_level")


CASES = [
    DecodeConfig(speculate="off", sampling=SamplingConfig(greedy=False)),
    DecodeConfig(speculate="chain", draft_steps=3, sampling=SamplingConfig(greedy=False)),
    DecodeConfig(speculate="chain", draft_steps=4, sampling=SamplingConfig(greedy=False, temperature=1.7, top_k=2)),
    DecodeConfig(speculate="tree", draft_steps=3, tree_topk=2, tree_size=5,
                 sampling=SamplingConfig(greedy=False, temperature=0.8, top_p=0.9)),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.speculate}-T{c.sampling.temperature}")
def test_speculative_sampling_keeps_target_law(models, cfg):
    con, target, draft = models
    law = exact_law(target, con, cfg.sampling)
    assert len(law) >= 6 and max(law.values()) < 0.9, "law too peaked to tell samplers apart"
    counts, g = sample_counts(target, draft, con, cfg)
    if cfg.speculate != "off":
        assert 1.0 < g.tau, "no proposal was ever accepted; the test would not exercise acceptance"
    assert chi_square_p(law, counts) > 1e-3


def _accept_all(logits, root, chain, constraint, cfg, rng):
    """A wrong rule: every draft token accepted (the output follows the draft, not the target)."""
    tokens = [n.token for n in chain]
    state = chain[-1].state if chain else root.state
    return decode.Verdict(list(range(len(chain) + 1)), tokens, state) if state.done else \
        decode.Verdict(list(range(len(chain) + 1)), tokens + [int(constraint.allowed(state)[0])],
                       constraint.advance(state, constraint.allowed(state)[0]))


def _accept_ratio_inverted(logits, root, chain, constraint, cfg, rng):
    """A subtly wrong rule: resample from p instead of the residual max(0, p - q) after a rejection."""
    path, tokens, state = [0], [], root.state
    for i, n in enumerate(chain):
        p = distribution(allowed_logits(logits[i], n.allowed, "target"), cfg.sampling)
        k = int(np.searchsorted(n.allowed, n.token))
        if rng.random() < min(1.0, p[k] / n.q[k]):
            path.append(i + 1)
            tokens.append(n.token)
            state = n.state
            continue
        k = int(rng.choice(len(p), p=p))
        tokens.append(int(n.allowed[k]))
        return decode.Verdict(path, tokens, constraint.advance(state, n.allowed[k]))
    allowed = constraint.allowed(state)
    if state.done:
        return decode.Verdict(path, tokens, state)
    k = int(rng.choice(len(allowed), p=distribution(allowed_logits(logits[len(chain)], allowed, "t"), cfg.sampling)))
    tokens.append(int(allowed[k]))
    return decode.Verdict(path, tokens, constraint.advance(state, allowed[k]))


@pytest.mark.parametrize("wrong_rule", [_accept_all, _accept_ratio_inverted])
def test_wrong_acceptance_rule_fails_the_test(per_level_models, monkeypatch, wrong_rule):
    con, target, draft = per_level_models
    cfg = CASES[1]
    law = exact_law(target, con, cfg.sampling)
    def accept(self, scored, b, root, tree):  # the wrong rule in the sampler's place
        return wrong_rule(scored.logits[b], root, tree, self.constraint, cfg, self.rng)
    monkeypatch.setattr(ChainSampler, "accept", accept)
    counts, _ = sample_counts(target, draft, con, cfg)
    assert chi_square_p(law, counts) < 1e-6
