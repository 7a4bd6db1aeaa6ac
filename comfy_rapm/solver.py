"""DDIM over a denoiser, in ComfyUI's sigma space.

A denoiser maps (x, σ) → predicted clean sample, with σ one value per batch item. DDIM (η=0)
is then exactly Euler in sigma space: x' = d + (σ'/σ)(x - d). This holds for EPS and V models
(x = x0 + σε) and for flow models (x = (1-σ)x0 + σε) alike, because `denoised` already folds in
the prediction type."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A solver from σ_0 to σ_last along `sigmas`: solve(denoise, x, sigmas, callback) → end point. DDIM is here;
# the host's own multistep solvers (ComfyUI's dpmpp_2m, uni_pc) come through host.slot_solver.
Solve = Callable[[Denoiser, torch.Tensor, Sequence, Callable | None], torch.Tensor]
# The in-slot solvers a trajectory set can be made with ("ddim" = what sets without the key were made with).
SOLVERS = ("ddim", "dpmpp_2m", "uni_pc")


def _per_item(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma


def ddim_step(denoise: Denoiser, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One deterministic DDIM step from σ to σ' (each a scalar or one per batch item)."""
    sigma = _per_item(sigma, x)
    sigma_next = _per_item(sigma_next, x)
    denoised = denoise(x, sigma)
    ratio = (sigma_next / sigma).reshape((-1,) + (1,) * (x.ndim - 1)).to(x.dtype)
    return denoised + ratio * (x - denoised)


def ddim(denoise: Denoiser, x: torch.Tensor, sigmas: Sequence, callback: Callable | None = None,
         keep: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run DDIM along `sigmas` (σ_0 > σ_1 > …). Returns the end point and the positions after the
    steps whose indices are in `keep` (1-based: position after step i). `callback(i)` after each step."""
    kept = []
    keep = set(keep)
    for i in range(len(sigmas) - 1):
        x = ddim_step(denoise, x, sigmas[i], sigmas[i + 1])
        if i + 1 in keep:
            kept.append(x)
        if callback is not None:
            callback(i + 1)
    return x, kept


def ddim_solve(denoise: Denoiser, x: torch.Tensor, sigmas: Sequence, callback: Callable | None = None) -> torch.Tensor:
    """`ddim` as a Solve."""
    return ddim(denoise, x, sigmas, callback=callback)[0]
