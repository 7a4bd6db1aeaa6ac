"""ComfyUI glue: widgets → calls into comfy_rapm, progress, errors. No math here."""
from __future__ import annotations

import os

import torch

from .comfy_rapm import host, lora_file, progress, sampler, schedule, session, storage, trainer, trajectories
from .comfy_rapm import solver as solver_mod
from .comfy_rapm.errors import NodeInputError

MAX_SEED = 0xFFFFFFFFFFFFFFFF


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
        progress = host.Progress(steps)

        def run(denoiser):
            def step_done(i):
                host.check_interrupt()
                progress.update_absolute(i)
            latent = host.process_latent_in(model, samples) if torch.count_nonzero(samples) > 0 else None
            return sampler.sample(lambda x, s: denoiser(x, s, cfg=cfg), denoiser.model_sampling,
                                  noise.to(denoiser.device), steps, latent=latent, callback=step_done)

        x = host.run_with_denoiser(model, positive, negative, samples.shape, run, seed=seed)
        out = dict(latent_image)
        out["samples"] = host.process_latent_out(model, x.float()).cpu()
        out.pop("noise_mask", None)
        return (out,)


TRAJECTORY_FOLDER = "rapm_trajectories"


def trajectory_root() -> str:
    return os.path.join(host.output_directory(), TRAJECTORY_FOLDER)


