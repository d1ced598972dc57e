"""Greedy fused-chain rounds queued on the device: each round's next draft chain runs behind its verify pass,
its inputs worked out there from tables the host builds while the verify pass runs."""
from __future__ import annotations

import time
from importlib import resources

import numpy as np

from ..errors import BackendError
from ..grammar import ListConstraint
from .buckets import bucket

# The accept step of a row as one CUDA kernel, shipped as kernels/accept.cu (0 as col0 behind a verify pass;
# behind the prefill, the prompt's last column: the first chain's catch-up pairs the prompt with the tokens
# after it). `accept_reference` is the same computation in array ops (numpy on CPU; the GPU test compares them).
_KERNELS: dict = {}  # array module -> compiled accept kernel (once per process)
_OUT_DTYPES = {"input_ids": np.int32, "slot": np.int32, "last": np.int32, "node": np.int32, "left": np.int32,
               "banned": np.float16}


def accept_reference(xp, logits, dev: dict, tab: dict, K: int) -> dict:
    """The accept step in array ops: logits (B, K+1, V) of the verify pass; dev: the host tables (see
    DeviceRounds.queue) on the device; tab: the catalogue's chain tables. Returns the next chain call's
    inputs: input_ids and slot (B, K+1), last, node, left (B,), banned (B, n_ban)."""
    picks = xp.where(dev["mask"], logits, -xp.inf).argmax(axis=2)  # first maximum, as `ChainPicks`
    accepted = xp.cumprod((picks[:, :K] == dev["tokens"]).astype(np.int64), axis=1).sum(axis=1)
    at = accepted[:, None]
    bonus = xp.take_along_axis(picks, at, axis=1)[:, 0]
    reached = tab["next_node"][xp.take_along_axis(dev["rows"], at, axis=1)[:, 0], bonus]
    rows = xp.arange(len(picks))
    banned = dev["banned"][rows, accepted]  # the state's row, then what a completed item uses up
    done = tab["is_leaf"][reached].astype(bool)
    path, ends = dev["path"][rows, accepted], dev["ends"][rows, accepted] & done[:, None]
    banned[rows[:, None], path] = xp.where(ends, -xp.inf, banned[rows[:, None], path])
    banned[rows, reached] = xp.where(done, -xp.inf, banned[rows, reached])
    slot = tab["node_slot"][tab["next_node"][dev["rows"], picks]]  # each pick's slot from the row it was made at
    return {"input_ids": picks, "slot": slot, "last": accepted, "node": tab["row_of"][reached],
            "left": xp.take_along_axis(dev["left"], at, axis=1)[:, 0] - tab["is_leaf"][reached], "banned": banned}


def write_accepted(ins: dict, out: dict, col0: np.ndarray) -> None:
    """Write `accept_reference`'s result into the chain call's inputs as the kernel does: each row's tokens and
    slots from its column col0 on, `last` counted from there too."""
    rows = np.arange(len(col0))[:, None]
    cols = col0[:, None] + np.arange(out["input_ids"].shape[1])
    for name in ("input_ids", "slot"):
        ins[name][rows, cols] = out[name]
    ins["last"][...] = col0 + out["last"]
    for name in ("node", "left", "banned"):
        ins[name][...] = out[name]


