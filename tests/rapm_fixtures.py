"""Test helpers: trajectory sets from tiny in-memory teachers, made through the product's own code."""
import sys
from pathlib import Path

import torch

from headless import tiny_models
from comfy_rapm import conditioning, host, session, settings, trajectories

ROOT = Path(__file__).resolve().parent.parent
QUALITY_DIR = ROOT / "bench" / "quality"


def import_quality_benchmark() -> None:
    """Put the repository and bench/quality/ on sys.path, as the benchmark's scripts do for themselves, so tests
    import its modules (teacher, eval, run_benchmark, …) by name."""
    for p in (str(ROOT), str(QUALITY_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)


def tiny_training_config(**overrides) -> settings.Config:
    """A training run small enough for the tiny models on a CPU: 4 iterations, rank 4, learning rates 1e-3, Δ 20."""
    base = dict(iterations=4, lora_rank=4, lora_alpha=4.0, learning_rate=1e-3, discriminator_learning_rate=1e-3,
                delta=20, seed=0, checkpoint_every=100)
    return settings.Config(**dict(base, **overrides))


def make_trajectory_set(folder, model, kind="sd15", count=4, steps=4, fine_steps=3, cfg=2.0, seed=0, batch_size=2,
                        latent_hw=(8, 8), prompts=2):
    """Trajectories of `model` for `prompts` random conditionings, written as a real set on disk."""
    conds = [tiny_models.make_conditioning(kind, seed=100 + i) for i in range(prompts)]
    negative = tiny_models.make_conditioning(kind, seed=99)
    names = [f"prompt {i}" for i in range(prompts)]
    shape = (host.latent_channels(model),) + tuple(latent_hw)
    spec = trajectories.Spec(prompts=names, negative_prompt="", width=latent_hw[1] * 8, height=latent_hw[0] * 8,
                             count=count, steps=steps, fine_steps=fine_steps, cfg=cfg, seed=seed, batch_size=batch_size,
                             model=host.model_info(model, shape))
    store = trajectories.Store.open(folder, spec)
    slots = spec.slots()

    def run_batch(batch_prompts, seeds):
        positive = conditioning.stack([conds[names.index(p)] for p in batch_prompts])
        neg = conditioning.stack([negative] * len(seeds))
        noise = torch.cat([host.prepare_noise(torch.zeros((1,) + shape), s) for s in seeds])
        return session.trajectory_shard(model, positive, neg, noise, slots, cfg)

    with torch.inference_mode():
        trajectories.generate(store, run_batch)
    return trajectories.TrajectorySet(folder)


def perturbed_teacher(teacher_module, config: dict, seed: int = 0):
    """A bench/quality teacher (`teacher_module` is bench/quality/teacher.py) whose zero-initialised layers are
    nudged, so its output depends on its input."""
    mp = teacher_module.build_teacher(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mp.model.diffusion_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return mp
