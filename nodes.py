"""ComfyUI glue: widgets → calls into comfy_rapm, progress, errors. No math here."""
from __future__ import annotations

import os

import torch

from .comfy_rapm import checkpoints, host, lora_file, presets, progress, sampler, session, settings, shared_store, storage, trainer
from .comfy_rapm import trajectories as traj
from .comfy_rapm import solver as solver_mod
from .comfy_rapm.errors import NodeInputError

MAX_SEED = 0xFFFFFFFFFFFFFFFF
TRAJECTORY_FOLDER, RUN_FOLDER = "rapm_trajectories", "rapm_runs"
DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
PROGRESS_TEXT_SECONDS = 1.0  # a node's text line is resent at most this often (and after the last step)
DISCRIMINATOR_HEADS = {"auto": None, "3x3": 3, "1x1": 1}  # the heads' conv size; None = the family's


def _advanced(spec: tuple) -> tuple:
    """The input behind the node's "Show Advanced" (front ends that have it; others show it as usual)."""
    return (spec[0], dict(spec[1], advanced=True))


def _checked(node: str, input_name: str, parse, value):
    """parse(value), a ValueError from it becoming the node's input error."""
    try:
        return parse(value)
    except ValueError as e:
        raise NodeInputError(node, input_name, str(e)) from None


def _check_latent(node: str, model, latent: dict, input_name: str = "latent_image") -> torch.Tensor:
    samples = host.fix_empty_latent_channels(model, latent["samples"])
    want = host.latent_channels(model)
    if samples.ndim != 4 or samples.shape[1] != want:
        raise NodeInputError(node, input_name,
                             f"the latent has shape {tuple(samples.shape)} but this model ({host.model_family(model)}) "
                             f"uses {want}-channel latents. Use an Empty Latent Image (or a VAE Encode) made for this model.")
    return samples


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
        samples = _check_latent("RAPMSampler", model, latent_image)
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


def trajectory_root() -> str:
    return os.path.join(host.output_directory(), TRAJECTORY_FOLDER)


def _read_prompts(node: str, prompts: str, prompts_file: str) -> list[str]:
    lines = traj.parse_prompts(prompts)
    if prompts_file and prompts_file.strip():
        path = _checked(node, "prompts_file", lambda f: storage.child_path(host.input_directory(), f, "prompts_file"),
                        prompts_file.strip())
        if not path.is_file():
            raise NodeInputError(node, "prompts_file", f"{path} does not exist; put the file in ComfyUI's input folder")
        lines += traj.parse_prompts(path.read_text(encoding="utf-8"))
    if not lines:
        raise NodeInputError(node, "prompts", "no prompts: write one prompt per line (lines starting with # are ignored)")
    return lines