def _read_prompts(node: str, prompts: str, prompts_file: str) -> list[str]:
    lines = trajectories.parse_prompts(prompts)
    if prompts_file and prompts_file.strip():
        try:
            path = storage.child_path(host.input_directory(), prompts_file.strip(), "prompts_file")
        except ValueError as e:
            raise NodeInputError(node, "prompts_file", f"{e}; name a text file inside ComfyUI's input folder") from None
        if not path.is_file():
            raise NodeInputError(node, "prompts_file", f"{path} does not exist; put the file in ComfyUI's input folder")
        lines += trajectories.parse_prompts(path.read_text(encoding="utf-8"))
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
            "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Teacher guidance (SD1.5: 5-6, SDXL: 7-8). The student learns it; it samples at cfg 1."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Trajectory i uses noise seed + i."}),
            "batch_size": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "Trajectories computed at once; 0 = auto: 32 at SD1.5's 512 px (6.3 GiB; 1,000 in 10 min on an H100), fewer in proportion to the latent area (SDXL 1024 px: 8, 9.6 GiB). Lower it if the teacher runs out of memory."}),
            "name": ("STRING", {"default": "rapm_set", "tooltip": "Folder under output/rapm_trajectories/. Rerun with the same inputs to resume."}),
        }, "optional": {
            "prompts_file": ("STRING", {"default": "", "tooltip": "Optional text file in ComfyUI's input folder, one prompt per line, added to the prompts."}),
            "solver": (list(solver_mod.SOLVERS), {"default": "ddim", "tooltip": "The teacher's solver inside each slot, fine_steps steps of it: ddim (the paper's; ComfyUI's euler), or ComfyUI's dpmpp_2m / uni_pc. Measured on the demo teacher: at 12 steps they are closer than 25 DDIM steps in the early slots with half the model calls, but less close at the last slot's end (bench/NOTES.md, 'in-slot solvers'); ddim stays the default."}),
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
        try:
            name = storage.check_name(name, "name")
        except ValueError as e:
            raise NodeInputError(node, "name", str(e)) from None
        factor = host.latent_downscale(model)
        if width % factor or height % factor:
            raise NodeInputError(node, "width" if width % factor else "height",
                                 f"{width}×{height} is not a multiple of {factor}, the model's latent scale")
        latent_shape = (host.latent_channels(model), height // factor, width // factor)
        batch_size = batch_size or trajectories.default_batch_size(latent_shape)
        spec = trajectories.Spec(
            prompts=_read_prompts(node, prompts, prompts_file), negative_prompt=negative_prompt, width=width,
            height=height, count=count, steps=steps, fine_steps=fine_steps, cfg=cfg, seed=seed,
            batch_size=batch_size, model=host.model_info(model, latent_shape), solver=solver)
        try:
            store = trajectories.Store.open(os.path.join(trajectory_root(), name), spec)
        except ValueError as e:
            raise NodeInputError(node, "name", str(e)) from None

        size_extra = {"width": width, "height": height, "crop_w": 0, "crop_h": 0,
                      "target_width": width, "target_height": height} if host.is_sdxl_like(model) else {}
        encoded = {}

        def encode(text):
            if text not in encoded:
                cond = host.encode_text(clip, text)
                encoded[text] = [[cond[0][0], dict(cond[0][1], **size_extra)]]
            return encoded[text]

        bar = host.Progress(count, unique_id)
        clock = progress.Clock(count, store.stored_count(), "traj")
        notice = session.convolution_notice()  # a slower, safe path taken (issue #17): said on every line
        suffix = f"\n{notice}" if notice else ""
        bar.text(clock.text(store.stored_count(), "starting") + suffix)  # replaces the previous run's line at once
        slots = spec.slots()

        def run_batch(batch_prompts, seeds):
            positive = host.stack_conditioning([encode(p) for p in batch_prompts], "prompts")
            negative = host.stack_conditioning([encode(negative_prompt)] * len(seeds), "negative_prompt")
            noise = torch.cat([host.prepare_noise(torch.zeros((1,) + latent_shape), s) for s in seeds])
            return session.trajectory_shard(model, positive, negative, noise, slots, cfg, on_step=host.check_interrupt,
                                            solver=solver)

        def batch_done(done, total):
            bar.update_absolute(done)
            bar.text(clock.text(done) + suffix)

        bar.update_absolute(store.stored_count())
        try:
            trajectories.generate(store, run_batch, batch_done)
        except host.interrupted_types():
            bar.text(f"Cancelled: {store.stored_count()} of {count} trajectories stored in {store.folder}. "
                     "Queue again with the same inputs to resume.")
            raise
        except Exception as e:
            if not host.is_oom(e):
                raise
            stored = store.stored_count()
            lower = f"lower batch_size (e.g. {max(1, batch_size // 2)})"
            fix = (f"{stored} trajectories are stored in {store.folder} and a set keeps its batch size: free GPU memory "
                   f"and rerun with batch_size {batch_size} to resume, or {lower} under another name") if stored else \
                  (f"{lower} and rerun under another name, or delete {store.folder} (nothing is stored in it yet)")
            raise RuntimeError(f"{node}: out of GPU memory computing {batch_size} trajectories at once. Fix: {fix}.") from None
        return (store.trajectory_set(),)


class RAPMLoadTrajectories:
    """Pick a stored trajectory set, to retrain without recomputing it."""

    @classmethod
    def INPUT_TYPES(cls):
        sets = trajectories.list_sets(trajectory_root()) or ["(none found)"]
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
        node = "RAPMLoadTrajectories"
        try:
            folder = storage.child_path(trajectory_root(), storage.check_name(name, "name"), "name")
            return (trajectories.TrajectorySet(folder),)
        except (ValueError, FileNotFoundError) as e:
            raise NodeInputError(node, "name", f"{e}. Make the set with a Teacher Trajectories (RAPM) node first.") from None


RUN_FOLDER = "rapm_runs"
PROGRESS_TEXT_SECONDS = 1.0  # the node's text line is resent at most this often (and after the last iteration)
DISCRIMINATOR_HEADS = {"auto": None, "3x3": 3, "1x1": 1}  # the heads' conv size; None = PCM's for the model


class RAPMTrain:
    """Distill the teacher into a few-step LoRA student with RAPM (paper Alg. 2), batch size 1."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The teacher the trajectories were made with."}),
            "trajectories": ("RAPM_TRAJECTORIES",),
            "iterations": ("INT", {"default": 20000, "min": 1, "max": 10000000,
                                   "tooltip": "k counts discriminator (even) and student (odd) iterations, as in the paper."}),
            "lora_rank": ("INT", {"default": 64, "min": 1, "max": 1024}),
            "lora_alpha": ("FLOAT", {"default": 8.0, "min": 0.01, "max": 1024.0, "step": 0.01}),
            "learning_rate": ("FLOAT", {"default": 5e-6, "min": 0.0, "max": 1.0, "step": 1e-7, "round": 1e-8,
                                        "tooltip": "Student AdamW lr (PCM: 5e-6 SD1.5, 2e-6 SDXL)."}),
            "discriminator_learning_rate": ("FLOAT", {"default": 1e-5, "min": 0.0, "max": 1.0, "step": 1e-7, "round": 1e-8}),
            "delta": ("INT", {"default": 0, "min": 0, "max": 500, "tooltip": "Δ, the teacher's skip step in timesteps; 0 = auto (20 for SD1.5-like, 25 for SDXL-like)."}),
            "absolute_weight": ("STRING", {"default": "1.0", "tooltip": "w_n: one value, or one per step from the first (noisiest) to the last, comma-separated."}),
            "huber_c": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001, "round": 1e-6}),
            "adversarial_weight": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.01}),
            "mode": (list(trainer.MODES), {"tooltip": "rapm = relative + absolute matching; the others are the paper's ablations."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
            "checkpoint_every": ("INT", {"default": 500, "min": 1, "max": 1000000}),
            "name": ("STRING", {"default": "rapm_run", "tooltip": "Folder under output/rapm_runs/. Rerun with the same name and settings to resume."}),
        }, "optional": {
            "weight_decay": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001, "tooltip": "Student AdamW weight decay (PCM: 1e-3 SD1.5, 0 SDXL)."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute UNet blocks in backward: far less memory for ~9% more time (H100: SD1.5 0.25 s/it at 11.4 GiB, about 0.24 s at 18.6 GiB without; SDXL 0.74 s at 19.1 GiB, about 0.68 s at 51 GiB without). Turn off only with memory to spare."}),
            "low_memory": ("BOOLEAN", {"default": False, "tooltip": "Back-propagate slot by slot (same gradients, one slot's graph alive at a time) and skip CUDA graphs: less memory, much slower (SD1.5 ~5x). SDXL on a 16 GB card: on, with gradient_checkpointing. SD1.5 on a 12 GB card: try discriminator_heads 1x1 first."}),
            "precision": (["auto", "bf16", "fp32"], {"tooltip": "auto: bf16 on GPUs that support it, fp32 elsewhere. bf16 also runs on the CPU (slowly)."}),
            "discriminator_heads": (list(DISCRIMINATOR_HEADS), {"tooltip": "The discriminator heads' convolutions. auto = PCM's: 3x3 for SD1.5-like models, 1x1 for SDXL-like. 1x1 on SD1.5 needs 3.9 GiB less (H100 with gradient_checkpointing: 7.5 GiB reserved instead of 11.4, 0.24 s/it), so it fits a 12 GB card without low_memory; the emoji benchmark measured no quality cost (README)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL", "LORA_MODEL", "LOSS_MAP")
    RETURN_NAMES = ("model", "lora", "loss")
    FUNCTION = "train"
    CATEGORY = "training/RAPM"
    DESCRIPTION = "RAPM: relative and absolute position matching with two discriminators; checkpoints and resumes by name."

    def train(self, model, trajectories, iterations, lora_rank, lora_alpha, learning_rate, discriminator_learning_rate,
              delta, absolute_weight, huber_c, adversarial_weight, mode, seed, checkpoint_every, name,
              weight_decay=0.001, gradient_checkpointing=True, low_memory=False, precision="auto",
              discriminator_heads="auto", unique_id=None):
        node = "RAPMTrain"
        try:
            name = storage.check_name(name, "name")
        except ValueError as e:
            raise NodeInputError(node, "name", str(e)) from None
        info = host.model_info(model)
        trajectories.check_compatible(info, node)
        sdxl = host.is_sdxl_like(model)
        try:
            weights = trainer.parse_absolute_weight(absolute_weight)
        except ValueError as e:
            raise NodeInputError(node, "absolute_weight", str(e)) from None
        config = trainer.Config(
            iterations=iterations, lora_rank=lora_rank, lora_alpha=lora_alpha, learning_rate=learning_rate,
            discriminator_learning_rate=discriminator_learning_rate, weight_decay=weight_decay,
            delta=delta or schedule.default_delta(info["num_timesteps"], sdxl), absolute_weight=weights,
            huber_c=huber_c, adversarial_weight=adversarial_weight, mode=mode, seed=seed,
            checkpoint_every=checkpoint_every, low_memory=low_memory)
        try:
            config.weights(trajectories.steps)
        except ValueError as e:
            raise NodeInputError(node, "absolute_weight", str(e)) from None
        if discriminator_heads not in DISCRIMINATOR_HEADS:
            raise NodeInputError(node, "discriminator_heads", f"'{discriminator_heads}' is not one of {', '.join(DISCRIMINATOR_HEADS)}")
        pcm_kernel = session.pcm_discriminator_kernel(sdxl)
        kernel = DISCRIMINATOR_HEADS[discriminator_heads] or pcm_kernel
        folder = os.path.join(host.output_directory(), RUN_FOLDER, name)
        identity = {"config": config.resume_key(), "trajectories": trajectories.fingerprint(),
                    "teacher": info["fingerprint"], "precision": precision}
        if kernel != pcm_kernel:
            identity["discriminator_kernel"] = kernel  # absent = PCM's size: runs from before the input still resume
        run = trainer.Run(folder, identity)
        try:
            run.open()
        except ValueError as e:
            raise NodeInputError(node, "name", str(e)) from None

        try:
            host.training_dtype(model, precision)
        except ValueError as e:
            raise NodeInputError(node, "precision", str(e)) from None
        sess = session.Session(model, trajectories, config, precision, gradient_checkpointing, discriminator_kernel=kernel)
        bar = host.Progress(iterations, unique_id)

        bar.text(f"{run.saved_iteration()}/{iterations} it · loading the model and trajectories")
        notice = sess.safe_path_notice  # a slower, safe path taken (issue #17): said on every line
        shown = {"iteration": 0}

        def fit(tr):
            run.restore(tr)
            shown["iteration"] = tr.iteration
            clock = progress.Clock(iterations, tr.iteration, "it")
            text_due = progress.Throttle(PROGRESS_TEXT_SECONDS)
            bar.update_absolute(tr.iteration)
            bar.text(clock.text(tr.iteration, "resumed" if tr.iteration else "started"))
            losses = {}

            def on_iteration(k, result):
                shown["iteration"] = k
                losses.update(result)
                bar.update_absolute(k)
                if text_due.due() or k == iterations:
                    line = clock.text(k, " · ".join(f"{key} {v:.4g}" for key, v in sorted(losses.items())))
                    if notice:
                        line += "\n" + notice
                    bar.text(line)

            trainer.train(tr, run, on_iteration, interrupted=host.interrupted_types(), check_interrupt=host.check_interrupt)
            return tr

        try:
            tr = sess.run(fit)
        except host.interrupted_types():
            bar.text(f"Cancelled at {shown['iteration']}/{iterations} it: checkpoint saved in {folder}. "
                     f"Queue again with the same name ({name}) and settings to resume.")
            raise
        except trainer.NonFiniteLoss as e:
            raise RuntimeError(f"{node}: {e}. Training stopped and the last good checkpoint in {folder} is kept. "
                               "Lower learning_rate / discriminator_learning_rate or use precision fp32, then rerun "
                               "with the same name to resume from that checkpoint.") from None
        except Exception as e:
            if host.is_oom(e):
                if not gradient_checkpointing:
                    fix = "turn on gradient_checkpointing"
                elif kernel != 1 and config.uses_gan:
                    fix = "set discriminator_heads to 1x1" + ("" if low_memory else " (then also turn on low_memory)")
                elif not low_memory:
                    fix = "turn on low_memory"
                else:
                    fix = "lower lora_rank or use a card with more memory"
                raise RuntimeError(f"{node}: out of GPU memory. Fix: {fix}; rerun with the same name to resume from the "
                                   "last checkpoint.") from None
            raise

        metadata = {
            "teacher_family": info["family"], "teacher_fingerprint": info["fingerprint"],
            "steps": trajectories.steps, "timesteps": trajectories.timesteps, "delta": config.delta,
            "teacher_cfg": trajectories.cfg, "iterations": tr.iteration, "mode": mode, "rank": lora_rank,
            "alpha": lora_alpha, "trajectories": trajectories.name, "trajectory_count": len(trajectories),
            "run": name, "prediction": info["prediction"],
        }
        weights_out = sess.lora_weights(metadata)
        return (host.apply_lora(model, weights_out), weights_out, {"loss": list(tr.history["loss"])})


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
        node = "RAPMSaveLoRA"
        root = host.lora_directory()
        tensors = {k: v for k, v in lora.items() if isinstance(v, torch.Tensor)}
        try:
            path, written = lora_file.save(root, filename_prefix, tensors, dict(getattr(lora, "metadata", {})), key_format)
        except ValueError as e:
            raise NodeInputError(node, "filename_prefix", f"{e}; use a name like 'rapm/my_lora'") from None
        relative = os.path.relpath(path, root)
        host.Progress(1, unique_id).text(f"{'saved' if written else 'unchanged, kept'} models/loras/{relative}")
        return {"ui": {"text": [relative]}, "result": (relative,)}


DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


class RAPMEmojiDemoLoader:
    """The built-in demo teacher: a small text-to-emoji model trained by this project's quality
    benchmark (32×32 RGB pixels, MiniLM text), with its text encoder and a pixel 'VAE'."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "training/RAPM"
    DESCRIPTION = ("A 7M-parameter emoji teacher (32×32 pixels). Prompts like 'grinning face, twitter style' "
                   "(styles: twitter, google, fluent 3d). Its latent is the image: use 256×256 in Empty Latent Image "
                   "(32×32 after the usual ÷8) or 32×32 in Teacher Trajectories.")

    def load(self):
        from .comfy_rapm import emoji
        info = storage.read_json(os.path.join(DEMO_DIR, "rapm_emoji_teacher.json"))
        weights = os.path.join(DEMO_DIR, info["weights"])
        if storage.sha256_file(weights) != info["sha256"]:
            raise NodeInputError("RAPMEmojiDemoLoader", "(built-in)", f"{weights} does not match its checksum; restore it with git")
        model = host.pixel_unet_model(info["unet_config"], storage.read_safetensors(weights))
        return (model, emoji.MiniLMText(), emoji.PixelImages())


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
