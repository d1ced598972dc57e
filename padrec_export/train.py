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
from tqdm import tqdm

from padrec_runtime.errors import BackendError, InputError
from padrec_runtime.grammar import EOS, PAD, SEP, Catalogue

from .models import Draft, DraftConfig, Target, TargetConfig


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0
    draft_steps: int = 4  # K unrolled steps for the draft
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype on GPU: bfloat16 | float32
    dropout: float = 0.0  # target only: embedding and residual dropout while training

    def to_dict(self) -> dict:
        return asdict(self)


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
    """Prompt + the list the model should write (codes, separators, eos)."""
    codes = cat.layout.code_tokens(cat.sids[cat.index_of(target_items)])
    body = np.concatenate([codes, np.full((len(codes), 1), SEP)], axis=1).ravel()
    body[-1] = EOS
    return np.concatenate([cat.prompt(history), body]).astype(np.int64)


def batches(seqs: list, batch_size: int, rng: np.random.Generator, shuffle: bool = True):
    order = rng.permutation(len(seqs)) if shuffle else np.arange(len(seqs))
    for start in range(0, len(seqs), batch_size):
        chunk = [seqs[i] for i in order[start:start + batch_size]]
        T = max(len(s) for s in chunk)
        ids = np.full((len(chunk), T), PAD, dtype=np.int64)
        for b, s in enumerate(chunk):
            ids[b, :len(s)] = s
        yield torch.from_numpy(ids)


def _causal(B: int, T: int, device) -> torch.Tensor:
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))[None].expand(B, T, T)


def _positions(B: int, T: int, device) -> torch.Tensor:
    return torch.arange(T, device=device, dtype=torch.int32)[None].expand(B, T)


def _schedule(opt, total: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total)))))


def _autocast(cfg: TrainConfig):
    enabled = cfg.device != "cpu" and cfg.dtype == "bfloat16"
    return torch.autocast(device_type=cfg.device.split(":")[0], dtype=torch.bfloat16, enabled=enabled)


def list_loss(model: Target, seqs: list, list_len: int, batch_size: int, device) -> float:
    """Mean cross-entropy of the list tokens (the last list_len of each sequence): the validation metric."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in batches(seqs, batch_size, np.random.default_rng(0), shuffle=False):
            ids = ids.to(device)
            B, T = ids.shape
            logits, _, _ = model(ids, _positions(B, T, ids.device), _causal(B, T, ids.device),
                                 model.empty_past(B, ids.device))
            lengths = (ids != PAD).sum(1)
            for b in range(B):
                n = int(lengths[b])
                lo = logits[b, n - list_len - 1:n - 1].float()
                total += float(F.cross_entropy(lo, ids[b, n - list_len:n], reduction="sum"))
                count += list_len
    return total / max(count, 1)


def train_target(tcfg: TargetConfig, seqs: list, cfg: TrainConfig, progress: bool = True,
                 valid: list | None = None, list_len: int = 0) -> tuple[Target, dict]:
    """A target trained from scratch on next-token prediction over prompt + list; returns it and its curves.

    With `valid` sequences, the epoch with the lowest validation list loss is kept (early model selection).
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = Target(tcfg).to(cfg.device).train()
    model.set_dropout(cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(seqs) / cfg.batch_size)
    sched = _schedule(opt, steps, cfg.warmup_steps)
    curve, valid_curve, best = [], [], None
    bar = tqdm(total=steps, desc="train target", disable=not progress)
    for epoch in range(cfg.epochs):
        for ids in batches(seqs, cfg.batch_size, rng):
            ids = ids.to(cfg.device)
            B, T = ids.shape
            with _autocast(cfg):
                logits, _, _ = model(ids, _positions(B, T, ids.device), _causal(B, T, ids.device),
                                     model.empty_past(B, ids.device))
            tgt = ids[:, 1:].clone()
            tgt[tgt == PAD] = -100
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, tcfg.vocab_size), tgt.reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            curve.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(curve[-20:]):.3f}")
        if valid:
            model.eval()
            v = list_loss(model, valid, list_len, cfg.batch_size, cfg.device)
            model.train()
            valid_curve.append(v)
            if v <= min(valid_curve):
                best = {k: t.detach().clone() for k, t in model.state_dict().items()}
    bar.close()
    if valid:
        model.load_state_dict(best)
    return model.eval(), {"loss": curve, "valid": valid_curve}


def _draft_step_mask(B: int, T: int, k: int, device) -> torch.Tensor:
    """(B, T, (k+1)T) mask of unrolled step k over [step 0 .. step k-1 entries, step k entries]."""
    i = torch.arange(T, device=device)
    blocks = [i[None, :] <= (i[:, None] - k)]  # real (step 0) entries up to i-k
    for j in range(1, k):
        blocks.append(i[None, :] == (i[:, None] - k + j))  # own chain entry made at step j
    blocks.append(i[None, :] == i[:, None])  # itself
    return torch.cat(blocks, dim=1)[None].expand(B, T, (k + 1) * T)


