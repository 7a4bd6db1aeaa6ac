"""N-step sampling on the coarse trailing schedule (the student's schedule), from pure noise."""
from __future__ import annotations

from typing import Callable

import torch

from . import schedule, solver


def coarse_sigmas(model_sampling: schedule.ModelSampling, steps: int) -> torch.Tensor:
    """σ(t_N), …, σ(t_1), σ(index 0)."""
    return schedule.sigma_at(model_sampling, schedule.trailing_timesteps(steps, schedule.num_timesteps(model_sampling)))


def sample(denoise: solver.Denoiser, model_sampling: schedule.ModelSampling, noise: torch.Tensor, steps: int,
           latent: torch.Tensor | None = None, callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Trailing DDIM on the coarse grid; returns the model-space latent at σ(index 0), exactly what
    ComfyUI's `euler` sampler returns on the same sigmas. `latent` (model space) is added under the
    noise as ComfyUI does; None or zeros means pure noise."""
    sigmas = coarse_sigmas(model_sampling, steps).to(noise.device)
    base = torch.zeros_like(noise) if latent is None else latent.to(noise)
    x = model_sampling.noise_scaling(sigmas[:1], noise, base, max_denoise=True)
    x, _ = solver.ddim(denoise, x, sigmas, callback=callback)
    return model_sampling.inverse_noise_scaling(sigmas[-1], x)
