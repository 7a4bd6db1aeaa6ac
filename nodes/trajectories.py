"""Teacher Trajectories (RAPM) and Load Trajectories (RAPM): the set a student learns from."""
from __future__ import annotations

import os

from ..comfy_rapm import host, presets, progress, session, shared_store, storage
from ..comfy_rapm import solver as solver_mod
from ..comfy_rapm import trajectories as traj
from ..comfy_rapm.errors import NodeInputError
from .common import MAX_SEED, advanced, checked, trajectory_root


def read_prompts(node: str, prompts: str, prompts_file: str) -> list[str]:
    lines = traj.parse_prompts(prompts)
    if prompts_file and prompts_file.strip():
        path = checked(node, "prompts_file", lambda f: storage.child_path(host.input_directory(), f, "prompts_file"),
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
            "solver": advanced((list(solver_mod.SOLVERS), {"default": "ddim", "tooltip": "The teacher's solver inside each slot, fine_steps steps of it: ddim (the paper's; ComfyUI's euler), or ComfyUI's multistep dpmpp_2m / uni_pc. Part of the set: another solver makes another set."})),
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
        name = checked(node, "name", storage.check_name, name)
        factor = host.latent_downscale(model)
        if width % factor or height % factor:
            raise NodeInputError(node, "width" if width % factor else "height",
                                 f"{width}×{height} is not a multiple of {factor}, the model's latent scale")
        latent_shape = (host.latent_channels(model), height // factor, width // factor)
        spec = traj.Spec(
            prompts=read_prompts(node, prompts, prompts_file), negative_prompt=negative_prompt, width=width,
            height=height, count=count, steps=steps, fine_steps=fine_steps, cfg=cfg, seed=seed,
            batch_size=batch_size or traj.default_batch_size(latent_shape), model=host.model_info(model, latent_shape),
            solver=solver)
        store = checked(node, "name", lambda n: shared_store.open_store(os.path.join(trajectory_root(), n), spec), name)
        bar = host.Progress(count, unique_id)
        clock = progress.Clock(count, store.stored_count(), "traj")
        bar.text(clock.text(store.stored_count(), "starting"))  # replaces the previous run's line at once
        bar.update_absolute(store.stored_count())

        def batch_done(done, total):
            bar.update_absolute(done)
            bar.text(clock.text(done))
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
