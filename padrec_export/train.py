"""Training: the target on list-wise sequences, then the draft against the frozen target (EAGLE loss, unrolled over the draft steps).

Draft loss (EAGLE): SmoothL1 between the draft's feature and the target's next feature, plus 0.1 x
cross-entropy against the target's next-token distribution; unrolled over K steps on the draft's own
features with the attention it will see at inference ("training-time test"): step k at position i sees
the real entries up to i-k and its own chain entries at i-k+1..i-1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from padrec_runtime.errors import BackendError, InputError
from padrec_runtime.grammar import LIST, PAD, Catalogue

from .features import TargetFeatures, causal_mask, pad_batch, positions, target_outputs
from .models import Draft, DraftConfig, Target, TargetConfig
from .optim import make_optimizer, warmup_cosine
from .trainer import Budget, Loop, Paused, Position, batch_order, run_steps


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64  # sequences per optimizer step (see batch_tokens)
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0
    draft_steps: int = 4  # K unrolled steps for the draft
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype on GPU: bfloat16 | float32
    dropout: float = 0.0  # target only: embedding and residual dropout while training
    weights: str = "float32"  # target only: its weights (and optimizer states) while training: float32 | bfloat16
    checkpointing: bool = False  # target only: recompute each decoder layer in backward
    batch_tokens: int = 0  # > 0: sequences per step = batch_tokens // the longest sequence (replaces batch_size)
    micro_batch: int = 0  # > 0: sequences per forward/backward, gradients accumulated over a step
    keep_best: bool = True  # target only, with validation data: keep the best epoch (a copy of the weights)
    cache_features: bool = False  # drafts: the target's outputs computed once for every sequence, kept on device

    def __post_init__(self):
        if self.weights not in ("float32", "bfloat16"):
            raise InputError(f"weights: got {self.weights!r} | expected float32 or bfloat16")

    def to_dict(self) -> dict:
        return asdict(self)

    def sequences_per_step(self, seqs: list) -> int:
        if self.batch_tokens > 0:
            return max(1, self.batch_tokens // max(len(s) for s in seqs))
        return self.batch_size


def check_device(device: str) -> None:
    """Refuse a training device PyTorch cannot use, before any data is loaded."""
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise InputError(f"--device: got {device!r} | expected cpu, cuda or cuda:N | pick one of those")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"--device {device}: PyTorch sees no CUDA GPU (torch {torch.__version__}, CUDA build "
                           f"{torch.version.cuda or 'none'}) | expected a CUDA machine and a CUDA build of torch | "
                           "train with --device cpu, or install a CUDA build of torch on a GPU machine")
    if kind == "cuda" and ":" in device and int(device.split(":")[1] or 0) >= torch.cuda.device_count():
        raise BackendError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) | pick cuda:0 ..")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"--device {device}: PyTorch has no MPS device here | train with --device cpu")


def encode_example(cat: Catalogue, history, target_items) -> np.ndarray:
    """Prompt + the list the model should write (items spelled by the catalogue's layout, separators, eos)."""
    return np.concatenate([cat.prompt(history), cat.list_tokens(target_items)]).astype(np.int64)


def batches(seqs: list, batch_size: int, rng: np.random.Generator, shuffle: bool = True):
    for idx in batch_order(len(seqs), batch_size, rng, shuffle):
        yield pad_batch(seqs, idx)


def _autocast(cfg: TrainConfig):
    # on CPU only for bf16 weights (their matmuls with fp32 activations need it); fp32 CPU training runs as it is
    enabled = cfg.dtype == "bfloat16" and (cfg.device != "cpu" or cfg.weights == "bfloat16")
    return torch.autocast(device_type=cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def list_loss(model: Target, seqs: list, list_len: int, batch_size: int, device) -> float:
    """Mean cross-entropy of the list tokens: the validation metric. list_len: the list's tokens when every list
    has as many (the last list_len of each sequence); 0: the tokens after each sequence's <list> (items of
    varying length, as in the digits layout)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches(seqs, batch_size, np.random.default_rng(0), shuffle=False):
            ids = ids.to(device)
            B, T = ids.shape
            logits, _, _ = model(ids, positions(B, T, ids.device), causal_mask(B, T, ids.device),
                                 model.empty_past(B, ids.device))
            lengths = (ids != PAD).sum(1)
            for b in range(B):
                n = int(lengths[b])
                k = list_len or n - 1 - int(torch.nonzero(ids[b, :n] == LIST)[-1, 0])
                lo = logits[b, n - k - 1:n - 1].float()
                total += float(F.cross_entropy(lo, ids[b, n - k:n], reduction="sum"))
                count += k
    return total / max(count, 1)


def new_target(tcfg: TargetConfig, cfg: TrainConfig) -> Target:
    """A freshly initialised target made on the training device in its training dtype (no fp32 copy of bf16
    weights is ever made, on the host or the device)."""
    dtype = torch.bfloat16 if cfg.weights == "bfloat16" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(cfg.device):
            model = Target(tcfg)
    finally:
        torch.set_default_dtype(previous)
    model.set_dropout(cfg.dropout)
    model.checkpointing = cfg.checkpointing
    return model.train()


def _target_step(model: Target, opt, sched, cfg: TrainConfig, ids: torch.Tensor) -> tuple[float, int]:
    """One optimizer step on a padded batch (in micro-batches when cfg.micro_batch): mean next-token
    cross-entropy over its real tokens; returns the loss and the tokens it trained on."""
    ids = ids.to(cfg.device)
    n_tokens = int((ids[:, 1:] != PAD).sum())
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=ids.device)
    for chunk in ids.split(cfg.micro_batch or len(ids)):
        B, T = chunk.shape
        with _autocast(cfg):
            logits, _, _ = model(chunk, positions(B, T, chunk.device), causal_mask(B, T, chunk.device),
                                 model.empty_past(B, chunk.device))
        tgt = chunk[:, 1:].clone()
        tgt[tgt == PAD] = -100
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                               ignore_index=-100, reduction="sum") / max(n_tokens, 1)
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(total), n_tokens


def train_target(tcfg: TargetConfig, seqs: list, cfg: TrainConfig, progress: bool = True,
                 valid: list | None = None, list_len: int = 0, resume: dict | None = None,
                 budget: Budget | None = None, log=None) -> tuple[Target, dict]:
    """A target trained from scratch on next-token prediction over prompt + list; returns it and its curves.

    With `valid` sequences, the epoch with the lowest validation list loss is kept when cfg.keep_best (early model
    selection), else the last. resume: a `Paused.state` to continue from (the rest sees an uninterrupted run's
    batches). budget: raise Paused (with the state to resume from) before it runs out. log: progress lines. list_len
    as in `list_loss`.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = new_target(tcfg, cfg)
    opt = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, cfg.weights)
    bs = cfg.sequences_per_step(seqs)
    sched = warmup_cosine(opt, cfg.epochs * math.ceil(len(seqs) / bs), cfg.warmup_steps)
    curves, best, start = {"loss": [], "valid": []}, {}, Position()
    if resume is not None:
        start = _restore_target(resume, model, opt, sched, curves, best)

    def step(idx):
        loss, tokens = _target_step(model, opt, sched, cfg, pad_batch(seqs, idx))
        curves["loss"].append(loss)
        return loss, tokens

    def epoch_end(epoch):
        if not valid:
            return
        model.eval()
        curves["valid"].append(list_loss(model, valid, list_len, bs, cfg.device))
        model.train()
        if cfg.keep_best and curves["valid"][-1] <= min(curves["valid"]):
            best["state"] = {k: t.detach().clone() for k, t in model.state_dict().items()}
        if log:
            log(f"train target: epoch {epoch + 1} validation list loss {curves['valid'][-1]:.4f}")

    state_bytes = sum(p.numel() * p.element_size() * 3 for p in model.parameters())  # weights and two moments
    loop = Loop(len(seqs), bs, cfg.epochs, "train target", progress, log, budget=budget,
                pause_s=10 + state_bytes / 1e9)  # the pause writes the training state at ~1 GB/s
    at = run_steps(loop, rng, start, step, epoch_end)
    if at.epoch < cfg.epochs:
        raise Paused(at, {"position": at.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                          "schedule": sched.state_dict(), "curves": curves, **best})
    if "state" in best:
        model.load_state_dict(best["state"])
    return model.eval(), curves


def _restore_target(state: dict, model: Target, opt, sched, curves: dict, best: dict) -> Position:
    model.load_state_dict(state.pop("model"))  # popped: the caller's dict would keep a second copy alive
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    curves.update(state["curves"])
    if "state" in state:
        best["state"] = state["state"]
    return Position(**state["position"])


def _draft_step_mask(B: int, T: int, k: int, device) -> torch.Tensor:
    """(B, T, (k+1)T) mask of unrolled step k over [step 0 .. step k-1 entries, step k entries]."""
    i = torch.arange(T, device=device)
    blocks = [i[None, :] <= (i[:, None] - k)]  # real (step 0) entries up to i-k
    for j in range(1, k):
        blocks.append(i[None, :] == (i[:, None] - k + j))  # own chain entry made at step j
    blocks.append(i[None, :] == i[:, None])  # itself
    return torch.cat(blocks, dim=1)[None].expand(B, T, (k + 1) * T)


def _step_counts(ids: torch.Tensor, K: int) -> list:
    """Positions each unrolled step k is scored at over a batch (the per-step losses' denominators)."""
    ok = ids[:, 2:] != PAD
    return [ok[:, k:].sum().clamp(min=1).float() for k in range(K)]


def draft_losses(draft: Draft, feats: torch.Tensor, target_logits: torch.Tensor, ids: torch.Tensor, K: int,
                 layout_slots, counts: list | None = None) -> list:
    """Per-step (regression + 0.1 CE) losses of the draft unrolled K steps over a batch, given the target's
    hidden states `feats` (B, T, H) and logits (B, T, V) on it. counts: each step's denominator (default: its
    positions in this batch; a micro-batch passes the whole step's, so the parts add up to the step's mean)."""
    B, T = ids.shape
    dev = ids.device
    p_next = torch.softmax(target_logits.float(), dim=-1)
    n = T - 1  # draft position i pairs (f_i, x_{i+1}) and predicts f_{i+1}, x_{i+2}
    tokens = ids[:, 1:]
    slot = layout_slots(tokens)
    pos = positions(B, n, dev)
    valid = (ids[:, 2:] != PAD)  # positions i whose target x_{i+2} exists
    counts = counts or _step_counts(ids, K)
    losses, kv, feat_in = [], [], feats[:, :n].float()
    for k in range(K):
        if k > 0:
            feat_in = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        past_k = torch.cat([x[0] for x in kv], dim=2) if kv else None
        past_v = torch.cat([x[1] for x in kv], dim=2) if kv else None
        if past_k is None:
            past = draft.empty_past(B, dev, feat_in.dtype)
            mask = causal_mask(B, n, dev)
        else:
            past = [(past_k, past_v)]
            mask = _draft_step_mask(B, n, k, dev)
        step = torch.full((B, n), k, dtype=torch.int32, device=dev)
        logits, h, new = draft(feat_in, tokens, pos, step, slot, mask, past)
        kv.append(new[0])
        ok = valid[:, :n - 1].clone()
        ok[:, :k] = False  # step k needs k real positions before it
        okf = ok.float()
        reg = (F.smooth_l1_loss(h[:, :n - 1].float(), feats[:, 1:n].float(), reduction="none").mean(-1) * okf).sum()
        logp = torch.log_softmax(logits[:, :n - 1].float(), dim=-1)
        ce = (-(p_next[:, 1:n] * logp).sum(-1) * okf).sum()
        losses.append((reg + 0.1 * ce) / counts[k])
    return losses


def _draft_step(draft: Draft, params: list, opt, sched, cfg: TrainConfig, ids: torch.Tensor, outputs,
                slots) -> tuple[float, int]:
    """One draft optimizer step on a padded batch; outputs(ids_chunk, rows) -> the target's (hidden, logits)."""
    ids = ids.to(cfg.device)
    counts = _step_counts(ids, cfg.draft_steps)
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=ids.device)
    size = cfg.micro_batch or len(ids)
    for lo in range(0, len(ids), size):
        chunk = ids[lo:lo + size]
        feats, logits = outputs(chunk, slice(lo, lo + size))
        with _autocast(cfg):
            loss = sum(draft_losses(draft, feats, logits, chunk, cfg.draft_steps, slots, counts))
        loss.backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return float(total), int((ids != PAD).sum())