def draft_losses(draft: Draft, target: Target, ids: torch.Tensor, K: int, layout_slots) -> list:
    """Per-step (regression + 0.1 CE) losses of the draft unrolled K steps over a batch."""
    B, T = ids.shape
    dev = ids.device
    with torch.no_grad():
        logits_t, feats, _ = target(ids, _positions(B, T, dev), _causal(B, T, dev), target.empty_past(B, dev))
        p_next = torch.softmax(logits_t.float(), dim=-1)
    n = T - 1  # draft position i pairs (f_i, x_{i+1}) and predicts f_{i+1}, x_{i+2}
    tokens = ids[:, 1:]
    slot = layout_slots(tokens)
    pos = _positions(B, n, dev)
    valid = (ids[:, 2:] != PAD)  # positions i whose target x_{i+2} exists
    losses, kv, feat_in = [], [], feats[:, :n].float()
    for k in range(K):
        if k > 0:
            feat_in = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        past_k = torch.cat([x[0] for x in kv], dim=2) if kv else None
        past_v = torch.cat([x[1] for x in kv], dim=2) if kv else None
        if past_k is None:
            past = draft.empty_past(B, dev, feat_in.dtype)
            mask = _causal(B, n, dev)
        else:
            past = [(past_k, past_v)]
            mask = _draft_step_mask(B, n, k, dev)
        step = torch.full((B, n), k, dtype=torch.int32, device=dev)
        logits, h, new = draft(feat_in, tokens, pos, step, slot, mask, past)
        kv.append(new[0])
        ok = valid[:, :n - 1].clone()
        ok[:, :k] = False  # step k needs k real positions before it
        okf = ok.float()
        denom = okf.sum().clamp(min=1)
        reg = (F.smooth_l1_loss(h[:, :n - 1].float(), feats[:, 1:n].float(), reduction="none").mean(-1) * okf).sum()
        logp = torch.log_softmax(logits[:, :n - 1].float(), dim=-1)
        ce = (-(p_next[:, 1:n] * logp).sum(-1) * okf).sum()
        losses.append((reg + 0.1 * ce) / denom)
    return losses


def train_draft(target: Target, dcfg: DraftConfig, seqs: list, cfg: TrainConfig, catalogue: Catalogue,
                progress: bool = True, resume: dict | None = None, on_epoch=None) -> tuple[Draft, list]:
    """A draft trained against the frozen target; returns it and the loss curve (sum over steps).

    resume: a `DraftProgress.state` (draft weights, optimizer and schedule after some epochs) to continue
    from; the remaining epochs then see the batches an uninterrupted run would. on_epoch(progress): called
    after every epoch with a DraftProgress (to save it)."""
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    target = target.to(cfg.device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    draft = Draft(dcfg, target).to(cfg.device).train()
    params = [p for n, p in draft.named_parameters() if not n.startswith(("embed_tokens.", "lm_head."))]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    sched = _schedule(opt, cfg.epochs * per_epoch, cfg.warmup_steps)
    first, curve = 0, []
    if resume is not None:
        first, curve = _restore(resume, draft, opt, sched)
        for _ in range(first):  # the shuffles of the finished epochs: the rest sees an uninterrupted run's batches
            rng.permutation(len(seqs))
    layout = catalogue.layout
    slots = lambda t: torch.from_numpy(layout.slots(t.cpu().numpy())).to(t.device)  # noqa: E731
    bar = tqdm(total=cfg.epochs * per_epoch, initial=min(first, cfg.epochs) * per_epoch,
               desc=f"train draft ({'pad-rec' if dcfg.use_slot or dcfg.use_step else 'eagle'})", disable=not progress)
    for epoch in range(first, cfg.epochs):
        for ids in batches(seqs, cfg.batch_size, rng):
            ids = ids.to(cfg.device)
            with _autocast(cfg):
                losses = draft_losses(draft, target, ids, cfg.draft_steps, slots)
            loss = sum(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            curve.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(curve[-20:]):.3f}")
        if on_epoch is not None:
            on_epoch(DraftProgress(epoch + 1, draft, opt, sched, curve))
    bar.close()
    return draft.eval(), curve


@dataclass(frozen=True)
class DraftProgress:
    """A draft's training after some epochs: enough to continue it exactly."""

    epochs_done: int
    draft: Draft
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    curve: list  # loss per optimizer step so far

    def state(self) -> dict:
        """Tensors, numbers and lists only (loadable with torch.load(weights_only=True))."""
        return {"epochs_done": self.epochs_done, "draft": self.draft.trainable_state(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "curve": list(self.curve)}


def _restore(state: dict, draft: Draft, opt, sched) -> tuple[int, list]:
    """Load a DraftProgress.state into a fresh draft, optimizer and schedule; (epochs done, curve so far)."""
    missing, unexpected = draft.load_state_dict(state["draft"], strict=False)
    if unexpected or any(not k.startswith(("embed_tokens.", "lm_head.")) for k in missing):
        from padrec_runtime.errors import CheckpointError
        raise CheckpointError(f"draft training state | missing {missing[:3]}, unexpected {unexpected[:3]} | it "
                              "belongs to another draft configuration: start in a new directory")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["schedule"])
    return int(state["epochs_done"]), list(state["curve"])
