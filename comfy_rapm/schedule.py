"""Coarse trailing timesteps, the fine grid inside each slot, Δ, and the VP ⇄ model-space map.

Timesteps are indices into the model's discrete schedule (0 … T-1). The paper's t_0 is index 0
(ᾱ[0], not ᾱ = 1): exactly where diffusers' DDIM with `set_alpha_to_one=False` ends.

Every sigma lookup goes through the model's sampling object (`ModelSampling` below: what ComfyUI's
`model.get_model_object("model_sampling")` is), so the same code serves EPS, V-prediction and flow models."""
from __future__ import annotations

from typing import Protocol

import torch


class ModelSampling(Protocol):
    """What the core uses of ComfyUI's model-sampling object (comfy.model_sampling), for every model type."""

    sigmas: torch.Tensor  # σ of each training timestep (its length is the schedule's)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ at (fractional) timestep indices."""

    def noise_scaling(self, sigma: torch.Tensor, noise: torch.Tensor, latent_image: torch.Tensor,
                      max_denoise: bool = False) -> torch.Tensor:
        """The model-space input at σ for a clean latent and a noise (EPS/V: x + σε; flow: (1-σ)x + σε)."""

    def inverse_noise_scaling(self, sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The latent the sampler returns at σ (the identity for most models)."""


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """[t_steps, …, t_1, t_0]: diffusers' "trailing" spacing, then index 0 as the end point.

    N=4 → [999, 749, 499, 249, 0]."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the schedule length ({num_train_timesteps})")
    ratio = num_train_timesteps / steps
    # round() is round-half-even, as numpy's round that diffusers uses.
    grid = [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]
    return grid + [0]


def slot_timesteps(steps: int, substeps: int, num_train_timesteps: int = 1000) -> list[list[int]]:
    """For each coarse slot, from the top (t_N → t_{N-1}) down to (t_1 → t_0), the M+1
    timesteps of M-step DDIM inside it. Together they are the trailing grid of N×M steps, so a
    teacher trajectory equals one N×M-step DDIM run observed at the slot boundaries."""
    fine = trailing_timesteps(steps * substeps, num_train_timesteps)
    coarse = trailing_timesteps(steps, num_train_timesteps)
    slots = [fine[i * substeps:(i + 1) * substeps + 1] for i in range(steps)]
    for i, slot in enumerate(slots):
        if slot[0] != coarse[i] or slot[-1] != coarse[i + 1]:
            raise ValueError(f"{steps}×{substeps} fine steps do not land on the {steps}-step grid")
    return slots


def num_timesteps(model_sampling: ModelSampling) -> int:
    sigmas = getattr(model_sampling, "sigmas", None)
    return int(sigmas.shape[0]) if sigmas is not None else 1000


def sigma_at(model_sampling: ModelSampling, timesteps) -> torch.Tensor:
    """σ of integer timestep indices: entries of the model's discrete sigma table (for flow
    models entry i is σ((i+1)/T), not σ(i/T)), float32 on the schedule's device."""
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is not None:
        return sigmas[torch.as_tensor(timesteps, dtype=torch.long, device=sigmas.device)].float()
    return model_sampling.sigma(torch.as_tensor(timesteps, dtype=torch.float32)).float()


def is_variance_exploding(model_sampling: ModelSampling) -> bool:
    """EPS/V models live in x + σε (the data coefficient is 1 at every σ); flow models are
    interpolations (1-σ)x + σε and need no conversion."""
    sigma = torch.tensor([0.5])
    data_coefficient = model_sampling.noise_scaling(sigma, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    return bool(torch.allclose(data_coefficient, torch.ones_like(data_coefficient)))


def _vp_scale(model_sampling: ModelSampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if not is_variance_exploding(model_sampling):
        return torch.ones_like(sigma).reshape(sigma.shape + (1,) * (ndim - sigma.ndim))
    scale = 1.0 / torch.sqrt(1.0 + sigma.double() ** 2)
    return scale.float().reshape(sigma.shape + (1,) * (ndim - sigma.ndim))


def to_vp(x: torch.Tensor, sigma, model_sampling: ModelSampling) -> torch.Tensor:
    """Model space → the paper's VP space z = α x0 + σ_vp ε (for VE: z = x / sqrt(1+σ²)).
    `sigma` is a scalar or one value per batch item."""
    return x * _vp_scale(model_sampling, sigma, x.ndim).to(x.device, x.dtype)


def from_vp(z: torch.Tensor, sigma, model_sampling: ModelSampling) -> torch.Tensor:
    return z / _vp_scale(model_sampling, sigma, z.ndim).to(z.device, z.dtype)


def initial_latent(model_sampling: ModelSampling, noise: torch.Tensor, sigma_max) -> torch.Tensor:
    """Pure-noise start in model space, as ComfyUI's samplers make it from an empty latent."""
    sigma = torch.as_tensor(sigma_max, dtype=torch.float32).reshape(-1)[:1]
    return model_sampling.noise_scaling(sigma.to(noise.device), noise, torch.zeros_like(noise), max_denoise=True)


def _coefficients(model_sampling: ModelSampling, sigma: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(data coefficient, noise coefficient) of model space at σ: x = a·x0 + s·ε."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    shape = (-1,) + (1,) * (ndim - 1)
    # on σ's own device: a copy from the host inside a CUDA graph capture is an error (and a sync outside one)
    zeros = torch.zeros(sigma.shape[0], 1, 1, 1, device=sigma.device)
    ones = torch.ones_like(zeros)
    a = model_sampling.noise_scaling(sigma, zeros, ones).reshape(shape)
    s = model_sampling.noise_scaling(sigma, ones, zeros).reshape(shape)
    return a, s


def renoise(model_sampling: ModelSampling, x: torch.Tensor, sigma_from, sigma_to, noise: torch.Tensor) -> torch.Tensor:
    """The forward process from σ to a higher σ' in model space: x' = (a'/a)·x + sqrt(s'² - (a'/a)² s²)·ε
    (for EPS/V models simply x + sqrt(σ'² - σ²)·ε)."""
    a0, s0 = _coefficients(model_sampling, sigma_from, x.ndim)
    a1, s1 = _coefficients(model_sampling, sigma_to, x.ndim)
    ratio = a1 / a0
    extra = torch.sqrt(torch.clamp(s1 ** 2 - (ratio * s0) ** 2, min=0.0))
    return ratio.to(x) * x + extra.to(x) * noise.to(x)