def train_draft(target: Target, dcfg: DraftConfig, seqs: list, cfg: TrainConfig, catalogue: Catalogue,
                progress: bool = True, resume: dict | None = None, on_epoch=None, budget: Budget | None = None,
                log=None, features: TargetFeatures | None = None) -> tuple[Draft, list]:
    """A draft trained against the frozen target; returns it and the loss curve (sum over steps).

    resume: a `DraftProgress.state` (draft weights, optimizer and schedule after some steps) to continue
    from; the rest then sees the batches an uninterrupted run would. on_epoch(progress): called after every
    epoch with a DraftProgress (to save it). budget: raise Paused (its state a DraftProgress.state) before it
    runs out. With cfg.cache_features the target runs once over every sequence, not once per draft epoch;
    `features` passes that cache in (made once for several drafts of one target)."""
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    target = target.to(cfg.device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    draft = Draft(dcfg, target).to(cfg.device).train()
    params = [p for n, p in draft.named_parameters() if not n.startswith(("embed_tokens.", "lm_head."))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = cfg.sequences_per_step(seqs)
    sched = warmup_cosine(opt, cfg.epochs * math.ceil(len(seqs) / bs), cfg.warmup_steps)
    start, curve = Position(), []
    if resume is not None:
        start, curve = _restore(resume, draft, opt, sched)
    cache = features
    if cache is None and cfg.cache_features and start.epoch < cfg.epochs:
        cache = TargetFeatures(target, seqs, bs, log)
    layout = catalogue.layout
    slots = lambda t: torch.from_numpy(layout.slots(t.cpu().numpy())).to(t.device)  # noqa: E731

    def step(idx):
        ids = pad_batch(seqs, idx)
        if cache is not None:
            outputs = lambda chunk, rows: cache.batch(idx[rows], chunk.shape[1])  # noqa: E731
        else:
            outputs = lambda chunk, rows: target_outputs(target, chunk)  # noqa: E731
        loss, tokens = _draft_step(draft, params, opt, sched, cfg, ids, outputs, slots)
        curve.append(loss)
        return loss, tokens

    def epoch_end(epoch):
        if on_epoch is not None:
            on_epoch(DraftProgress(epoch + 1, draft, opt, sched, curve))

    kind = "pad-rec" if dcfg.use_slot or dcfg.use_step else "eagle"
    loop = Loop(len(seqs), bs, cfg.epochs, f"train draft ({kind})", progress, log, budget=budget,
                pause_s=5 + sum(p.numel() * 12 for p in params) / 1e9)
    at = run_steps(loop, rng, start, step, epoch_end)
    if at.epoch < cfg.epochs:
        raise Paused(at, DraftProgress(at.epoch, draft, opt, sched, curve, at.step).state())
    return draft.eval(), curve


@dataclass(frozen=True)
class DraftProgress:
    """A draft's training after some steps: enough to continue it exactly."""

    epochs_done: int
    draft: Draft
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    curve: list  # loss per optimizer step so far
    step: int = 0  # steps done into epoch `epochs_done` (a pause inside an epoch)

    def state(self) -> dict:
        """Tensors, numbers and lists only (loadable with torch.load(weights_only=True))."""
        return {"epochs_done": self.epochs_done, "step": self.step, "draft": self.draft.trainable_state(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "curve": list(self.curve)}


def _restore(state: dict, draft: Draft, opt, sched) -> tuple[Position, list]:
    """Load a DraftProgress.state into a fresh draft, optimizer and schedule; (position, curve so far)."""
    missing, unexpected = draft.load_state_dict(state["draft"], strict=False)
    if unexpected or any(not k.startswith(("embed_tokens.", "lm_head.")) for k in missing):
        from padrec_runtime.errors import CheckpointError
        raise CheckpointError(f"draft training state | missing {missing[:3]}, unexpected {unexpected[:3]} | it "
                              "belongs to another draft configuration: start in a new directory")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    return Position(int(state["epochs_done"]), int(state.get("step", 0))), list(state["curve"])
