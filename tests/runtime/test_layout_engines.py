"""Engines of every token layout (per_level, shared, digits): the layout read from the manifest, lists equal to
AR in every mode, and the slot inputs the loop feeds the draft equal the items' token positions."""
import json

import numpy as np
import pytest

from padrec_runtime import DecodeParams, Recommender, RuntimeOptions
from padrec_runtime.errors import ManifestError
from padrec_runtime.grammar import PAD
from padrec_runtime.manifest import load_manifest, parse_manifest
from tests.runtime.test_layout import reference_slots

STATIC = RuntimeOptions(device_cache=True, static_shapes=True, in_place=False)


def _histories(cat, seed: int, batch: int) -> list:
    rng = np.random.default_rng(seed)
    return [rng.choice(cat.item_ids, size=n, replace=False).tolist() for n in [1, 4, 7, 11][:batch]]


def test_the_runtime_learns_the_layout_from_the_manifest(layout_engines, tmp_path):
    kind, (cat, _, _), out = layout_engines
    m = load_manifest(out)
    assert m.data["model"]["layout"]["kind"] == kind and m.layout == cat.layout
    rec = Recommender(out)
    assert rec.catalogue.layout.kind == kind and (rec.catalogue.sids == cat.sids).all()
    data = json.loads((out / "manifest.json").read_text())
    data["model"]["layout"]["kind"] = "words"
    with pytest.raises(ManifestError, match=r"layout.kind: got 'words' \| expected one of per_level, shared, digits"):
        parse_manifest(data, out)
    del data["model"]["layout"]["kind"]  # written before layouts were a choice: per_level
    if kind == "per_level":
        assert parse_manifest(data, out).layout == cat.layout
    else:  # the other layouts' vocabularies differ from per_level's: an edited kind cannot slip through
        with pytest.raises(ManifestError, match="model.layout.vocab_size"):
            parse_manifest(data, out)


def test_every_mode_gives_the_ar_lists(layout_engines):
    """Greedy lists equal target-only decoding in every mode: the step-by-step chain, the fused chain graph, the
    tree, device rounds (numpy buffers here; the same code runs on CUDA), in-place graphs and `auto`."""
    kind, (cat, _, _), out = layout_engines
    hist = _histories(cat, 3, 4)
    host, static = Recommender(out), Recommender(out, options=STATIC)
    in_place = Recommender(out, options=RuntimeOptions(device_cache=True, static_shapes=True, in_place=True))
    ar = [r.tokens for r in host.recommend(hist, params=DecodeParams(speculate="off")).lists]
    for lst, h in zip(host.recommend(hist, params=DecodeParams(speculate="off")).lists, hist):
        assert len(set(lst.item_ids)) == 5 and not set(lst.item_ids) & set(h)
    K = host.limits["draft_steps"]
    modes = [dict(speculate="chain", draft_steps=k) for k in (1, 2, K, K + 1)]  # K: the fused chain graph
    modes += [dict(speculate="chain", fused_chain=False), dict(speculate="tree"), dict(speculate="tree", draft_steps=4)]
    taus = []
    for rec, extra in ((host, []), (static, [dict(speculate="chain", device_rounds=True)]),
                       (in_place, [dict(speculate="chain", device_rounds=True)])):
        for params in modes + extra:
            res = rec.recommend(hist, params=DecodeParams(**params))
            assert [r.tokens for r in res.lists] == ar, (kind, params)
            taus.append(res.tau)
    host.calibrate(hist, batches=(1, 4), repeats=1)
    auto = [r.tokens for part in (hist[:1], hist) for r in
            host.recommend(part, params=DecodeParams(speculate="auto")).lists]
    assert auto == ar[:1] + ar
    assert max(taus) > 1.5, "no draft token accepted: the test would not exercise acceptance"


class DraftInputs:
    """A tracer keeping a copy of every draft call's inputs (static buckets bind them)."""

    def __init__(self):
        self.calls = []

    def engine_call(self, call) -> None:
        if call.cache == "draft":
            self.calls.append((call.graph, {k: np.array(v) for k, v in (call.inputs or {}).items()}))


def _check_slots(calls, streams, layout) -> int:
    """Every draft input whose token is in a row's final stream (catch-up pairs: the token after each committed
    position) or on a chain being drafted (step-by-step chain steps) has the stream's slot at its position."""
    refs = [reference_slots(layout, s) for s in streams]
    chains = [[] for _ in streams]  # per row, the draft tokens of the current round so far
    checked = 0
    for graph, ins in calls:
        ids, pos = ins["input_ids"], ins["position_ids"]
        if graph == "draft_chain":
            real = (np.arange(ids.shape[1])[None] <= ins["last"][:, None]) & (ids != PAD)  # PAD: a finished row
            step = np.zeros_like(ids)
        else:
            real, step = ids != PAD, ins["step"]
        for b in range(min(len(streams), ids.shape[0])):
            for t in np.flatnonzero(real[b]):
                p, d = int(pos[b, t]), int(step[b, t])
                if d == 0:  # catch-up: (feature at p, committed token at p + 1)
                    chains[b] = []
                    assert ids[b, t] == streams[b][p + 1]
                    want = refs[b][p + 1]
                else:  # the depth-d token of the round's chain, rooted at position p + 1 - d
                    chains[b].append(int(ids[b, t]))
                    assert len(chains[b]) == d
                    want = reference_slots(layout, list(streams[b][:p + 2 - d]) + chains[b])[-1]
                assert ins["slot"][b, t] == want, (graph, b, p, d)
                checked += 1
    return checked


@pytest.mark.parametrize("params", [dict(speculate="chain", fused_chain=False), dict(speculate="chain"),
                                    dict(speculate="chain", device_rounds=True), dict(speculate="tree")],
                         ids=["chain-steps", "fused-chain", "device-rounds", "tree"])
def test_slot_inputs_are_the_item_positions(layout_engines, params):
    """The item slot the loop feeds the draft - catch-up windows that start inside an item, step-by-step chain
    tokens, the fused chain's inputs and those the device-rounds accept step writes - equals the token's place
    in its item computed from the prompt and final list by definition (`reference_slots`)."""
    kind, (cat, _, _), out = layout_engines
    tracer = DraftInputs()
    rec = Recommender(out, options=STATIC, tracer=tracer)
    hist = _histories(cat, 4, 4)
    rec.recommend(hist, params=DecodeParams(**params))  # the buckets' sessions exist from here on
    tracer.calls = []
    res = rec.recommend(hist, params=DecodeParams(**params))
    streams = [np.concatenate([cat.prompt(h), r.tokens]) for h, r in zip(hist, res.lists)]
    if params.get("speculate") == "tree":  # the tree's own tokens branch: its catch-up pairs are checked
        tracer.calls = [(g, ins) for g, ins in tracer.calls if (ins["step"] == 0).all()]
    assert _check_slots(tracer.calls, streams, cat.layout) > 100
