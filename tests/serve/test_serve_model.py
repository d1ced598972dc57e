"""The served model's infer function without Triton: per-request checks, grouping by params, fallback, deadline."""
import numpy as np
import pytest

from padrec_runtime import DecodeParams, Recommender
from padrec_serve.model import ServeModel


@pytest.fixture(scope="module")
def rec(engines_master):
    return Recommender(engines_master)


def request(history, **params):
    """A Triton request as PyTriton hands it over: name -> array with a batch dimension."""
    req = {"history": np.array([history], dtype=np.int64)}
    for name, value in params.items():
        dtype = {"speculate": np.bytes_, "greedy": np.bool_, "temperature": np.float32, "top_p": np.float32}.get(
            name, np.int64)
        req[name] = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
    return req


def listed(rec, history, n_items=None, **params) -> list:
    return rec.recommend([history], n_items, params=DecodeParams(**params)).lists[0].item_ids


def error_of(reply) -> str:
    return "" if reply.error is None else f"{type(reply.error).__name__}: {reply.error}"


def test_mixed_params_in_one_batch_decode_as_separate_calls(rec):
    ids = rec.catalogue.item_ids.tolist()
    hist = [ids[0:3], ids[5:9], ids[10:12]]
    reqs = [request(hist[0], speculate="off", n_items=3), request(hist[1], speculate="chain"),
            request(hist[2], greedy=False, temperature=0.7, seed=11, speculate="off"),
            request(hist[0], speculate="tree", n_items=3)]
    out = ServeModel(rec)(reqs)
    assert [error_of(o) for o in out] == [""] * 4
    want = [listed(rec, hist[0], 3, speculate="off"), listed(rec, hist[1], speculate="chain"),
            listed(rec, hist[2], greedy=False, temperature=0.7, seed=11, speculate="off"),
            listed(rec, hist[0], 3, speculate="off")]
    assert [o.outputs["item_ids"][0].tolist() for o in out] == want


def test_a_history_the_batch_call_rejects_fails_alone(rec):
    """A history that passes the request checks but that the runtime refuses in a batch: the batch call fails,
    each member is decoded alone, and only that member gets the error."""
    ids = rec.catalogue.item_ids.tolist()
    good = [ids[0:2], ids[3:6]]
    model = ServeModel(rec)
    model.known = {**model.known, 99999: -1}  # let an id the catalogue lacks past the request checks
    out = model([request(good[0]), request([99999, ids[7]]), request(good[1])])
    assert "unknown item ids [99999]" in error_of(out[1])
    assert error_of(out[0]) == error_of(out[2]) == ""
    assert out[2].outputs["item_ids"][0].tolist() == listed(rec, good[1], speculate="off")


def objects(*values) -> np.ndarray:
    """A (1, n) object array holding `values` as they are (np.array would unpack a list into a dimension)."""
    a = np.empty((1, len(values)), dtype=object)
    a[0, :] = values
    return a


@pytest.mark.parametrize("bad, words", [
    ({"history": np.zeros((0, 3), np.int64)}, "history: no rows"),
    ({"speculate": objects(["chain"])}, "speculate: got objects other than strings"),
    ({"speculate": objects({"a": 1})}, "speculate: got objects other than strings"),
    ({"speculate": objects(7)}, "speculate: got objects other than strings"),
    ({"n_items": np.array([[3], [3], [3]], np.int32)}, "n_items: got [3, 3, 3] of shape [3, 1] | expected one value "
                                                       "per history row (1)"),
    ({"temperature": np.array([[np.nan]], np.float32), "greedy": np.array([[False]])}, "temperature: got nan"),
])
def test_a_malformed_request_fails_alone_with_a_named_error(rec, bad, words):
    ids = rec.catalogue.item_ids.tolist()
    broken = {**request(ids[3:5]), **bad}
    out = ServeModel(rec)([request(ids[0:2]), broken, request(ids[6:8])])
    assert words in error_of(out[1]) and out[1].outcome == "client_error"
    assert error_of(out[0]) == error_of(out[2]) == ""
    assert out[2].outputs["item_ids"][0].tolist() == listed(rec, ids[6:8], speculate="chain")


def test_a_setting_equal_in_every_row_is_one_value_even_when_it_is_nan(rec):
    """Two NaN rows are one value (refused for being NaN), not two values (refused for differing)."""
    ids = rec.catalogue.item_ids.tolist()
    req = {"history": np.array([ids[0:2], ids[2:4]], np.int64), "greedy": np.array([[False], [False]]),
           "temperature": np.array([[np.nan], [np.nan]], np.float32)}
    out = ServeModel(rec)([req, request(ids[6:8])])
    assert "temperature: got nan | expected a finite value > 0" in error_of(out[0]) and error_of(out[1]) == ""


def test_a_string_setting_may_come_as_bytes_str_or_an_object_array_of_either(rec):
    ids = rec.catalogue.item_ids.tolist()
    forms = [np.array([[b"off"]]), np.array([["off"]]), objects("off"), objects(b"off")]
    out = ServeModel(rec)([{**request(ids[0:2]), "speculate": f} for f in forms])
    assert [error_of(o) for o in out] == [""] * 4
    assert {tuple(o.outputs["item_ids"][0].tolist()) for o in out} == {tuple(listed(rec, ids[0:2], speculate="off"))}


