"""The served model: a dynamic batch of Triton requests checked one by one, grouped by params, decoded."""
from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from padrec_runtime.errors import PadrecError

from . import runtime
from .runtime import DeadlineError
from .schema import parse_request

LOG = logging.getLogger("padrec.serve")


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ServeModel:
    """The infer function of one model instance (one Recommender); Triton calls it with a list of requests."""

    def __init__(self, rec, metrics=None, deadline_s: float | None = None):
        self.rec = rec
        self.metrics = metrics
        self.deadline_s = deadline_s
        self.limits = rec.limits
        self.known = {int(i): k for k, i in enumerate(rec.catalogue.item_ids)}
        self.has_draft = "draft" in rec.backends
        self.max_batch = rec.limits["max_batch"]

    def __call__(self, requests: list) -> list:
        slots: dict = {}  # (request, row) -> Decoded list fields, or an error text
        groups = defaultdict(list)
        for r, req in enumerate(requests):
            try:
                jobs = parse_request(dict(req.items()), self.limits, self.known, self.has_draft,
                                     bool(getattr(self.rec, "plan", None)))
            except PadrecError as exc:
                slots[(r, 0)] = error_text(exc)
                self._count("client_error")
                continue
            for row, job in enumerate(jobs):
                groups[job.params].append(((r, row), job.history))
        for params, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                self._decode_group(params, members[start:start + self.max_batch], slots)
        return [self._response(r, slots) for r in range(len(requests))]

    def _decode_group(self, params, members: list, slots: dict) -> None:
        """One runtime call for the group; if it fails, each member alone, so one bad history fails alone
        (a group cut at the deadline is not retried)."""
        try:
            return self._decode(params, members, slots)
        except Exception as exc:
            if len(members) == 1 or isinstance(exc, DeadlineError):
                for key, _ in members:
                    self._record_failure(key, exc, slots)
                return
        for member in members:
            try:
                self._decode(params, [member], slots)
            except Exception as exc:
                self._record_failure(member[0], exc, slots)

    def _record_failure(self, key, exc: Exception, slots: dict) -> None:
        if isinstance(exc, DeadlineError):
            outcome, text = "deadline", error_text(exc)
        elif isinstance(exc, PadrecError):
            outcome, text = "client_error", error_text(exc)
        else:  # an engine failure: reported to this client, logged; the server goes on
            LOG.error("decode failed", exc_info=exc)
            outcome, text = "server_error", f"ServerError: {error_text(exc)}"
        slots[key] = text
        self._count(outcome)

    def _decode(self, params, members: list, slots: dict) -> None:
        out = runtime.decode(self.rec, [h for _, h in members], params, self.deadline_s)
        for b, (key, _) in enumerate(members):
            slots[key] = (out.item_ids[b], out.sids[b], out.titles[b], out.tau)
        if self.metrics is not None:
            m = self.metrics
            m.batch_size.observe(len(members))
            m.tau.observe(out.tau)
            m.rounds.inc(out.rounds)
            m.decode_s.observe(out.time_s)
        self._count("ok", len(members))

    def _count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc(n)

    def _response(self, r: int, slots: dict) -> dict:
        """Request r's outputs: its rows stacked (lists padded with -1 / "" to the longest), or its error."""
        rows = [v for (q, _), v in sorted(slots.items()) if q == r]
        errors = [v for v in rows if isinstance(v, str)]
        levels = self.rec.catalogue.sids.shape[1]
        if errors:
            # one placeholder item: PyTriton cannot pass zero-size tensors
            return {"item_ids": np.full((1, 1), -1, np.int64), "sids": np.full((1, 1, levels), -1, np.int32),
                    "titles": np.full((1, 1), b"", np.bytes_), "tau": np.zeros((1, 1), np.float32),
                    "error": np.array([[errors[0].encode()]], dtype=np.bytes_)}
        n = max(len(v[0]) for v in rows)
        item_ids = np.full((len(rows), n), -1, np.int64)
        sids = np.full((len(rows), n, levels), -1, np.int32)
        titles = np.full((len(rows), n), b"", dtype=object)
        for b, (items, s, t, _) in enumerate(rows):
            item_ids[b, :len(items)] = items
            sids[b, :len(items)] = s
            if t is not None:
                titles[b, :len(items)] = [x.encode() for x in t]
        tau = np.array([[v[3]] for v in rows], np.float32)
        return {"item_ids": item_ids, "sids": sids, "titles": titles.astype(np.bytes_), "tau": tau,
                "error": np.full((len(rows), 1), b"", dtype=np.bytes_)}
