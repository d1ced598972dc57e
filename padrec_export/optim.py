"""Optimizers and the learning-rate schedule of training: AdamW for fp32 weights, and an AdamW that keeps bf16
weights and moments in bf16 (no fp32 master copy) with stochastic rounding, for LLM-sized targets on one GPU."""
from __future__ import annotations

import math

import torch


def round_stochastic_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst (bf16) <- src (fp32) rounded to one of its two bf16 neighbours, the upper with probability its
    distance from the lower: unbiased, so steps far below bf16's resolution (1/256 relative) still add up
    over many updates, where round-to-nearest would drop every one of them."""
    bits = src.contiguous().view(torch.int32)
    # noise in the 16 bits bf16 drops: a carry into bit 16 rounds the magnitude up (sign-magnitude: either sign)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return dst.copy_(((bits + noise) & -65536).view(torch.float32))


def _write(dst: torch.Tensor, value: torch.Tensor, stochastic: bool) -> None:
    if dst.dtype == torch.bfloat16 and stochastic:
        round_stochastic_(dst, value)
    else:
        dst.copy_(value)


class AdamWBF16(torch.optim.Optimizer):
    """AdamW whose weights and both moments stay in the parameters' own dtype: 8 bytes a parameter with its
    gradient in bf16, against 16 for fp32 AdamW over a bf16 model with an fp32 master copy. Each step works in
    fp32 one tensor at a time (the transient is one tensor's size) and writes back with stochastic rounding.
    The default beta2 of 0.95 moves the second moment by 5% a step, well above bf16's resolution."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.01,
                 stochastic: bool = True):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      stochastic=stochastic))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        (b1, b2), lr, stochastic = group["betas"], group["lr"], group["stochastic"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        g = p.grad.float()
        m = state["exp_avg"].float().lerp_(g, 1 - b1)
        v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
        w = p.float().mul_(1 - lr * group["weight_decay"])
        denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        w.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
        _write(p, w, stochastic)
        _write(state["exp_avg"], m, stochastic)
        _write(state["exp_avg_sq"], v, stochastic)


def make_optimizer(params, lr: float, weight_decay: float, weights: str) -> torch.optim.Optimizer:
    """AdamW for fp32 weights; AdamWBF16 for bf16 weights (fp32 AdamW there would round every small step away)."""
    params = list(params)
    if weights == "bfloat16":
        return AdamWBF16(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up over warmup_steps, then cosine decay to zero at total_steps."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total_steps))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