class RAPMTeacherTrajectory:
    """Precompute the teacher's sampling trajectories that RAPMTrain learns from."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The teacher."}),
            "clip": ("CLIP",),
            "prompts": ("STRING", {"multiline": True, "default": "a photo of a cat\na watercolor landscape",
                                   "tooltip": "One prompt per line; blank lines and # comments are ignored. Cycled to reach count."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
            "width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8}),
            "height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8}),
            "count": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip": "How many trajectories (the paper uses 1000)."}),
            "steps": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "N: the student's step count."}),
            "fine_steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "M: teacher DDIM steps inside each of the N slots."}),
            "cfg": ("FLOAT", {"default": presets.SD15.teacher_cfg, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Teacher guidance (SD1.5: 5-6, SDXL: 7-8). The student learns it; it samples at cfg 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Trajectory i uses noise seed + i."}),
            "batch_size": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "Trajectories computed at once; 0 = auto: 32 at SD1.5's 512 px, fewer in proportion to the latent area (SDXL 1024 px: 8). Lower it if the teacher runs out of memory."}),
            "name": ("STRING", {"default": "rapm_set", "tooltip": "Folder under output/rapm_trajectories/. Rerun with the same inputs to resume."}),
        }, "optional": {
            "prompts_file": ("STRING", {"default": "", "tooltip": "Optional text file in ComfyUI's input folder, one prompt per line, added to the prompts."}),
            "solver": _advanced((list(solver_mod.SOLVERS), {"default": "ddim", "tooltip": "The teacher's solver inside each slot, fine_steps steps of it: ddim (the paper's; ComfyUI's euler), or ComfyUI's multistep dpmpp_2m / uni_pc. Part of the set: another solver makes another set."})),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("RAPM_TRAJECTORIES",)
    RETURN_NAMES = ("trajectories",)
    FUNCTION = "generate"
    OUTPUT_NODE = True
    CATEGORY = "training/RAPM"
    DESCRIPTION = "Teacher trajectories: N+1 positions per noise, by M-step DDIM with CFG in each slot, stored safely and resumably."

    def generate(self, model, clip, prompts, negative_prompt, width, height, count, steps, fine_steps, cfg, seed,
                 batch_size, name, prompts_file="", solver="ddim", unique_id=None):
        node = "RAPMTeacherTrajectory"
        name = _checked(node, "name", storage.check_name, name)
        factor = host.latent_downscale(model)
        if width % factor or height % factor:
            raise NodeInputError(node, "width" if width % factor else "height",
                                 f"{width}×{height} is not a multiple of {factor}, the model's latent scale")
        latent_shape = (host.latent_channels(model), height // factor, width // factor)
        spec = traj.Spec(
            prompts=_read_prompts(node, prompts, prompts_file), negative_prompt=negative_prompt, width=width,
            height=height, count=count, steps=steps, fine_steps=fine_steps, cfg=cfg, seed=seed,
            batch_size=batch_size or traj.default_batch_size(latent_shape), model=host.model_info(model, latent_shape),
            solver=solver)
        store = _checked(node, "name", lambda n: shared_store.open_store(os.path.join(trajectory_root(), n), spec), name)
        bar = host.Progress(count, unique_id)
        clock = progress.Clock(count, store.stored_count(), "traj")
        notice = session.convolution_notice()  # a slower, safe path taken: said on every line
        suffix = f"\n{notice}" if notice else ""
        bar.text(clock.text(store.stored_count(), "starting") + suffix)  # replaces the previous run's line at once
        bar.update_absolute(store.stored_count())

        def batch_done(done, total):
            bar.update_absolute(done)
            bar.text(clock.text(done) + suffix)
        try:
            traj.generate(store, session.trajectory_batches(model, clip, spec, latent_shape, host.check_interrupt), batch_done)
        except host.interrupted_types():
            bar.text(f"Cancelled: {store.stored_count()} of {count} trajectories stored in {store.folder}. "
                     "Queue again with the same inputs to resume.")
            raise
        except Exception as e:
            if not host.is_oom(e):
                raise
            raise RuntimeError(f"{node}: out of GPU memory computing {spec.batch_size} trajectories at once. "
                               f"Fix: {store.out_of_memory_fix()}.") from None
        return (store.trajectory_set(),)


class RAPMLoadTrajectories:
    """Pick a stored trajectory set, to retrain without recomputing it."""

    @classmethod
    def INPUT_TYPES(cls):
        sets = traj.list_sets(trajectory_root()) or ["(none found)"]
        return {"required": {"name": (sets, {"tooltip": "Sets under output/rapm_trajectories/."})}}

    RETURN_TYPES = ("RAPM_TRAJECTORIES",)
    RETURN_NAMES = ("trajectories",)
    FUNCTION = "load"
    CATEGORY = "training/RAPM"

    @classmethod
    def IS_CHANGED(cls, name):
        path = os.path.join(trajectory_root(), name, "manifest.json")
        return storage.sha256_file(path) if os.path.isfile(path) else name

    def load(self, name):
        try:
            folder = storage.child_path(trajectory_root(), storage.check_name(name, "name"), "name")
            return (traj.TrajectorySet(folder),)
        except (ValueError, FileNotFoundError) as e:
            raise NodeInputError("RAPMLoadTrajectories", "name",
                                 f"{e}. Make the set with a Teacher Trajectories (RAPM) node first.") from None


class RAPMTrain:
    """Distill the teacher into a few-step LoRA student with RAPM (paper Alg. 2), batch size 1."""

    @classmethod
    def INPUT_TYPES(cls):
        sd15, sdxl = presets.SD15, presets.SDXL
        return {"required": {
            "model": ("MODEL", {"tooltip": "The teacher the trajectories were made with."}),
            "trajectories": ("RAPM_TRAJECTORIES",),
            "iterations": ("INT", {"default": sd15.iterations, "min": 1, "max": 10000000,
                                   "tooltip": "k counts discriminator (even) and student (odd) iterations, as in the paper."}),
            "lora_rank": ("INT", {"default": sd15.lora_rank, "min": 1, "max": 1024}),
            "lora_alpha": _advanced(("FLOAT", {"default": sd15.lora_alpha, "min": 0.01, "max": 1024.0, "step": 0.01})),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-7, "round": 1e-8,
                                        "tooltip": f"Student AdamW learning rate; 0 = the teacher family's (PCM: {sd15.learning_rate:g} SD1.5-like, {sdxl.learning_rate:g} SDXL-like)."}),
            "discriminator_learning_rate": _advanced(("FLOAT", {"default": sd15.discriminator_learning_rate, "min": 0.0, "max": 1.0, "step": 1e-7, "round": 1e-8})),
            "delta": _advanced(("INT", {"default": 0, "min": 0, "max": 500, "tooltip": f"Δ, the teacher's skip step in timesteps; 0 = the family's ({sd15.delta} SD1.5-like, {sdxl.delta} SDXL-like)."})),
            "absolute_weight": _advanced(("STRING", {"default": "1.0", "tooltip": "w_n: one value, or one per step from the first (noisiest) to the last, comma-separated."})),
            "huber_c": _advanced(("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001, "round": 1e-6})),
            "adversarial_weight": _advanced(("FLOAT", {"default": sd15.adversarial_weight, "min": 0.0, "max": 100.0, "step": 0.01})),
            "mode": (list(settings.MODES), {"tooltip": "rapm = relative + absolute matching; the others are the paper's ablations."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
            "checkpoint_every": _advanced(("INT", {"default": 500, "min": 1, "max": 1000000})),
            "name": ("STRING", {"default": "rapm_run", "tooltip": "Folder under output/rapm_runs/. Rerun with the same name and settings to resume."}),
        }, "optional": {
            "weight_decay": _advanced(("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.0001, "tooltip": f"Student AdamW weight decay; -1 = the family's (PCM: {sd15.weight_decay:g} SD1.5-like, {sdxl.weight_decay:g} SDXL-like)."})),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute UNet blocks in backward: far less memory for a little more time. Turn off only with memory to spare."}),
            "low_memory": ("BOOLEAN", {"default": False, "tooltip": "Back-propagate slot by slot (the same gradients, one slot's graph alive at a time) without CUDA graphs: less memory, several times slower. For SDXL on a 16 GB card; for SD1.5 on a 12 GB card try discriminator_heads 1x1 first."}),
            "precision": _advanced((["auto", "bf16", "fp32"], {"tooltip": "auto: bf16 on GPUs that support it, fp32 elsewhere. bf16 also runs on the CPU (slowly)."})),
            "discriminator_heads": _advanced((list(DISCRIMINATOR_HEADS), {"tooltip": "The discriminator heads' convolutions; auto = PCM's for the family (3x3 SD1.5-like, 1x1 SDXL-like). 1x1 needs far less memory: the setting for SD1.5 on a 12 GB card."})),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP")
    RETURN_NAMES = ("model", "lora", "loss")
    FUNCTION = "train"
    CATEGORY = "training/RAPM"
    DESCRIPTION = "RAPM: relative and absolute position matching with two discriminators; checkpoints and resumes by name."

    def train(self, model, trajectories, iterations, lora_rank, lora_alpha, learning_rate, discriminator_learning_rate,
              delta, absolute_weight, huber_c, adversarial_weight, mode, seed, checkpoint_every, name,
              weight_decay=-1.0, gradient_checkpointing=True, low_memory=False, precision="auto",
              discriminator_heads="auto", unique_id=None):
        node = "RAPMTrain"
        name = _checked(node, "name", storage.check_name, name)
        info = host.model_info(model)
        trajectories.check_compatible(info, node)
        if discriminator_heads not in DISCRIMINATOR_HEADS:
            raise NodeInputError(node, "discriminator_heads", f"'{discriminator_heads}' is not one of {', '.join(DISCRIMINATOR_HEADS)}")
        preset = presets.for_teacher(host.is_sdxl_like(model))
        config = settings.Config(
            iterations=iterations, lora_rank=lora_rank, lora_alpha=lora_alpha,
            discriminator_learning_rate=discriminator_learning_rate,
            absolute_weight=_checked(node, "absolute_weight", settings.parse_absolute_weight, absolute_weight),
            huber_c=huber_c, adversarial_weight=adversarial_weight, mode=mode, seed=seed, checkpoint_every=checkpoint_every,
            low_memory=low_memory, precision=precision, gradient_checkpointing=gradient_checkpointing,
            **presets.resolve(preset, info["num_timesteps"], learning_rate=learning_rate or None,
                              weight_decay=None if weight_decay < 0 else weight_decay, delta=delta or None,
                              discriminator_kernel=DISCRIMINATOR_HEADS[discriminator_heads]))
        _checked(node, "absolute_weight", config.weights, trajectories.steps)
        _checked(node, "precision", lambda p: host.training_dtype(model, p), precision)
        folder = os.path.join(host.output_directory(), RUN_FOLDER, name)
        run = checkpoints.Run(folder, checkpoints.run_identity(config, trajectories.fingerprint(), info["fingerprint"],
                                                       preset.discriminator_kernel))
        _checked(node, "name", lambda _: run.open(), name)
        sess = session.Session(model, trajectories, config)
        bar = host.Progress(iterations, unique_id)
        line = progress.TrainingLine(iterations, bar.text, PROGRESS_TEXT_SECONDS, sess.safe_path_notice)
        line.loading(run.saved_iteration())

        def fit(tr):
            run.restore(tr)
            bar.update_absolute(tr.iteration)
            line.started(tr.iteration)

            def on_iteration(k, losses):
                bar.update_absolute(k)
                line.iteration(k, losses)
            checkpoints.train(tr, run, on_iteration, interrupted=host.interrupted_types(), check_interrupt=host.check_interrupt)
            return tr

        try:
            tr = sess.run(fit)
        except host.interrupted_types():
            line.cancelled(run.saved_iteration(), folder, name)  # the checkpoint Cancel wrote
            raise
        except trainer.NonFiniteLoss as e:
            raise RuntimeError(f"{node}: {e}. Training stopped and the last good checkpoint in {folder} is kept. "
                               "Lower learning_rate / discriminator_learning_rate or use precision fp32, then rerun "
                               "with the same name to resume from that checkpoint.") from None
        except Exception as e:
            if not host.is_oom(e):
                raise
            raise RuntimeError(f"{node}: out of GPU memory. Fix: {settings.out_of_memory_fix(config)}; rerun with the same "
                               "name to resume from the last checkpoint.") from None
        weights = sess.lora_weights(lora_file.training_metadata(info, trajectories, config, tr.iteration, name))
        return (host.apply_lora(model, weights), weights, {"loss": list(tr.history["loss"])})


class RAPMSaveLoRA:
    """Write a LoRA file every ComfyUI LoRA loader applies, with kohya/modelspec/RAPM metadata."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORA_MODEL",),
            "filename_prefix": ("STRING", {"default": "rapm/rapm_lora", "tooltip": "Path inside models/loras/; never overwrites (a counter is added); saving the same LoRA again keeps the file it wrote."}),
            "key_format": (list(lora_file.KEY_FORMATS), {"tooltip": "comfyui: diffusion_model.* keys (ComfyUI's trainer); kohya: lora_unet_* (A1111/Forge too)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "training/RAPM"

    def save(self, lora, filename_prefix, key_format, unique_id=None):
        root = host.lora_directory()
        tensors = {k: v for k, v in lora.items() if isinstance(v, torch.Tensor)}
        path, written = _checked("RAPMSaveLoRA", "filename_prefix", lambda prefix: lora_file.save(
            root, prefix, tensors, dict(getattr(lora, "metadata", {})), key_format), filename_prefix)
        relative = os.path.relpath(path, root)
        host.Progress(1, unique_id).text(f"{'saved' if written else 'unchanged, kept'} models/loras/{relative}")
        return {"ui": {"text": [relative]}, "result": (relative,)}


class RAPMEmojiDemoLoader:
    """The built-in demo teacher: a small text-to-emoji model trained by this project's quality
    benchmark (32×32 RGB pixels, MiniLM text), with its text encoder and a pixel 'VAE'."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "training/RAPM"
    DESCRIPTION = ("An 11M-parameter emoji teacher (32×32 pixels, CFG 6). Prompts like 'grinning face, twitter style' "
                   "(styles: twitter, google, fluent 3d). Its latent is the image: use 256×256 in Empty Latent Image "
                   "(32×32 after the usual ÷8) or 32×32 in Teacher Trajectories.")

    def load(self):
        from .comfy_rapm import emoji
        return _checked("RAPMEmojiDemoLoader", "(built-in)", emoji.load_teacher, DEMO_DIR)


NODE_CLASS_MAPPINGS = {
    "RAPMSampler": RAPMSampler,
    "RAPMTeacherTrajectory": RAPMTeacherTrajectory,
    "RAPMLoadTrajectories": RAPMLoadTrajectories,
    "RAPMTrain": RAPMTrain,
    "RAPMSaveLoRA": RAPMSaveLoRA,
    "RAPMEmojiDemoLoader": RAPMEmojiDemoLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "RAPMSampler": "RAPM Sampler",
    "RAPMTeacherTrajectory": "Teacher Trajectories (RAPM)",
    "RAPMLoadTrajectories": "Load Trajectories (RAPM)",
    "RAPMTrain": "RAPM Train",
    "RAPMSaveLoRA": "LoRA Save (RAPM)",
    "RAPMEmojiDemoLoader": "Emoji Demo Teacher (RAPM)",
}
