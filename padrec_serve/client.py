"""A client of `padrec serve` over KServe v2 (tritonclient, HTTP or gRPC): histories in, lists out."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from padrec_runtime.errors import BackendError, InputError, PadrecError

from padrec_runtime.errors import DeadlineError
from .schema import MODEL_NAME

ERRORS = {"InputError": InputError, "DeadlineError": DeadlineError}


@dataclass(frozen=True)
class ServedList:
    """One list as the server returned it."""

    item_ids: list
    sids: list
    titles: list
    tau: float


def _module(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        elif protocol == "http":
            import tritonclient.http as tc
        else:
            raise InputError(f"protocol: got {protocol!r} | expected http or grpc")
    except ImportError as exc:
        raise BackendError(f"padrec client: {exc} | pip install '.[serve]' (in the padrec checkout)") from None
    return tc


def request_inputs(tc, history, n_items=None, **params) -> list:
    """Triton inputs of one request: the history (one row) and the decode parameters that are given."""
    values = {"history": np.array([history], dtype=np.int64)}
    if n_items is not None:
        values["n_items"] = np.array([[n_items]], dtype=np.int32)
    kinds = {"speculate": np.object_, "greedy": np.bool_, "temperature": np.float32, "top_k": np.int32,
             "top_p": np.float32, "seed": np.int64}
    for name, value in params.items():
        if value is not None:
            values[name] = np.array([[value.encode() if name == "speculate" else value]], dtype=kinds[name])
    out = []
    for name, a in values.items():
        dtype = "BYTES" if a.dtype == np.object_ else tc.np_to_triton_dtype(a.dtype)
        x = tc.InferInput(name, list(a.shape), dtype)
        x.set_data_from_numpy(a)
        out.append(x)
    return out


def raise_served(message: str):
    """The PadrecError a server error message names ("InputError: ..."); other errors as PadrecError."""
    kind, _, rest = message.partition(": ")
    raise ERRORS.get(kind, PadrecError)(rest if kind in ERRORS else message) from None


def read_lists(result) -> list:
    """ServedList per row of a response."""
    items, sids = result.as_numpy("item_ids"), result.as_numpy("sids")
    titles, tau = result.as_numpy("titles"), result.as_numpy("tau")
    lists = []
    for b in range(items.shape[0]):
        n = int((items[b] >= 0).sum())
        lists.append(ServedList(items[b, :n].tolist(), sids[b, :n].tolist(),
                                [t.decode() if isinstance(t, bytes) else str(t) for t in titles[b, :n]],
                                float(tau[b, 0])))
    return lists


DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}  # `padrec serve`'s ports
_URL = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def check_url(url) -> None:
    """host:port, as tritonclient takes it (no scheme, a port in 1..65535); else an InputError."""
    m = _URL.fullmatch(url) if isinstance(url, str) else None
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise InputError(f"--url: got {url!r} | expected host:port with no scheme and a port in 1..65535, e.g. "
                         "localhost:8000 (http) or localhost:8001 (grpc)")


class Client:
    """One connection to a server; `recommend` sends one request per history."""

    def __init__(self, url: str = "localhost:8000", protocol: str = "http", timeout_s: float = 60.0):
        check_url(url)
        self.tc = _module(protocol)
        self.protocol, self.url = protocol, url
        kw = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.conn = self.tc.InferenceServerClient(url, **kw)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the server reports the padrec model ready; BackendError after timeout_s."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                if self.conn.is_model_ready(MODEL_NAME):
                    return
            except Exception:  # not listening yet
                pass
            if time.monotonic() > end:
                raise BackendError(f"server: not ready after {timeout_s:g} s | start `padrec serve` or check --url")
            time.sleep(0.5)

    def recommend_one(self, history, n_items=None, **params) -> ServedList:
        try:
            result = self.conn.infer(MODEL_NAME, request_inputs(self.tc, history, n_items, **params))
        except self.tc.InferenceServerException as exc:
            if "failed to connect" in str(exc.message()).lower():  # gRPC: nothing listening
                self._unreachable("connection refused")
            raise_served(exc.message())
        except OSError as exc:  # HTTP: nothing listening (the client's own socket errors)
            self._unreachable(exc.__class__.__name__)
        return read_lists(result)[0]

    def _unreachable(self, why: str):
        raise BackendError(f"server: cannot connect to {self.url} ({why}) | start `padrec serve`, check --url, or "
                           "give --wait-s to wait for a server that is starting") from None

    def recommend(self, histories, n_items=None, **params) -> list:
        return [self.recommend_one(h, n_items, **params) for h in histories]

    def close(self) -> None:
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
