"""A training session on the host: the teacher, one LoRA over it (student), the discriminator
backbone taps, and a Trainer built inside ComfyUI's sampling context. Used by the RAPMTrain node,
the tests and the benchmarks, so all of them run the same code."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from . import cuda_graphs as cuda_graphs_mod, host, lora as lora_mod, schedule, trainer
from .discriminator import Discriminators
from . import trajectories
from .trajectories import TrajectorySet

log = logging.getLogger(__name__)


def teacher_positions(model, positive, negative, noise: torch.Tensor, slots: list[list[int]], cfg: float,
                      on_step: Callable[[], None] | None = None, solver: str = "ddim") -> torch.Tensor:
    """One batch of teacher trajectories (B, N+1, C, H, W) in VP space, on the CPU. `positive` and
    `negative` are batched CONDITIONINGs whose row i belongs to noise[i]; `solver`: the in-slot solver."""
    solve = host.slot_solver(solver)

    def body(denoiser):
        return trajectories.generate_positions(lambda x, s: denoiser(x, s, cfg=cfg), denoiser.model_sampling,
                                               noise.to(denoiser.device), slots, on_step=on_step,
                                               solve=solve).float().cpu()
    with host.autotuned_convolutions():
        return host.run_with_denoiser(model, positive, negative, noise.shape, body)


def convolution_notice() -> str | None:
    """What the Teacher Trajectories node adds to its progress line when convolutions run the safe path."""
    from . import convolutions
    return convolutions.notice()


def trajectory_shard(model, positive, negative, noise: torch.Tensor, slots: list[list[int]], cfg: float,
                     on_step: Callable[[], None] | None = None, solver: str = "ddim") -> tuple[dict, dict]:
    """One shard of a trajectory set: the teacher's positions plus the conditioning exactly as the
    teacher saw it, as (tensors, metadata) for trajectories.generate."""
    positions = teacher_positions(model, positive, negative, noise, slots, cfg, on_step, solver)
    pos_t, pos_extra = trajectories.conditioning_tensors(positive, "positive")
    neg_t, neg_extra = trajectories.conditioning_tensors(negative, "negative")
    return dict(positions=positions, **pos_t, **neg_t), {"positive_extra": pos_extra, "negative_extra": neg_extra}


def pcm_discriminator_kernel(sdxl: bool) -> int:
    """PCM's discriminator heads: 3x3 convolutions for SD1.5-like models, 1x1 for SDXL-like ones."""
    return 1 if sdxl else 3


class Session:
    def __init__(self, model, trajectory_set: TrajectorySet, config: trainer.Config, precision: str = "auto",
                 gradient_checkpointing: bool = False, cuda_graphs: bool | None = None,
                 graded_graphs: bool | None = None, discriminator_kernel: int | None = None,
                 paired_iterations: bool = False):
        """`discriminator_kernel`: the heads' conv size; None = PCM's (pcm_discriminator_kernel). A run's checkpoint
        holds heads of one size. `paired_iterations`: trainer.Trainer(paired=…), an option for A/B runs."""
        self.paired_iterations = paired_iterations
        self.model, self.set, self.config = model, trajectory_set, config
        self.gradient_checkpointing = gradient_checkpointing
        # Graphs keep one pass's activations per batch shape: off in low-memory mode. Passes with grad are
        # graphed too (forward and backward; under gradient checkpointing the backward graph recomputes).
        self.cuda_graphs = (not config.low_memory) if cuda_graphs is None else cuda_graphs
        self.graded_graphs = self.cuda_graphs if graded_graphs is None else graded_graphs
        self.student_graphs_off_reason = cuda_graphs_mod.parameter_graphs_unsupported_reason() if self.graded_graphs else None
        self.student_graphs = self.graded_graphs and self.student_graphs_off_reason is None
        if self.student_graphs_off_reason:
            log.warning("RAPM: %s", self.student_graphs_off_reason)
        self.graphs = None
        self.sdxl = host.is_sdxl_like(model)
        self.discriminator_kernel = discriminator_kernel or pcm_discriminator_kernel(self.sdxl)
        with torch.inference_mode(False):  # nodes run under inference mode; trainable tensors must not
            self.data = trajectory_set.load()
            self.lora = lora_mod.LoRA(host.weight_modules(model), config.lora_rank, config.lora_alpha, seed=config.seed)
        self.dtype = host.training_dtype(model, precision)
        self.student = host.trainable_clone(model, self.dtype)
        self.tap = host.FeatureTap(self.student, include_up=not self.sdxl) if config.uses_gan else None
        self.latent_shape = tuple(self.data[0].positions.shape[1:])

    def run(self, fn: Callable[[trainer.Trainer], object]):
        """Build the Trainer with the model loaded and call fn(trainer); returns fn's result."""
        data, tap, lora, config = self.data, self.tap, self.lora, self.config

        def body(denoiser):
            with host.training_weights(self.student, self.dtype):
                return build_and_run(denoiser)

        def build_and_run(denoiser):
            device = denoiser.device
            lora.to(device)
            conditioning = lambda i: denoiser.prepare(data[i].positive, data[i].negative)  # noqa: E731
            features = (lambda x, s, c: tap(denoiser, x, s, c)) if tap else None
            discriminators = None
            if tap:
                lora.set_enabled(False)
                with torch.no_grad():
                    sigma = schedule.sigma_at(denoiser.model_sampling, [self.set.timesteps[1]]).to(device)
                    probe = features(torch.zeros((1,) + self.latent_shape, device=device), sigma, conditioning(0))
                lora.set_enabled(True)
                discriminators = Discriminators([f.shape[1] for f in probe], kernel=self.discriminator_kernel,
                                                seed=config.seed).to(device).set_compute_dtype(self.dtype)
            def paired_conditioning(i, j):  # trajectory i's and j's conditioning as one batch of 2
                return denoiser.prepare(host.stack_conditioning([data[i].positive, data[j].positive]),
                                        host.stack_conditioning([data[i].negative, data[j].negative]),
                                        (2,) + self.latent_shape)
            tr = trainer.Trainer(
                config, trainer.TrainingData([t.positions for t in data], conditioning, self.set.timesteps, self.set.cfg,
                                             paired_conditioning),
                denoiser.model_sampling, lora, discriminators, lambda x, s, c, g: denoiser(x, s, c, cfg=g),
                features, device, paired=self.paired_iterations)
            with host.lora_attached(self.student, lora), host.autotuned_convolutions(), \
                    host.graphed_unet(self.student, self.cuda_graphs, lambda: lora.enabled, tap, self.graded_graphs,
                                      lambda: lora if lora.enabled else None, self.student_graphs) as graphs, \
                    host.gradient_checkpointing(self.student, self.gradient_checkpointing, lora.recompute_context):
                self.graphs = graphs
                try:
                    return fn(tr)
                finally:
                    self.graphs = None
                    # a gradient may live in a graph's memory pool: the LoRA outlives the session, its pools must not
                    lora.zero_grad(set_to_none=True)

        with torch.inference_mode(False):
            return host.run_with_denoiser(self.student, data[0].positive, data[0].negative, (1,) + self.latent_shape,
                                          body, seed=config.seed)

    @property
    def safe_path_notice(self) -> str | None:
        """What the node adds to its progress line while it runs a slower, safe path (None: full speed)."""
        from . import convolutions
        lines = [text for text in (convolutions.notice(), self.student_graphs_off_reason) if text]
        return "\n".join(lines) or None

    def lora_weights(self, metadata: dict) -> lora_mod.LoRAWeights:
        return lora_mod.LoRAWeights(self.lora.comfy_state_dict(torch.float16), metadata)
