"""Pseudo-Huber on latents and the hinge GAN losses (PCM's forms), one value per batch item."""
from __future__ import annotations

import torch


def _per_item_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """mean(sqrt((a-b)² + c²) - c) per item: (B, …) → (B,)."""
    return _per_item_mean(torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c)


def hinge_discriminator(fake_logits: list[torch.Tensor], real_logits: list[torch.Tensor]) -> torch.Tensor:
    """Per item, the mean over heads of mean(relu(1 + D(fake))) + mean(relu(1 - D(real))): (B,)."""
    return torch.stack([hinge_discriminator_head(f, r) for f, r in zip(fake_logits, real_logits)]).mean(0)


def hinge_discriminator_head(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """One head's term of hinge_discriminator, per item: (B,)."""
    return _per_item_mean(torch.relu(1 + fake_logits.float())) + _per_item_mean(torch.relu(1 - real_logits.float()))


def hinge_generator(fake_logits: list[torch.Tensor]) -> torch.Tensor:
    """Per item, the mean over heads of mean(relu(1 - D(fake))): (B,)."""
    return torch.stack([_per_item_mean(torch.relu(1 - f.float())) for f in fake_logits]).mean(0)
