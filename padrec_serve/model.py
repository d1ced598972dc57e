"""The served model's logic: a dynamic batch of requests checked one by one, grouped by params, decoded."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from padrec_runtime.errors import PadrecError

from . import runtime
from padrec_runtime.errors import DeadlineError
from .schema import parse_request

LOG = logging.getLogger("padrec.serve")


@dataclass(frozen=True)
class Reply:
    """What one request gets: its outputs, or the error that stopped it."""

    outputs: dict | None  # name -> array, rows stacked
    error: Exception | None = None

    @property
    def outcome(self) -> str:
        if self.error is None:
            return "ok"
        if isinstance(self.error, DeadlineError):
            return "deadline"
        return "client_error" if isinstance(self.error, PadrecError) else "server_error"


class ServeModel:
    """One model instance (one Recommender): `__call__` takes the requests of a dynamic batch (name -> array
    dicts) and returns a Reply per request; `on_decoded(batch, tau, rounds, seconds)` sees every runtime call;
    `batch_sizes`: the warmed batch shapes every group is padded up to (runtime.decode; a GPU server's)."""

    def __init__(self, rec, deadline_s: float | None = None, on_decoded=None, batch_sizes: tuple = ()):
        self.rec = rec
        self.batch_sizes = tuple(batch_sizes)
        self.deadline_s = deadline_s
        self.on_decoded = on_decoded
        self.limits = rec.limits
        self.known = {int(i): k for k, i in enumerate(rec.catalogue.item_ids)}
        self.has_draft = "draft" in rec.backends
        self.max_batch = rec.limits["max_batch"]
        self.levels = rec.catalogue.sids.shape[1]

    def __call__(self, requests: list) -> list:
        slots: dict = {}  # (request, row) -> (item_ids, sids, titles, tau) or an exception
        groups = defaultdict(list)
        calibrated = bool(self.rec.plan)
        for r, req in enumerate(requests):
            try:
                jobs = parse_request(req, self.limits, self.known, self.has_draft, calibrated, self.deadline_s)
            except PadrecError as exc:
                slots[(r, 0)] = exc
                continue
            for row, job in enumerate(jobs):
                groups[(job.n_items, job.params)].append(((r, row), job.history))
        for group, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                self._decode_group(group, members[start:start + self.max_batch], slots)
        return [self._reply(r, slots) for r in range(len(requests))]

    def _decode_group(self, group: tuple, members: list, slots: dict) -> None:
        """One runtime call for the group; if it fails, each member alone, so one bad history fails alone
        (a group cut at the deadline is not retried)."""
        try:
            return self._decode(group, members, slots)
        except Exception as exc:
            if len(members) == 1 or isinstance(exc, DeadlineError):
                for key, _ in members:
                    slots[key] = self._logged(exc)
                return
        for member in members:
            try:
                self._decode(group, [member], slots)
            except Exception as exc:
                slots[member[0]] = self._logged(exc)

    @staticmethod
    def _logged(exc: Exception) -> Exception:
        if not isinstance(exc, PadrecError):  # an engine failure: this request gets it, the server goes on
            LOG.error("decode failed", exc_info=exc)
        return exc

    def _decode(self, group: tuple, members: list, slots: dict) -> None:
        n_items, params = group
        out = runtime.decode(self.rec, [h for _, h in members], n_items, params, self.batch_sizes)
        for b, (key, _) in enumerate(members):
            slots[key] = (out.item_ids[b], out.sids[b], out.titles[b], out.tau)
        if self.on_decoded is not None:
            self.on_decoded(len(members), out.tau, out.rounds, out.time_s)

    def _reply(self, r: int, slots: dict) -> Reply:
        """Request r's outputs: its rows stacked (lists padded with -1 / "" to the longest), or its error."""
        rows = [v for (q, _), v in sorted(slots.items(), key=lambda kv: kv[0]) if q == r]
        errors = [v for v in rows if isinstance(v, Exception)]
        if errors:
            return Reply(None, errors[0])
        n = max(len(v[0]) for v in rows)
        item_ids = np.full((len(rows), n), -1, np.int64)
        sids = np.full((len(rows), n, self.levels), -1, np.int32)
        titles = np.full((len(rows), n), b"", dtype=object)
        for b, (items, s, t, _) in enumerate(rows):
            item_ids[b, :len(items)] = items
            sids[b, :len(items)] = s
            if t is not None:
                titles[b, :len(items)] = [x.encode() for x in t]
        tau = np.array([[v[3]] for v in rows], np.float32)
        return Reply({"item_ids": item_ids, "sids": sids, "titles": titles, "tau": tau})
