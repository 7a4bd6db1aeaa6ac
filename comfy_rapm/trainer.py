"""RAPM training (paper Alg. 2), batch size 1, one GPU.

One iteration k draws one stored trajectory z̃_N … z̃_0 and, for every slot n (t_{n+1} → t_n):
    ẑ^Δ   = DDIM(z̃_{n+1}, t_{n+1} → t_{n+1}-Δ; teacher, CFG)
    ẑ_n   = detach(DDIM(ẑ^Δ, t_{n+1}-Δ → t_n; student))            relative target (1st detach)
    z_n^φ = DDIM(z_{n+1}, t_{n+1} → t_n; student)                    z_{n+1} from the student's own chain
    loss += H(z_n^φ, ẑ_n) + D1  +  w_n [H(z_n^φ, z̃_n) + D2]
    z_n   = detach(z_n^φ)                                             (2nd detach)
k even: both discriminators step; k odd: the student LoRA steps. Losses are summed over slots and
there is one optimizer step per iteration.

Because every z_{n+1} is detached, the slots are independent given the stored positions: the
student's no-grad chain is the only sequential part; the teacher Δ-steps, the frozen-student
steps and the graded student steps each run as one batch over the N slots (or slot by slot with
per-slot backward in low-memory mode: the gradients are the same). Positions and losses are in
the paper's VP space; the model runs in its own space (schedule.to_vp / from_vp)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import losses, schedule, solver
from .discriminator import Discriminators
from .lora import LoRA
from .optim import AdamWNoMomentum
from .settings import MODES, Config

class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Draws:
    index: int             # which trajectory
    t_adv: torch.Tensor    # (N,) timesteps the discriminator inputs are re-noised to
    noise: torch.Tensor    # (N, C, H, W) the re-noising noise (CPU; moved to the device per use)


# A model call: (x in model space, σ per item, conditioning handle, cfg) → denoised.
ModelCall = Callable[[torch.Tensor, torch.Tensor, object, float], torch.Tensor]
# The backbone: (x in model space, σ per item, conditioning handle) → feature maps.
FeatureCall = Callable[[torch.Tensor, torch.Tensor, object], list]


@dataclass
class TrainingData:
    positions: list          # per trajectory: (N+1, C, H, W) VP tensors, z̃_N … z̃_0
    conditioning: Callable   # index → conditioning handle for ModelCall/FeatureCall
    timesteps: list          # [t_N, …, t_0]
    cfg: float               # the teacher's guidance when the trajectories were made
    # (i, j) → one handle whose batch-2 conditioning is trajectory i's then j's, tiled over a batch as the host tiles
    # conditioning (rows alternate i, j): only for paired iterations (Trainer(paired=True))
    paired_conditioning: Callable | None = None


@dataclass
class _Pending:
    """The next (student) iteration's draws and no-grad targets, computed with the discriminators' iteration."""
    iteration: int
    draws: "Draws"
    targets: tuple
    rng_before: torch.Tensor  # the draw generator's state before these draws: what a checkpoint records
    rng_pair: torch.Tensor    # its state before the discriminators' iteration's draws: to compute the pair again


class Trainer:
    def __init__(self, config: Config, data: TrainingData, model_sampling, lora: LoRA,
                 discriminators: Discriminators | None, model: ModelCall, features: FeatureCall | None,
                 device: torch.device):
        if config.mode not in MODES:
            raise ValueError(f"mode {config.mode!r} is not one of {MODES}")
        self.config, self.data, self.ms, self.lora = config, data, model_sampling, lora
        self.discriminators, self.model, self.features, self.device = discriminators, model, features, device
        self.steps = len(data.timesteps) - 1
        self.weights = torch.tensor(config.weights(self.steps), dtype=torch.float32, device=device)
        t = torch.tensor(data.timesteps)
        self.t_from, self.t_to = t[:-1], t[1:]
        if config.delta < 0 or (self.t_from - config.delta < self.t_to).any():
            raise ValueError(f"delta {config.delta} must be ≥ 0 and shorter than every slot ({(self.t_from - self.t_to).min().item()} timesteps)")
        sig = lambda ts: schedule.sigma_at(model_sampling, ts).to(device)  # noqa: E731
        self.s_from, self.s_to, self.s_delta = sig(self.t_from), sig(self.t_to), sig(self.t_from - config.delta)
        self.num_timesteps = schedule.num_timesteps(model_sampling)
        self.adv_span = self.num_timesteps // self.steps
        self.rng = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.history = {"loss": [], "huber": [], "generator": [], "discriminator": []}
        self.student_opt = torch.optim.AdamW(lora.parameters(), lr=config.learning_rate, betas=(0.9, 0.999),
                                             weight_decay=config.weight_decay)
        self.paired = config.paired_iterations and not config.low_memory and data.paired_conditioning is not None
        self.step_graphs = None  # a cuda_graphs.StepGraphs: each side's whole step as one graph (set by the session)
        self.targets_graphs = None  # another, for targets() (Config.targets_graph; set by the session)
        self._chain_stream = None  # where the chain runs while the targets' graph is captured
        self._pending: _Pending | None = None
        self._resumed_pair = None  # a checkpoint's "rng_pair" (load_state_tensors)
        self.disc_opt = None
        if config.uses_gan:
            if discriminators is None or features is None:
                raise ValueError(f"mode {config.mode} needs discriminators and a feature backbone")
            self.disc_opt = AdamWNoMomentum(discriminators.parameters(), lr=config.discriminator_learning_rate,
                                            beta2=0.999, weight_decay=0.0)

    # --- model passes -------------------------------------------------------------------

    def ddim_step(self, z_vp, s_from, s_to, cond, cfg, student: bool):
        """One DDIM step on VP positions (batch over slots), returning VP positions."""
        self.lora.set_enabled(student)
        x = schedule.from_vp(z_vp, s_from, self.ms)
        x = solver.ddim_step(lambda xx, ss: self.model(xx, ss, cond, cfg), x, s_from, s_to)
        return schedule.to_vp(x, s_to, self.ms)

    def adversarial_sigmas(self, t_adv) -> torch.Tensor:
        return schedule.sigma_at(self.ms, t_adv).to(self.device)

    def backbone_features(self, z_vp, s_adv, s_n, noise, cond):
        """Features of the frozen teacher at σ(adv_t) = `s_adv` for positions re-noised from t_n."""
        self.lora.set_enabled(False)
        x = schedule.renoise(self.ms, schedule.from_vp(z_vp, s_n, self.ms), s_n, s_adv, noise)
        return self.features(x, s_adv, cond)

    def targets(self, positions: torch.Tensor, cond):
        """The no-grad part of an iteration: the student's own chain and the relative targets.
        Returns (student inputs z_{n+1}, student outputs z_n, relative targets ẑ_n), each (N, C, H, W)."""
        return self._as_targets_graph(self._targets, (positions,), cond)

    def _as_targets_graph(self, targets: Callable, tensors: tuple, cond) -> tuple:
        """targets(tensors, cond), replayed from a CUDA graph when Config.targets_graph is on."""
        return tuple(targets(tensors, cond) if self.targets_graphs is None else self.targets_graphs(targets, tensors, cond))

    def _targets(self, tensors: tuple, cond) -> tuple:
        positions, = tensors

        def relative():
            teacher_delta = self.ddim_step(positions[:-1], self.s_from, self.s_delta, cond, self.data.cfg, student=False)
            return self.ddim_step(teacher_delta, self.s_delta, self.s_to, cond, 1.0, student=True)
        (inputs, outputs), relative = self._beside_the_chain(
            positions, lambda: self._chain(positions[0:1], lambda s: s, cond, torch.cat), relative)
        return inputs, outputs, relative

    def paired_targets(self, first: "Draws", second: "Draws") -> tuple[tuple, tuple]:
        """targets() of two draws in one batched pass; rows alternate first, second (slot-major), which is how the
        host tiles the batch-2 conditioning over the batch. Returns (first's targets, second's targets)."""
        pos = tuple(self.data.positions[d.index].to(self.device, torch.float32) for d in (first, second))
        cond = self.data.paired_conditioning(first.index, second.index)
        inputs, outputs, relative = self._as_targets_graph(self._paired_targets, pos, cond)
        return tuple(tuple(None if t is None else t[:, k] for t in (inputs, outputs, relative)) for k in (0, 1))

    def _paired_targets(self, tensors: tuple, cond) -> tuple:
        """Both draws' targets, each (N, 2, C, H, W)."""
        n = self.steps
        two = lambda s: s.repeat_interleave(2)  # noqa: E731  (per row: slot-major, the two draws alternating)

        def relative():
            starts = torch.stack([tensors[0][:-1], tensors[1][:-1]], dim=1).flatten(0, 1)
            teacher_delta = self.ddim_step(starts, two(self.s_from), two(self.s_delta), cond, self.data.cfg, student=False)
            targets = self.ddim_step(teacher_delta, two(self.s_delta), two(self.s_to), cond, 1.0, student=True)
            return targets.unflatten(0, (n, 2))
        start = torch.cat([tensors[0][0:1], tensors[1][0:1]])
        (inputs, outputs), relative = self._beside_the_chain(
            tensors[0], lambda: self._chain(start, two, cond, torch.stack), relative)
        return inputs, outputs, relative

    def _chain(self, start, per_row, cond, join) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's own chain from `start` (no grad), sigmas per row by `per_row`; (inputs, outputs) of its steps,
        each joined over the steps by `join` (torch.cat: (N, …); torch.stack: (N, rows, …))."""
        chain = [start]
        for j in range(self.steps):
            chain.append(self.ddim_step(chain[-1], per_row(self.s_from[j:j + 1]), per_row(self.s_to[j:j + 1]), cond, 1.0,
                                        student=True))
        return join(chain[:-1]), join(chain[1:])

    def _beside_the_chain(self, like: torch.Tensor, chain: Callable, relative: Callable) -> tuple:
        """(chain(), relative() or None when the mode has no relative term), without grad. While the targets' CUDA
        graph is captured the chain goes on a second stream: its batch-1 (or 2) passes use a fraction of the GPU, and
        the teacher's and frozen student's batched steps, which read only the stored positions, run beside them in the
        graph; the chain's temporaries are freed on its own stream, before the streams join."""
        side = current = None
        if like.is_cuda and self.targets_graphs is not None:
            current = torch.cuda.current_stream(like.device)
            if self._chain_stream is None:  # made in the eager run before the capture, not during it
                self._chain_stream = torch.cuda.Stream(like.device)
            if torch.cuda.is_current_stream_capturing():
                side = self._chain_stream
                side.wait_stream(current)
        with torch.no_grad():
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                chained = chain()
            related = relative() if self.config.uses_relative else None
        if side is not None:
            current.wait_stream(side)
        return chained, related

    def draw(self) -> "Draws":
        """The iteration's random choices: which trajectory, adv_t and re-noising noise per slot."""
        index = int(torch.randint(0, len(self.data.positions), (1,), generator=self.rng))
        t_adv = torch.clamp(self.t_to + torch.randint(0, self.adv_span, (self.steps,), generator=self.rng),
                            max=self.num_timesteps - 1)
        noise = torch.randn((self.steps,) + tuple(self.data.positions[index].shape[1:]), generator=self.rng)
        return Draws(index, t_adv, noise)

    # --- one iteration ------------------------------------------------------------------

    def run_iteration(self) -> dict:
        """Iteration self.iteration (even: discriminators, odd: student). Returns its losses.
        Raises NonFiniteLoss without stepping when a loss is NaN/inf."""
        cfg = self.config
        student_turn = self.iteration % 2 == 1
        pending = self._pending if self._pending is not None and self._pending.iteration == self.iteration else None
        if pending is None and student_turn and self._resumed_pair is not None:
            # saved between a pair's two iterations: the pair made again, as the uninterrupted run made it
            self.rng.set_state(self._resumed_pair)
            pending = self._draw_pair(self.iteration)[2]
        self._resumed_pair = None
        self._pending = pending
        targets = pending.targets if pending else None
        if pending:
            draws = pending.draws
        elif not student_turn and self.paired and cfg.uses_gan:
            draws, targets, self._pending = self._draw_pair(self.iteration + 1)
        else:
            draws = self.draw()
        if not student_turn and not cfg.uses_gan:
            self.iteration += 1
            return {}
        result = self.backward(draws, student_turn, targets)
        self.optimizer_step(student_turn)
        if student_turn:
            self._pending = None
            for key in ("loss", "huber", "generator"):
                self.history[key].append(result[key])
        else:
            self.history["discriminator"].append(result["discriminator"])
        self.iteration += 1
        return result

    def _draw_pair(self, following_iteration: int) -> tuple:
        """A discriminators' iteration's draws and the next (student) iteration's, their targets computed in one
        batch (whose float sums differ from unpaired ones in the last bits): (draws, their targets, the next one's
        _Pending)."""
        rng_pair = self.rng.get_state()
        draws = self.draw()
        rng_before = self.rng.get_state()
        following = self.draw()
        targets, following_targets = self.paired_targets(draws, following)
        return draws, targets, _Pending(following_iteration, following, following_targets, rng_before, rng_pair)

    def optimizer_step(self, student_turn: bool) -> None:
        """The side's clipped optimizer step on the gradients backward() left, which then go: they are not kept through
        the other side's turn (the heads' gradients are 1.2 GiB for SD1.5)."""
        params, opt = ((self.lora.parameters(), self.student_opt) if student_turn
                       else (self.discriminators.parameters(), self.disc_opt))
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def backward(self, draws: "Draws", student_turn: bool, targets: tuple | None = None) -> dict:
        """The iteration's summed loss for the side whose turn it is, back-propagated into that
        side's gradients (zeroed first); no optimizer step. `targets`: targets() computed already."""
        positions = self.data.positions[draws.index].to(self.device, torch.float32)
        cond = self.data.conditioning(draws.index)
        inputs, outputs, relative = targets if targets is not None else self.targets(positions, cond)
        noise = draws.noise.to(self.device)
        if student_turn:
            return self._student_backward(inputs, relative, positions[1:], draws.t_adv, noise, cond)
        return self._discriminator_backward(outputs, relative, positions[1:], draws.t_adv, noise, cond)

    def _discriminator_backward(self, fakes, relative, absolute, t_adv, noise, cond) -> dict:
        cfg = self.config
        reals = [r for r, used in ((relative, cfg.uses_relative), (absolute, cfg.uses_absolute)) if used]
        batch = torch.cat([fakes] + reals)
        repeat = len(reals) + 1
        self.disc_opt.zero_grad(set_to_none=True)
        s_adv, s_n, noise = self.adversarial_sigmas(t_adv.repeat(repeat)), self.s_to.repeat(repeat), noise.repeat(repeat, 1, 1, 1)
        if self.step_graphs is not None:
            return self._discriminator_step_graphed(batch, s_adv, s_n, noise, cond)
        with torch.no_grad():
            feats = self.backbone_features(batch, s_adv, s_n, noise, cond)
        total = torch.zeros((), device=self.device)
        for loss, _ in self._head_losses(feats):
            loss.backward()
            total = total + loss.detach()
        self._check_finite(total, "discriminator")  # before the optimizer step, which the caller skips on raise
        return {"discriminator": total.item()}

    def _head_losses(self, feats):
        """(loss, head) for each head of each discriminator in use: Σ_slots w_n · the head's hinge term / heads. Each
        head owns its parameters and reads detached features, so back-propagating one at a time gives the gradients
        of the whole sum while only one head's activations are alive (all of them at once were ~2 GiB for SD1.5)."""
        n = self.steps
        for heads, part, weights in self._discriminators_in_use():
            for i, f in enumerate(feats):  # fakes are rows 0…n-1, the reals block `part`
                logits = heads.head_logits(i, torch.cat([f[:n], f[part * n:(part + 1) * n]]))
                term = losses.hinge_discriminator_head(logits[:n], logits[n:]) / len(feats)
                yield (term if weights is None else weights * term).sum(), heads.heads[i]

    def _discriminators_in_use(self) -> list:
        """(discriminator, block of real rows in the batch, slot weights) for each discriminator the mode trains."""
        cfg, d = self.config, self.discriminators
        parts = []
        if cfg.uses_relative:
            parts.append((d.relative, 1, None))
        if cfg.uses_absolute:
            parts.append((d.absolute, len(parts) + 1, self.weights))
        return parts

    def _discriminator_step_graphed(self, batch, s_adv, s_n, noise, cond) -> dict:
        """The discriminators' step as one graph (self.step_graphs): the backbone's features, then head by head its
        loss and torch.autograd.grad into that head; a discriminator not in use keeps no gradient, as with backward."""
        used = [p for heads, _, _ in self._discriminators_in_use() for head in heads.heads for p in head.parameters()]

        def step(tensors, handle):
            batch_, s_adv_, s_n_, noise_ = tensors
            with torch.no_grad():
                feats = self.backbone_features(batch_, s_adv_, s_n_, noise_, handle)
            total, grads = torch.zeros((), device=self.device), []
            for loss, head in self._head_losses(feats):  # the heads in `used`'s order
                grads += torch.autograd.grad(loss, list(head.parameters()))
                total = total + loss.detach()
            if len(grads) != len(used):
                raise RuntimeError(f"{len(grads)} head gradients for {len(used)} head parameters")
            return (total,) + tuple(grads)
        total, *grads = self.step_graphs(step, (batch, s_adv, s_n, noise), cond)
        self._check_finite(total, "discriminator")
        for p, g in zip(used, grads):
            p.grad = g  # the graph's output: used by this iteration's optimizer step, overwritten by the next replay
        return {"discriminator": total.item()}

    def _student_losses(self, z_phi, relative, absolute, s_adv, s_to, w, noise, cond):
        """Huber and generator terms for the slots in z_phi; the other tensors are those slots' (relative: None when
        the mode has no relative term)."""
        cfg = self.config
        huber = torch.zeros((), device=self.device)
        if cfg.uses_relative:
            huber = huber + losses.pseudo_huber(z_phi, relative, cfg.huber_c).sum()
        if cfg.uses_absolute:
            huber = huber + (w * losses.pseudo_huber(z_phi, absolute, cfg.huber_c)).sum()
        generator = torch.zeros((), device=self.device)
        if cfg.uses_gan:
            d = self.discriminators
            feats = self.backbone_features(z_phi, s_adv, s_to, noise, cond)
            if cfg.uses_relative:
                generator = generator + losses.hinge_generator(d.relative(feats)).sum()
            if cfg.uses_absolute:
                generator = generator + (w * losses.hinge_generator(d.absolute(feats))).sum()
            generator = generator * cfg.adversarial_weight
        return huber, generator

    def _slot_tensors(self, j: slice, inputs, relative, absolute, s_adv, noise) -> tuple:
        """What the student's step reads for the slots j: (z_{n+1}, ẑ_n, z̃_n, σ(adv_t), noise, σ_{n+1}, σ_n, w_n)."""
        return (inputs[j], None if relative is None else relative[j], absolute[j], s_adv[j], noise[j],
                self.s_from[j], self.s_to[j], self.weights[j])

    def _student_step(self, tensors, cond):
        inputs, relative, absolute, s_adv, noise, s_from, s_to, w = tensors
        z_phi = self.ddim_step(inputs, s_from, s_to, cond, 1.0, student=True)
        return self._student_losses(z_phi, relative, absolute, s_adv, s_to, w, noise, cond)

    def _student_backward(self, inputs, relative, absolute, t_adv, noise, cond) -> dict:
        cfg = self.config
        self.student_opt.zero_grad(set_to_none=True)
        groups = [slice(j, j + 1) for j in range(self.steps)] if cfg.low_memory else [slice(0, self.steps)]
        huber_sum, gen_sum = 0.0, 0.0
        s_adv = self.adversarial_sigmas(t_adv)
        if self.discriminators is not None:
            self.discriminators.requires_grad_(False)
        try:
            if self.step_graphs is not None:
                return self._student_steps_graphed([self._slot_tensors(j, inputs, relative, absolute, s_adv, noise)
                                                    for j in groups], cond)
            for j in groups:
                huber, generator = self._student_step(self._slot_tensors(j, inputs, relative, absolute, s_adv, noise), cond)
                loss = huber + generator
                self._check_finite(loss, "student")
                loss.backward()
                huber_sum += huber.item()
                gen_sum += generator.item()
        finally:
            if self.discriminators is not None:
                self.discriminators.requires_grad_(True)
            self.lora.set_enabled(True)
        return {"loss": huber_sum + gen_sum, "huber": huber_sum, "generator": gen_sum}

    def _student_steps_graphed(self, groups: list[tuple], cond) -> dict:
        """The student's step as one graph (self.step_graphs) per group of slots (all slots; slot by slot in low-memory
        mode, one graph replayed per slot): the same losses, gradients by torch.autograd.grad instead of backward,
        summed over the groups, checked for finiteness after the replays."""
        parameters = list(self.lora.parameters())

        def step(tensors, handle):
            huber, generator = self._student_step(tensors, handle)
            return (huber, generator) + torch.autograd.grad(huber + generator, parameters)
        sums = None
        for tensors in groups:
            huber, generator, *grads = self.step_graphs(step, tensors, cond)
            if len(groups) == 1:
                sums = [huber, generator] + grads  # the graph's outputs: overwritten by its next replay
            elif sums is None:
                sums = [t.clone() for t in [huber, generator] + grads]
            else:
                torch._foreach_add_(sums, [huber, generator] + grads)
        huber, generator, *grads = sums
        self._check_finite(huber + generator, "student")
        for p, g in zip(parameters, grads):
            p.grad = g  # used by this iteration's optimizer step
        h, g = huber.item(), generator.item()
        return {"loss": h + g, "huber": h, "generator": g}

    def _check_finite(self, loss: torch.Tensor, which: str) -> None:
        loss = loss.detach()
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(f"the {which} loss is {loss.item()} at iteration {self.iteration + 1}")

    # --- checkpoints --------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"lora.{k}": v for k, v in self.lora.state_dict().items()}
        if self.discriminators is not None:
            out.update({f"disc.{k}": v for k, v in self.discriminators.state_dict().items()})
        out.update(_optimizer_tensors(self.student_opt, "opt.student"))
        if self.disc_opt is not None:
            out.update(_optimizer_tensors(self.disc_opt, "opt.disc"))
        pending = self._pending
        # a paired run has drawn the next iteration's choices already: record the state before them
        between = pending is not None and pending.iteration == self.iteration
        out["rng"] = pending.rng_before if between else self.rng.get_state()
        if between:
            out["rng_pair"] = pending.rng_pair
        out["iteration"] = torch.tensor(self.iteration, dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.lora.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        if self.discriminators is not None:
            self.discriminators.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        _load_optimizer(self.student_opt, tensors, "opt.student")
        if self.disc_opt is not None:
            _load_optimizer(self.disc_opt, tensors, "opt.disc")
        self.rng.set_state(tensors["rng"])
        self.iteration = int(tensors["iteration"])
        self._pending = None
        # saved between a pair's two iterations: the student's turn computes the pair's targets again, bit for bit
        self._resumed_pair = tensors.get("rng_pair") if self.paired else None


def _optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, prefix: str) -> None:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    current = opt.state_dict()
    current["state"] = state
    opt.load_state_dict(current)
