"""What every node shares: input helpers and the output folders."""
from __future__ import annotations

import os

import torch

from ..comfy_rapm import host
from ..comfy_rapm.errors import NodeInputError

MAX_SEED = 0xFFFFFFFFFFFFFFFF
TRAJECTORY_FOLDER, RUN_FOLDER = "rapm_trajectories", "rapm_runs"


def trajectory_root() -> str:
    return os.path.join(host.output_directory(), TRAJECTORY_FOLDER)


def advanced(spec: tuple) -> tuple:
    """The input behind the node's "Show Advanced" (front ends that have it; others show it as usual)."""
    return (spec[0], dict(spec[1], advanced=True))


def checked(node: str, input_name: str, parse, value):
    """parse(value), a ValueError from it becoming the node's input error."""
    try:
        return parse(value)
    except ValueError as e:
        raise NodeInputError(node, input_name, str(e)) from None


def check_latent(node: str, model, latent: dict, input_name: str = "latent_image") -> torch.Tensor:
    samples = host.fix_empty_latent_channels(model, latent["samples"])
    want = host.latent_channels(model)
    if samples.ndim != 4 or samples.shape[1] != want:
        raise NodeInputError(node, input_name,
                             f"the latent has shape {tuple(samples.shape)} but this model ({host.model_family(model)}) "
                             f"uses {want}-channel latents. Use an Empty Latent Image (or a VAE Encode) made for this model.")
    return samples
