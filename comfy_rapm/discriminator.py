"""RAPM's two discriminators: the frozen teacher UNet is the shared backbone (run by the trainer
with the LoRA off); each discriminator is a set of small trainable heads on its features.

Head (PCM's form): conv → GroupNorm → LeakyReLU, twice with a residual, then a 1×1 conv to one
logit per position. SD1.5-like: 3×3 convs on down, mid and up features; SDXL-like: 1×1 convs on
down and mid features only, to save memory."""
from __future__ import annotations

import torch
from torch import nn


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


class Head(nn.Module):
    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.block1 = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=pad), nn.GroupNorm(_groups(channels), channels), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=pad), nn.GroupNorm(_groups(channels), channels), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        h = self.block1(feature)
        h = self.block2(h) + h
        return self.out(h)


class HeadSet(nn.Module):
    """One discriminator: a head per backbone feature map. Parameters stay fp32; on a GPU the heads
    compute in `autocast_dtype` (bf16 when training in bf16), where their 3×3 convs on up to
    1,280 channels would otherwise cost as much as several UNet passes."""

    def __init__(self, channels: list[int], kernel: int):
        super().__init__()
        self.heads = nn.ModuleList(Head(c, kernel) for c in channels)
        self.autocast_dtype: torch.dtype | None = None

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.head_logits(i, f) for i, f in enumerate(features)]

    def head_logits(self, index: int, feature: torch.Tensor) -> torch.Tensor:
        """Head `index` on its feature map (one head at a time keeps one head's activations alive)."""
        head = self.heads[index]
        if self.autocast_dtype is not None and self.autocast_dtype != torch.float32 and feature.device.type == "cuda":
            # no cast cache: each weight is used once per call, and a cache must not outlive a CUDA graph's capture
            with torch.autocast(feature.device.type, dtype=self.autocast_dtype, cache_enabled=False):
                return head(feature)
        return head(feature.to(head.out.weight.dtype))


class Discriminators(nn.Module):
    """D1 (relative positions) and D2 (absolute positions) over one shared backbone."""

    def __init__(self, channels: list[int], kernel: int = 3, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.relative = HeadSet(channels, kernel)
            self.absolute = HeadSet(channels, kernel)
        self.channels, self.kernel = list(channels), kernel

    def set_compute_dtype(self, dtype: torch.dtype | None) -> "Discriminators":
        self.relative.autocast_dtype = self.absolute.autocast_dtype = dtype
        return self
