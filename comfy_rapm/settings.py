"""One training run's settings: what it learns (the resume key) and how it runs, and what to change when it does not fit.
Plain data: the nodes, the trainer, the benchmarks and a run's identity on disk all read this one object."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import presets

MODES = ("rapm", "relative_only", "absolute_only", "huber_only")


@dataclass
class Config:
    """One training run: what it learns (the resume key) and how it runs (precision, memory, speed)."""
    iterations: int = presets.SD15.iterations
    lora_rank: int = presets.SD15.lora_rank
    lora_alpha: float = presets.SD15.lora_alpha
    learning_rate: float = presets.SD15.learning_rate
    discriminator_learning_rate: float = presets.SD15.discriminator_learning_rate
    weight_decay: float = presets.SD15.weight_decay
    delta: int = presets.SD15.delta
    absolute_weight: list = field(default_factory=lambda: [1.0])
    huber_c: float = 0.001
    adversarial_weight: float = presets.SD15.adversarial_weight
    mode: str = "rapm"
    seed: int = 0
    checkpoint_every: int = 500
    grad_clip: float = 1.0
    low_memory: bool = False
    # the discriminator: the heads' convolutions and whether the backbone's up blocks are tapped (a family's)
    discriminator_kernel: int = presets.SD15.discriminator_kernel
    discriminator_reads_up: bool = presets.SD15.discriminator_reads_up
    # how it runs
    precision: str = "auto"
    gradient_checkpointing: bool = False
    cuda_graphs: bool | None = None    # None: on (low_memory: one step graph replayed slot by slot)
    graded_graphs: bool | None = None  # the passes with grad too; None: as cuda_graphs
    # Each discriminators' iteration also computes the next (student) iteration's no-grad work, in one batch with its
    # own (the student's chain at batch 2, the teacher and frozen-student steps at 2N rows): the LoRA does not change
    # between the two (only the discriminators step), so the values and draws are those of separate iterations.
    # Measured on an H200 with step graphs (bench/results/levers.json): SD1.5 −11% s/it under cudaMallocAsync, −13%
    # natively, for +0.4 GiB reserved; SDXL −3.5% / −9% for +2.4 GiB (2026-12-03). Not with low_memory. perf.py's
    # `no_paired` turns it off.
    paired_iterations: bool = True
    # Each side's whole step as one CUDA graph: the student's (its pass, the backbone's features, the heads, the
    # losses and the LoRA's gradients) instead of per-pass graphs with grad, the discriminators' (the backbone's
    # features and the heads' losses and gradients, head by head) instead of eager heads. Every allocation is made and
    # freed inside one graph, as PyTorch's cudaMallocAsync allocator supports: on an H200 it runs there at the native
    # allocator's speed, where per-pass graphs with grad crash (bench/NOTES.md). perf.py's `no_step_graphs` turns it off.
    step_graphs: bool = True
    # With step graphs: an iteration's no-grad targets as one more graph, in which the student's batch-1 chain runs on
    # a second stream beside the teacher's Δ-step and the frozen student's step (they read only the stored positions).
    # An option for A/B runs (perf.py `targets_graph`). Off: on an H200 (2026-12-04) it saved 3-4% on SD1.5 under both
    # allocators and 2% on SDXL, under the 5% a default needs (predicted 15%: the chain's kernels were already queued).
    targets_graph: bool = False

    RUNTIME = ("discriminator_kernel", "discriminator_reads_up", "precision", "gradient_checkpointing", "cuda_graphs",
               "graded_graphs", "paired_iterations", "step_graphs", "targets_graph")

    def weights(self, steps: int) -> list[float]:
        w = [float(v) for v in self.absolute_weight]
        if len(w) == 1:
            return w * steps
        if len(w) != steps:
            raise ValueError(f"absolute_weight has {len(w)} values; give one, or one per step ({steps})")
        return w

    @property
    def uses_relative(self) -> bool:
        return self.mode in ("rapm", "relative_only", "huber_only")

    @property
    def uses_absolute(self) -> bool:
        return self.mode in ("rapm", "absolute_only", "huber_only")

    @property
    def uses_gan(self) -> bool:
        return self.mode != "huber_only"

    @property
    def uses_cuda_graphs(self) -> bool:
        return True if self.cuda_graphs is None else self.cuda_graphs

    @property
    def uses_graded_graphs(self) -> bool:
        return self.uses_cuda_graphs if self.graded_graphs is None else self.graded_graphs

    @property
    def uses_step_graphs(self) -> bool:
        return self.step_graphs and self.uses_cuda_graphs  # low-memory mode: one slot's step graph, replayed per slot

    @property
    def uses_targets_graph(self) -> bool:
        return self.targets_graph and self.uses_step_graphs

    def resume_key(self) -> dict:
        """What must match to resume: everything but the iteration budget, the checkpoint interval and how it
        runs (the run's identity adds precision and a non-preset head size: run_identity)."""
        d = asdict(self)
        for key in ("iterations", "checkpoint_every") + self.RUNTIME:
            d.pop(key)
        return d


def out_of_memory_fix(config: Config) -> str:
    """The next memory setting to try, in order of what it costs: checkpointing (~9% time), 1×1 discriminator
    heads, slot-by-slot back-propagation (~1.3-1.7x slower), then a smaller LoRA."""
    if not config.gradient_checkpointing:
        return "turn on gradient_checkpointing"
    if config.discriminator_kernel != 1 and config.uses_gan:
        return "set discriminator_heads to 1x1" + ("" if config.low_memory else " (then also turn on low_memory)")
    if not config.low_memory:
        return "turn on low_memory"
    return "lower lora_rank or use a card with more memory"


def parse_absolute_weight(text: str) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"absolute_weight {text!r}: give a number, or comma-separated numbers (one per step)") from None
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"absolute_weight {text!r}: weights must be finite and ≥ 0")
    return values
