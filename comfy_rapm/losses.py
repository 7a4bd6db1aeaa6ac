"""Pseudo-Huber on latents and the hinge GAN losses (PCM's forms)."""
from __future__ import annotations

import torch


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """mean(sqrt((a-b)² + c²) - c)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


def hinge_discriminator(fake_logits: list[torch.Tensor], real_logits: list[torch.Tensor]) -> torch.Tensor:
    """mean over heads of mean(relu(1 + D(fake))) + mean(relu(1 - D(real)))."""
    terms = [torch.relu(1 + f.float()).mean() + torch.relu(1 - r.float()).mean() for f, r in zip(fake_logits, real_logits)]
    return torch.stack(terms).mean()


def hinge_generator(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """mean over heads of mean(relu(1 - D(fake)))."""
    return torch.stack([torch.relu(1 - f.float()).mean() for f in fake_logits]).mean()