def accept_kernel(xp, logits, dev: dict, tab: dict, ins: dict, col0=None) -> None:
    """`accept_reference` as one CUDA kernel launch on the current stream (K: the verify positions of
    `logits` less one), writing into `ins` (the chain bucket's device inputs: input_ids and slot
    (B, P >= K+1) int32, last, node, left (B,) int32, banned (B, n_ban) float16) as `write_accepted` does;
    col0: (B,) int32 on the device, None for zeros."""
    for name, dtype in _OUT_DTYPES.items():
        if ins[name].dtype != dtype or not ins[name].flags.c_contiguous:
            raise BackendError(f"draft_chain: input {name!r} | got {ins[name].dtype} | expected {np.dtype(dtype)} "
                               "(contiguous) | re-export the engines")
    if logits.dtype != np.float32 or logits.strides[2] != 4:
        raise BackendError(f"target: output 'logits' | got {logits.dtype} | expected float32 | re-export the engines")
    kernel = _KERNELS.get(xp)
    if kernel is None:
        source = resources.files(__package__).joinpath("kernels/accept.cu").read_text()
        kernel = _KERNELS[xp] = xp.RawKernel(source, "padrec_accept")
    B, T1, V = logits.shape
    n_ban, D = dev["banned"].shape[2], dev["path"].shape[2]
    i32, i64 = np.int32, np.int64
    if col0 is None:
        col0 = xp.zeros(B, dtype=i32)
    elif col0.dtype != i32 or col0.shape != (B,):
        raise BackendError(f"accept kernel: col0 | got {col0.dtype} {col0.shape} | expected int32 ({B},)")
    kernel((B,), (256,), (logits, i64(logits.strides[0] // 4), i64(logits.strides[1] // 4), dev["mask"],
                          dev["tokens"], dev["rows"], dev["left"], dev["banned"], dev["path"], dev["ends"],
                          tab["next_node"], tab["row_of"], tab["is_leaf"], tab["node_slot"], col0, i32(T1), i32(V),
                          i32(D), i32(n_ban), i32(ins["input_ids"].shape[1]), ins["input_ids"], ins["slot"],
                          ins["last"], ins["node"], ins["left"], ins["banned"]), shared_mem=4 * T1)


class DeviceRounds:
    """Greedy fused-chain rounds that go from one to the next without waiting for the host.

    While a round's verify pass runs, the host has the round's draft tokens and builds, for every verify
    position, what the list grammar allows there, plus the trie row, items left and `banned` row after each
    possible number of accepted tokens. `queue` sends those tables to the device and queues, behind the
    verify pass: the target's constrained picks (one masked argmax), the accepted count (the leading picks
    that equal the draft's tokens), the bonus token, and from them the next chain call's inputs (the verify
    pass's features, the picks as tokens, the trie row after the bonus, ...), then the next chain call. The
    host reads the verify pass and walks the same picks for the output (`ChainPicks`, same masks) while the
    next chain already runs. `banned` is the row of the state before the bonus token, updated on the device
    where the bonus token completes an item (`ListConstraint.completion_bans`). Not queued when a row might
    finish in the round (the call would only delay the next request; on the default model 4 of 393 rounds
    were such a round that did not finish). The first round's chain is queued the same way behind the prefill
    (`queue_first`): the host never stands between the prefill and the first verify pass."""

    def __init__(self, constraint: ListConstraint):
        self.constraint = constraint

    def _device_tables(self, draft) -> dict:
        """The catalogue's chain tables (the grammar the chain graph and the host walk use) on the draft's
        device, made once per cache."""
        def make():
            return {k: draft.xp.asarray(v.astype(np.int64)) for k, v in self.constraint.catalogue.chain_tables().items()}
        return draft.memo("chain_tables", make)

    def _may_end(self, root, chain) -> bool:
        """Whether the row's list can end in this round: eos due (or written) at a position the walk reaches."""
        cat, n_items = self.constraint.catalogue, self.constraint.n_items
        for s in [root.state] + [n.state for n in chain]:
            if s is None:
                return False
            if s.done or (cat.ends_item(s.node) and s.n_done == n_items):
                return True
        return False

    def _stage(self, draft, K: int, rows: list, col0) -> dict:
        """Send the host tables of a batch to the device (packed page-locked buffers, made once per runner and K).
        rows: per row None (nothing to verify) or (grammar mask (K+1, V), draft tokens (K,), the grammar state
        at each verify position, root first, None past the last one the walk can reach); col0: see
        `write_accepted`."""
        con, cat = self.constraint, self.constraint.catalogue
        B, T1, V = len(rows), K + 1, cat.layout.vocab_size
        n_ban, D = cat.n_nodes + 2, cat.max_depth
        specs = {"mask": ((B, T1, V), np.bool_), "tokens": ((B, K), np.int64), "rows": ((B, T1), np.int64),
                 "left": ((B, T1), np.int64), "banned": ((B, T1, n_ban), np.float16),
                 "path": ((B, T1, D), np.int64), "ends": ((B, T1, D), np.bool_), "col0": ((B,), np.int32)}
        staging = draft.memo(("rounds_staging", K), lambda: draft.packed(specs, host=True))
        dev, host = staging.views, staging.host
        for arr in host.values():
            arr[...] = 0
        host["col0"][...] = col0
        for b, row in enumerate(rows):
            if row is None:
                continue
            mask, tokens, states = row
            host["mask"][b] = mask
            host["tokens"][b] = tokens
            for m, s in enumerate(states):
                if s is None:
                    break
                host["rows"][b, m] = cat.chain_row(s)
                host["left"][b, m] = con.n_items - s.n_done
                host["banned"][b, m] = con.chain_ban(s)
                if not s.done and cat.before_leaf[s.node]:  # the bonus token may complete an item
                    nodes, ends = con.completion_bans(s)
                    host["path"][b, m, :len(nodes)], host["ends"][b, m, :len(nodes)] = nodes, ends
                if s.done:
                    break
        if draft.xp is not np:
            with draft.work():
                staging.blob.set(staging.host_blob)
        return dev

    def _launch(self, draft, feeds: dict, mask, hidden, logits, dev: dict):
        """Queue the chain call whose inputs the accept step completes on the device: `hidden` (the target's
        features) into its first columns, then the picks from `logits` (B, K+1, V) from each row's column
        dev["col0"] on."""
        xp, tab = draft.xp, self._device_tables(draft)

        def fill(ins: dict) -> None:  # on the device, behind the chain call's upload of its feeds
            ins["hidden_in"][:, :hidden.shape[1]] = hidden.astype(ins["hidden_in"].dtype, copy=False)
            if xp is np:
                write_accepted(ins, accept_reference(xp, logits, dev, tab, logits.shape[1] - 1), dev["col0"])
            else:
                accept_kernel(xp, logits, dev, tab, ins, dev["col0"])

        draft.discard()
        return draft.launch(feeds, mask, graph="draft_chain", fill=fill)

    def queue(self, draft, call, roots, trees, masks, clock):
        """Queue the next round's chain behind `call` (the verify pass); returns its Pending, or None."""
        live = [m is not None for m in masks]
        if not any(live) or all(self._may_end(r, tree) for r, tree, ok in zip(roots, trees, live) if ok):
            return None
        t0 = time.perf_counter()
        cat = self.constraint.catalogue
        B, K = len(roots), draft.chain_steps
        T1, n_ban = K + 1, cat.n_nodes + 2
        rows = [None if mask is None else (mask, [n.token for n in tree], [r.state] + [n.state for n in tree])
                for r, tree, mask in zip(roots, trees, masks)]
        dev = self._stage(draft, K, rows, 0)
        logits, hidden = call.device("logits")[:, :T1], call.device("hidden")[:, :T1]
        H = hidden.shape[-1]
        pos = np.zeros((B, T1), np.int32)
        mask = np.repeat(np.eye(T1, dtype=bool)[None], B, axis=0)  # finished rows: padding
        for b, r in enumerate(roots):
            if live[b]:
                pos[b] = np.arange(r.position, r.position + T1)
                mask[b] = np.tri(T1, dtype=bool)  # catch-up rows past the accepted ones are never used
        feeds = {"hidden_in": np.zeros((B, T1, H), np.float32), "input_ids": np.zeros((B, T1), np.int32),
                 "position_ids": pos, "slot": np.zeros((B, T1), np.int32), "last": np.zeros(B, np.int32),
                 "node": np.zeros(B, np.int32), "left": np.zeros(B, np.int32),
                 "banned": np.zeros((B, n_ban), np.float16)}
        queued = self._launch(draft, feeds, mask, hidden, logits, dev)
        clock.draft += time.perf_counter() - t0
        return queued

    def queue_first(self, draft, call, feeds: dict, mask, lens: list, states: list, clock):
        """Queue the first round's chain behind the prefill `call`, with nothing between them on the host. Its
        catch-up pairs the prompt's features (the prefill's, copied on the device) with the prompt's next
        tokens (feeds: the catch-up feeds of `FusedChain.propose` but for what the device writes); the token after
        the prompt is the target's grammar-masked pick at the prompt's last position, taken there by the accept
        step with nothing to verify, which also writes the trie row, items left and banned nodes after it.
        states: each row's grammar state at the start. Returns the chain's Pending, or None where the prompt
        is longer than the largest static bucket (the first chain then starts from the host)."""
        if bucket(feeds["input_ids"].shape[1]) is None:
            return None
        t0 = time.perf_counter()
        con, xp = self.constraint, draft.xp
        V, n_ban = con.catalogue.layout.vocab_size, con.catalogue.n_nodes + 2
        rows = []
        for s in states:
            allowed = np.zeros((1, V), dtype=bool)
            allowed[0, con.allowed(s)] = True
            rows.append((allowed, [], [s]))
        B, last = len(lens), np.asarray(lens) - 1
        dev = self._stage(draft, 0, rows, last)
        logits = call.device("logits")
        if (last == last[0]).all():
            logits = logits[:, last[0]:last[0] + 1]
        else:  # each row's last prompt position (a gather on the device, behind the tables' upload)
            with draft.work():
                logits = logits[xp.arange(B), dev["col0"]][:, None]
        feeds = dict(feeds, node=np.zeros(B, np.int32), left=np.zeros(B, np.int32),
                     banned=np.zeros((B, n_ban), np.float16))
        queued = self._launch(draft, feeds, mask, call.device("hidden"), logits, dev)
        draft.commit([np.arange(n) for n in lens])
        clock.draft += time.perf_counter() - t0
        return queued
