"""RAPM Sampler: the student's few steps."""
from __future__ import annotations

import torch

from ..comfy_rapm import host, sampler
from .common import MAX_SEED, check_latent


class RAPMSampler:
    """Few-step sampling on the trailing schedule a RAPM student was trained on."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The student: the teacher with the RAPM LoRA applied (RAPMTrain's MODEL, or a LoRA loader's output)."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT", {"tooltip": "Sets size and batch; an empty latent means pure noise."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 1000, "tooltip": "N, the number of coarse steps the student was trained for."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "1.0 for a distilled student (guidance is baked in); the negative prompt is then unused."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling/RAPM"
    DESCRIPTION = "Trailing DDIM on N coarse steps (999, 749, 499, 249 for N=4), as the RAPM paper samples its students."

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg):
        samples = check_latent("RAPMSampler", model, latent_image)
        noise = host.prepare_noise(samples, seed, latent_image.get("batch_index"))
        bar = host.Progress(steps)

        def run(denoiser):
            def step_done(i):
                host.check_interrupt()
                bar.update_absolute(i)
            latent = host.process_latent_in(model, samples) if torch.count_nonzero(samples) > 0 else None
            return sampler.sample(lambda x, s: denoiser(x, s, cfg=cfg), denoiser.model_sampling,
                                  noise.to(denoiser.device), steps, latent=latent, callback=step_done)

        x = host.run_with_denoiser(model, positive, negative, samples.shape, run, seed=seed)
        out = dict(latent_image)
        out["samples"] = host.process_latent_out(model, x.float()).cpu()
        out.pop("noise_mask", None)
        return (out,)
