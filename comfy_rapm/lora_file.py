"""A student LoRA as a file every ComfyUI LoRA loader applies: the name a user typed kept inside the
LoRA folder, kohya/modelspec/RAPM metadata other tools read, and no second copy of the same LoRA."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from . import lora as lora_mod, storage

BASE_MODEL_VERSION = {"SD15": "sd_v1", "SD20": "sd_v2", "SD21UnclipL": "sd_v2", "SDXL": "sdxl_base_v1-0"}
KEY_FORMATS = ("comfyui", "kohya")
CONTENT_KEY = "rapm.content_sha256"


def target_folder(root: str | Path, filename_prefix: str) -> tuple[Path, str]:
    """(folder inside root, file stem) for a prefix like 'rapm/my_lora'; ValueError for a path that leaves
    root or a part that is not a plain name."""
    prefix = filename_prefix.strip().replace("\\", "/").removesuffix(".safetensors")
    if prefix.startswith("/") or ":" in prefix:
        raise ValueError(f"{filename_prefix!r} is an absolute path")
    parts = [p for p in prefix.split("/") if p]
    if not parts:
        raise ValueError("the name is empty")
    for part in parts:
        storage.check_name(part, "filename_prefix part")
    return storage.child_path(root, "/".join(parts[:-1]) or ".", "filename_prefix"), parts[-1]


def training_metadata(teacher: dict, trajectory_set, config, iterations: int, run: str) -> dict:
    """What a trained student records about how it was made (host.model_info of the teacher, the trajectory set,
    the settings.Config): read back by `metadata` into the file and by RAPM Sampler users from it."""
    return {"teacher_family": teacher["family"], "teacher_fingerprint": teacher["fingerprint"],
            "steps": trajectory_set.steps, "timesteps": trajectory_set.timesteps, "delta": config.delta,
            "teacher_cfg": trajectory_set.cfg, "iterations": iterations, "mode": config.mode, "rank": config.lora_rank,
            "alpha": config.lora_alpha, "trajectories": trajectory_set.name, "trajectory_count": len(trajectory_set),
            "run": run, "prediction": teacher["prediction"]}


def metadata(meta: dict, output_name: str) -> dict[str, str]:
    """kohya `ss_*`, `modelspec.*` and `rapm.*` entries (strings) for a LoRA trained with `meta` (what
    RAPM Train records: teacher family, steps, rank, alpha, iterations, …)."""
    steps = meta.get("steps")
    out = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": BASE_MODEL_VERSION.get(meta.get("teacher_family"), "unknown"),
        "ss_network_dim": str(meta.get("rank", "")), "ss_network_alpha": str(meta.get("alpha", "")),
        "ss_output_name": output_name, "ss_steps": str(meta.get("iterations", "")),
        "ss_training_comment": "RAPM few-step distillation",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{meta.get('teacher_family', 'unknown')}/lora",
        "modelspec.implementation": "comfy-rapm", "modelspec.title": output_name,
        "modelspec.description": f"{steps}-step RAPM student LoRA: sample with euler, scheduler simple, {steps} steps, cfg 1",
    }
    for key, value in meta.items():
        out[f"rapm.{key}"] = value if isinstance(value, str) else json.dumps(value)
    out["rapm.recommended_sampler"] = json.dumps({"sampler": "euler", "scheduler": "simple", "steps": steps, "cfg": 1.0,
                                                  "node": "RAPMSampler"})
    return out


def content_digest(tensors: dict[str, torch.Tensor], meta: dict) -> str:
    """What makes two saves the same LoRA: its tensors (keys, dtypes, shapes, bytes) and what it was trained as."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _same_lora(folder: Path, stem: str, digest: str) -> Path | None:
    for path in sorted(folder.glob(f"{stem}*.safetensors")):
        if path.stem != stem and not (path.stem.startswith(stem + "_") and path.stem[len(stem) + 1:].isdigit()):
            continue
        try:
            if storage.read_safetensors_metadata(path).get(CONTENT_KEY) == digest:
                return path
        except Exception:  # noqa: BLE001  (not a readable safetensors file: not ours to reuse)
            continue
    return None


def save(root: str | Path, filename_prefix: str, tensors: dict[str, torch.Tensor], meta: dict,
         key_format: str = "comfyui") -> tuple[Path, bool]:
    """Write the LoRA as root/<filename_prefix>.safetensors (…_00001 etc. instead of overwriting), or find the
    file an earlier save of the same LoRA in the same format wrote. Returns (path, written)."""
    if key_format not in KEY_FORMATS:
        raise ValueError(f"key_format {key_format!r} is not one of {', '.join(KEY_FORMATS)}")
    folder, stem = target_folder(root, filename_prefix)
    if key_format == "kohya":
        tensors = lora_mod.kohya_state_dict(tensors)
    digest = content_digest(tensors, dict(meta, key_format=key_format))
    if folder.is_dir():
        existing = _same_lora(folder, stem, digest)
        if existing is not None:
            return existing, False
    folder.mkdir(parents=True, exist_ok=True)
    path = storage.unique_path(folder, stem, ".safetensors")
    storage.write_safetensors(path, tensors, dict(metadata(meta, path.stem), **{CONTENT_KEY: digest}))
    return path, True
