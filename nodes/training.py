"""RAPM Train and LoRA Save (RAPM): the student, and the file every LoRA loader applies."""
from __future__ import annotations

import os

import torch

from ..comfy_rapm import checkpoints, host, lora_file, presets, progress, session, settings, storage, trainer
from ..comfy_rapm.errors import NodeInputError
from .common import MAX_SEED, RUN_FOLDER, advanced, checked

PROGRESS_TEXT_SECONDS = 1.0  # a node's text line is resent at most this often (and after the last step)
DISCRIMINATOR_HEADS = {"auto": None, "3x3": 3, "1x1": 1}  # the heads' conv size; None = the family's


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
            "lora_alpha": advanced(("FLOAT", {"default": sd15.lora_alpha, "min": 0.01, "max": 1024.0, "step": 0.01})),
            "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-7, "round": 1e-8,
                                        "tooltip": f"Student AdamW learning rate; 0 = the teacher family's (PCM: {sd15.learning_rate:g} SD1.5-like, {sdxl.learning_rate:g} SDXL-like)."}),
            "discriminator_learning_rate": advanced(("FLOAT", {"default": sd15.discriminator_learning_rate, "min": 0.0, "max": 1.0, "step": 1e-7, "round": 1e-8})),
            "delta": advanced(("INT", {"default": 0, "min": 0, "max": 500, "tooltip": f"Δ, the teacher's skip step in timesteps; 0 = the family's ({sd15.delta} SD1.5-like, {sdxl.delta} SDXL-like)."})),
            "absolute_weight": advanced(("STRING", {"default": "1.0", "tooltip": "w_n: one value, or one per step from the first (noisiest) to the last, comma-separated."})),
            "huber_c": advanced(("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001, "round": 1e-6})),
            "adversarial_weight": advanced(("FLOAT", {"default": sd15.adversarial_weight, "min": 0.0, "max": 100.0, "step": 0.01})),
            "mode": (list(settings.MODES), {"tooltip": "rapm = relative + absolute matching; the others are the paper's ablations."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
            "checkpoint_every": advanced(("INT", {"default": 500, "min": 1, "max": 1000000})),
            "name": ("STRING", {"default": "rapm_run", "tooltip": "Folder under output/rapm_runs/. Rerun with the same name and settings to resume."}),
        }, "optional": {
            "weight_decay": advanced(("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.0001, "tooltip": f"Student AdamW weight decay; -1 = the family's (PCM: {sd15.weight_decay:g} SD1.5-like, {sdxl.weight_decay:g} SDXL-like)."})),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip": "Recompute UNet blocks in backward: far less memory for a little more time. Turn off only with memory to spare."}),
            "low_memory": ("BOOLEAN", {"default": False, "tooltip": "Back-propagate slot by slot (the same gradients, one slot's graph alive at a time): less memory, about 1.3-1.7x slower. For SDXL on a 16 GB card; for SD1.5 on a 12 GB card try discriminator_heads 1x1 first."}),
            "precision": advanced((["auto", "bf16", "fp32"], {"tooltip": "auto: bf16 on GPUs that support it, fp32 elsewhere. bf16 also runs on the CPU (slowly)."})),
            "discriminator_heads": advanced((list(DISCRIMINATOR_HEADS), {"tooltip": "The discriminator heads' convolutions; auto = PCM's for the family (3x3 SD1.5-like, 1x1 SDXL-like). 1x1 needs far less memory: the setting for SD1.5 on a 12 GB card."})),
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
        name = checked(node, "name", storage.check_name, name)
        info = host.model_info(model)
        trajectories.check_compatible(info, node)
        if discriminator_heads not in DISCRIMINATOR_HEADS:
            raise NodeInputError(node, "discriminator_heads", f"'{discriminator_heads}' is not one of {', '.join(DISCRIMINATOR_HEADS)}")
        preset = presets.for_teacher(host.is_sdxl_like(model))
        config = settings.Config(
            iterations=iterations, lora_rank=lora_rank, lora_alpha=lora_alpha,
            discriminator_learning_rate=discriminator_learning_rate,
            absolute_weight=checked(node, "absolute_weight", settings.parse_absolute_weight, absolute_weight),
            huber_c=huber_c, adversarial_weight=adversarial_weight, mode=mode, seed=seed, checkpoint_every=checkpoint_every,
            low_memory=low_memory, precision=precision, gradient_checkpointing=gradient_checkpointing,
            **presets.resolve(preset, info["num_timesteps"], learning_rate=learning_rate or None,
                              weight_decay=None if weight_decay < 0 else weight_decay, delta=delta or None,
                              discriminator_kernel=DISCRIMINATOR_HEADS[discriminator_heads]))
        checked(node, "absolute_weight", config.weights, trajectories.steps)
        checked(node, "precision", lambda p: host.training_dtype(model, p), precision)
        folder = os.path.join(host.output_directory(), RUN_FOLDER, name)
        run = checkpoints.Run(folder, checkpoints.run_identity(config, trajectories.fingerprint(), info["fingerprint"],
                                                       preset.discriminator_kernel))
        checked(node, "name", lambda _: run.open(), name)
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
                line.note = sess.safe_path_notice  # a step graph's capture may have failed since the start
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
        path, written = checked("RAPMSaveLoRA", "filename_prefix", lambda prefix: lora_file.save(
            root, prefix, tensors, dict(getattr(lora, "metadata", {})), key_format), filename_prefix)
        relative = os.path.relpath(path, root)
        host.Progress(1, unique_id).text(f"{'saved' if written else 'unchanged, kept'} models/loras/{relative}")
        return {"ui": {"text": [relative]}, "result": (relative,)}
