"""A training session on the host: the teacher, one LoRA over it (student), the discriminator
backbone taps, and a Trainer built inside ComfyUI's sampling context. Used by the RAPMTrain node,
the tests and the benchmarks, so all of them run the same code."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from . import conditioning, cuda_graphs as cuda_graphs_mod, host, lora as lora_mod, schedule, settings, trainer, training_unet, trajectories
from .discriminator import Discriminators
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
    with training_unet.autotuned_convolutions():
        return host.run_with_denoiser(model, positive, negative, noise.shape, body)


def trajectory_shard(model, positive, negative, noise: torch.Tensor, slots: list[list[int]], cfg: float,
                     on_step: Callable[[], None] | None = None, solver: str = "ddim") -> tuple[dict, dict]:
    """One shard of a trajectory set: the teacher's positions plus the conditioning exactly as the
    teacher saw it, as (tensors, metadata) for trajectories.generate."""
    positions = teacher_positions(model, positive, negative, noise, slots, cfg, on_step, solver)
    pos_t, pos_extra = trajectories.conditioning_tensors(positive, "positive")
    neg_t, neg_extra = trajectories.conditioning_tensors(negative, "negative")
    return dict(positions=positions, **pos_t, **neg_t), {"positive_extra": pos_extra, "negative_extra": neg_extra}


def trajectory_batches(model, clip, spec: trajectories.Spec, latent_shape: tuple[int, ...],
                       on_step: Callable[[], None] | None = None) -> Callable[[list[str], list[int]], tuple[dict, dict]]:
    """run_batch(prompts, seeds) for trajectories.generate: each prompt encoded once as CLIPTextEncode encodes it
    (with the teacher's size conditioning), ComfyUI's own noise for each seed, one shard of the teacher's positions."""
    size = host.size_conditioning(model, spec.width, spec.height)
    encoded = {}
    slots = spec.slots()

    def encode(text):
        if text not in encoded:
            cond = host.encode_text(clip, text)
            encoded[text] = [[cond[0][0], dict(cond[0][1], **size)]]
        return encoded[text]

    def run_batch(prompts: list[str], seeds: list[int]) -> tuple[dict, dict]:
        positive = conditioning.stack([encode(p) for p in prompts], "prompts")
        negative = conditioning.stack([encode(spec.negative_prompt)] * len(seeds), "negative_prompt")
        noise = torch.cat([host.prepare_noise(torch.zeros((1,) + tuple(latent_shape)), s) for s in seeds])
        return trajectory_shard(model, positive, negative, noise, slots, spec.cfg, on_step, spec.solver)
    return run_batch


class Session:
    """Teacher + student LoRA (+ discriminators) over one ComfyUI model, trained with `config`."""

    def __init__(self, model, trajectory_set: TrajectorySet, config: settings.Config):
        self.model, self.set, self.config = model, trajectory_set, config
        # step graphs replace the student's per-pass graded graphs: a failed step capture falls back to the backbone's only
        student_graded = config.uses_graded_graphs and not config.uses_step_graphs
        self.student_graphs_off_reason = cuda_graphs_mod.parameter_graphs_unsupported_reason() if student_graded else None
        self.student_graphs = student_graded and self.student_graphs_off_reason is None
        if self.student_graphs_off_reason:
            log.warning("RAPM: %s", self.student_graphs_off_reason)
        self.graphs = self.step_graphs = self.targets_graphs = None
        with torch.inference_mode(False):  # nodes run under inference mode; trainable tensors must not
            self.data = trajectory_set.load()
            self.lora = lora_mod.LoRA(host.weight_modules(model), config.lora_rank, config.lora_alpha, seed=config.seed)
        self.dtype = host.training_dtype(model, config.precision)
        self.student = host.trainable_clone(model, self.dtype)
        self.tap = (training_unet.FeatureTap(host.feature_layers(self.student, config.discriminator_reads_up))
                    if config.uses_gan else None)
        self.latent_shape = tuple(self.data[0].positions.shape[1:])

    def run(self, fn: Callable[[trainer.Trainer], object]):
        """Build the Trainer with the model loaded and the UNet rewired for training, and call fn(trainer);
        returns fn's result."""
        data, tap, lora, config = self.data, self.tap, self.lora, self.config

        def body(denoiser):
            device = denoiser.device
            lora.to(device)
            conditioning_of = lambda i: denoiser.prepare(data[i].positive, data[i].negative)  # noqa: E731
            features = (lambda x, s, c: tap(denoiser, x, s, c)) if tap else None
            with training_unet.rewired(host.module_root(self.student), host.unet(self.student), self.dtype, lora, tap,
                                       config, self.student_graphs, host.interrupted_types()) as graphs:
                discriminators = (self._discriminators(features, conditioning_of, denoiser.model_sampling, device, graphs)
                                  if tap else None)

                def paired_conditioning(i, j):  # trajectory i's and j's conditioning as one batch of 2
                    return denoiser.prepare(conditioning.stack([data[i].positive, data[j].positive]),
                                            conditioning.stack([data[i].negative, data[j].negative]),
                                            (2,) + self.latent_shape)
                tr = trainer.Trainer(
                    config, trainer.TrainingData([t.positions for t in data], conditioning_of, self.set.timesteps, self.set.cfg,
                                                 paired_conditioning),
                    denoiser.model_sampling, lora, discriminators, lambda x, s, c, g: denoiser(x, s, c, cfg=g),
                    features, device)
                if graphs is not None and config.uses_step_graphs:
                    pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None  # one pool: replayed in turn

                    def step_graphs():
                        return cuda_graphs_mod.StepGraphs(host.conditioning_tensors, graphs.paused,
                                                          interrupts=host.interrupted_types(), pool=pool)
                    tr.step_graphs = step_graphs()
                    # its own: a failed targets capture leaves the steps' graphs on
                    tr.targets_graphs = step_graphs() if config.uses_targets_graph else None
                self.graphs, self.step_graphs, self.targets_graphs = graphs, tr.step_graphs, tr.targets_graphs
                try:
                    return fn(tr)
                finally:
                    self.graphs = self.step_graphs = self.targets_graphs = None

        with torch.inference_mode(False):
            return host.run_with_denoiser(self.student, data[0].positive, data[0].negative, (1,) + self.latent_shape,
                                          body, seed=config.seed)

    def _discriminators(self, features, conditioning, model_sampling, device, graphs) -> Discriminators:
        """Heads sized by one backbone pass (eager: a graph of this batch shape would only hold memory)."""
        self.lora.set_enabled(False)
        if graphs is not None:
            graphs.enabled = False
        try:
            with torch.no_grad():
                sigma = schedule.sigma_at(model_sampling, [self.set.timesteps[1]]).to(device)
                probe = features(torch.zeros((1,) + self.latent_shape, device=device), sigma, conditioning(0))
        finally:
            self.lora.set_enabled(True)
            if graphs is not None:
                graphs.enabled = True
        return Discriminators([f.shape[1] for f in probe], kernel=self.config.discriminator_kernel,
                              seed=self.config.seed).to(device).set_compute_dtype(self.dtype)

    @property
    def safe_path_notice(self) -> str | None:
        """What the node adds to its progress line while it runs a slower, safe path (None: full speed)."""
        steps, targets = self.step_graphs, self.targets_graphs
        steps_off = (f"CUDA graphs of whole training steps are off ({steps.error}); the steps run without them, which "
                     "is slower." if steps is not None and steps.failed else None)
        targets_off = (f"The CUDA graph of the training targets is off ({targets.error}); they run pass by pass."
                       if targets is not None and targets.failed else None)
        lines = [text for text in (self.student_graphs_off_reason, steps_off, targets_off) if text]
        return "\n".join(lines) or None

    def lora_weights(self, metadata: dict) -> lora_mod.LoRAWeights:
        return lora_mod.LoRAWeights(self.lora.comfy_state_dict(torch.float16), metadata)