def test_a_request_past_the_deadline_is_cut_with_a_named_error(rec):
    ids = rec.catalogue.item_ids.tolist()
    out = ServeModel(rec, deadline_s=1e-6)([request(ids[0:4]), request(ids[4:6])])
    for o in out:
        assert error_of(o).startswith("DeadlineError: request: past its deadline")
        assert o.outcome == "deadline"
    ok = ServeModel(rec, deadline_s=60)([request(ids[0:4])])
    assert error_of(ok[0]) == ""


def test_a_request_of_several_rows_gives_a_list_per_row(rec):
    ids = rec.catalogue.item_ids.tolist()
    rows = [ids[0:3], ids[7:10]]
    req = {"history": np.array(rows, dtype=np.int64), "n_items": np.array([[4], [4]], dtype=np.int32)}
    out = ServeModel(rec)([req])[0]
    assert out.outputs["item_ids"].tolist() == [listed(rec, h, 4, speculate="chain") for h in rows]
    req["n_items"] = np.array([[4], [3]], dtype=np.int32)
    assert "n_items: got [4, 3]" in error_of(ServeModel(rec)([req])[0])


@pytest.mark.parametrize("n, sizes, want", [(3, (1, 2, 4, 8), 4), (4, (1, 2, 4, 8), 4), (9, (1, 2, 4, 8), 9),
                                            (1, (), 1), (5, (8, 1), 8)])
def test_padded_size(n, sizes, want):
    from padrec_serve.runtime import padded_size
    assert padded_size(n, sizes) == want


@pytest.mark.parametrize("max_batch, device, want", [
    (32, "cuda", (1, 2, 4, 8, 16, 32)), (48, "cuda", (1, 2, 4, 8, 16, 32, 48)), (1, "cuda", (1,)),
    (256, "cuda", (1, 2, 4, 8, 16, 32, 64, 128, 256)), (32, "cpu", (1, 4, 16, 32)), (3, "cpu", (1, 3))])
def test_calibration_batches_are_the_shapes_a_gpu_group_is_padded_to(max_batch, device, want):
    """On CUDA every power of two up to max_batch and max_batch itself, so that no group below max_batch is padded
    to more than twice its rows (a group of 65 under --max-batch 256 is padded to 128, not 256)."""
    from padrec_serve.runtime import calibration_batches, padded_size
    got = calibration_batches(max_batch, device)
    assert got == want
    if device == "cuda":
        assert all(padded_size(n, got) < 2 * n or padded_size(n, got) == max_batch for n in range(1, max_batch + 1))


class Seen:
    """A Recommender wrapper that records the batch size of every runtime call."""

    def __init__(self, rec):
        self.rec, self.batches = rec, []

    def __getattr__(self, name):
        return getattr(self.rec, name)

    def recommend(self, histories, *args, **kwargs):
        self.batches.append(len(histories))
        return self.rec.recommend(histories, *args, **kwargs)


def test_a_group_is_padded_to_a_warmed_batch_shape_and_answers_as_unpadded(rec):
    """A GPU server pads a group of 3 to its warmed shape 4 with copies of its own histories: the runtime sees 4
    rows, each request gets the list it would get alone, and tau is the 3 real rows' (not the copy's)."""
    ids = rec.catalogue.item_ids.tolist()
    hist = [ids[0:3], ids[20:27], ids[40:45]]
    seen = Seen(rec)
    decoded = []
    model = ServeModel(seen, on_decoded=lambda *a: decoded.append(a), batch_sizes=(1, 2, 4, 8))
    out = model([request(h, speculate="chain") for h in hist])
    assert seen.batches == [4]
    assert [o.outputs["item_ids"][0].tolist() for o in out] == [listed(rec, h, speculate="chain") for h in hist]
    unpadded = rec.recommend(hist, params=DecodeParams(speculate="chain"))
    assert out[0].outputs["tau"][0, 0] == pytest.approx(unpadded.tau, rel=1e-6)
    assert decoded[0][0] == 3  # the metrics count real requests


def test_a_group_is_not_padded_past_the_request_token_budget(engines_master):
    """Three requests whose rows fit the budget but whose padded batch of 4 would not: one call of 3 rows, not a
    refused call of 4 and each member again alone."""
    from padrec_runtime import RuntimeOptions
    from padrec_runtime.grammar import ListConstraint
    probe = Recommender(engines_master)
    per_row = ListConstraint(probe.catalogue, n_items=probe.limits["n_items"]).list_length() * (
        1 + probe.limits["draft_steps"])
    seen = Seen(Recommender(engines_master, options=RuntimeOptions(max_request_tokens=3 * per_row)))
    ids = probe.catalogue.item_ids.tolist()
    hist = [ids[0:3], ids[5:8], ids[10:13]]
    out = ServeModel(seen, batch_sizes=(1, 2, 4, 8))([request(h, speculate="chain") for h in hist])
    assert [error_of(o) for o in out] == [""] * 3
    assert seen.batches == [3]
    assert [o.outputs["item_ids"][0].tolist() for o in out] == [listed(probe, h, speculate="chain") for h in hist]
