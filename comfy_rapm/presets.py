"""Per-family defaults: every setting that differs between SD1.5-like and SDXL-like teachers, in one place.

The values are PCM's released settings, which the RAPM paper defers to. A teacher's preset is resolved once
(`for_teacher`), and everything that says "auto" reads it: the RAPM Train node, the training session (the
discriminator's taps and heads), the workflows and the benchmarks. Teachers that are neither (SD2, SD3, flow
models, …) get the SD1.5 preset with Δ scaled to their schedule's length: a starting point, not a measured
setting."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    delta: int                    # Δ, the teacher's skip step, in timesteps of a 1,000-step schedule
    learning_rate: float          # student AdamW
    weight_decay: float           # student AdamW
    discriminator_kernel: int     # the heads' convolutions: 3 (3×3) or 1 (1×1)
    discriminator_reads_up: bool  # the backbone is tapped on its up blocks too (else down and middle blocks only)
    teacher_cfg: float            # the trajectories' guidance (the family's usual CFG)
    resolution: int               # the family's native image size
    lora_rank: int = 64
    lora_alpha: float = 8.0
    discriminator_learning_rate: float = 1e-5
    adversarial_weight: float = 0.1
    iterations: int = 20000

    def delta_for(self, num_timesteps: int) -> int:
        return round(self.delta * num_timesteps / 1000)


SD15 = Preset("SD1.5-like", delta=20, learning_rate=5e-6, weight_decay=1e-3, discriminator_kernel=3,
              discriminator_reads_up=True, teacher_cfg=6.0, resolution=512)
SDXL = Preset("SDXL-like", delta=25, learning_rate=2e-6, weight_decay=0.0, discriminator_kernel=1,
              discriminator_reads_up=False, teacher_cfg=7.5, resolution=1024)
OTHER = SD15  # the module's docstring says why


def for_teacher(sdxl_like: bool) -> Preset:
    return SDXL if sdxl_like else OTHER


def resolve(preset: Preset, num_timesteps: int, *, learning_rate: float | None = None, weight_decay: float | None = None,
            delta: int | None = None, discriminator_kernel: int | None = None) -> dict:
    """The per-family training settings, each given value kept and each None (the user's "auto") the preset's:
    keyword arguments for settings.Config."""
    return {"learning_rate": preset.learning_rate if learning_rate is None else learning_rate,
            "weight_decay": preset.weight_decay if weight_decay is None else weight_decay,
            "delta": preset.delta_for(num_timesteps) if delta is None else delta,
            "discriminator_kernel": preset.discriminator_kernel if discriminator_kernel is None else discriminator_kernel,
            "discriminator_reads_up": preset.discriminator_reads_up}
