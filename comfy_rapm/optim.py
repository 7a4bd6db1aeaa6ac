"""The discriminators' optimizer: AdamW with β₁ = 0 (PCM's setting), without the first-moment buffer.

With β₁ = 0, AdamW's first moment is the current gradient, so torch's AdamW keeps a parameter-sized
copy of it for nothing: 1.2 GiB for the SD1.5 discriminator heads. The update is the same:
    p ← p·(1 − lr·wd) − lr · g / (sqrt(v / (1 − β₂ᵗ)) + ε),   v ← β₂·v + (1 − β₂)·g²"""
from __future__ import annotations

import math

import torch


class AdamWNoMomentum(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta2=beta2, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            grads = [p.grad for p in params]
            squares = [self.state[p]["exp_avg_sq"] for p in params]
            lr, beta2 = group["lr"], group["beta2"]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_mul_(squares, beta2)
            torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
            corrections = [math.sqrt(1 - beta2 ** float(self.state[p]["step"])) for p in params]
            denominators = torch._foreach_sqrt(squares)
            torch._foreach_div_(denominators, corrections)
            torch._foreach_add_(denominators, group["eps"])
            torch._foreach_addcdiv_(params, grads, denominators, value=-lr)
        return loss
