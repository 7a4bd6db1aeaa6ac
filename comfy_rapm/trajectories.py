"""Teacher trajectories: generation and the on-disk store.

One trajectory is the initial noise z̃_N and the teacher's positions z̃_{N-1} … z̃_0, each reached
by M-step DDIM with CFG inside its slot, all in the paper's VP space. A set is a folder:

    <name>/manifest.json             what made it (model, grid, cfg, prompts, seed…) + finished shards
    <name>/shard-00000.safetensors   one batch: positions, the text conditioning as the teacher saw it,
                                     seeds; prompts and scalar conditioning entries in the metadata

Shards are written atomically and the manifest after each, so a crash or Cancel loses at most the
batch in flight, and a rerun with the same inputs continues where it stopped.

Several processes (torchrun) make the same files: comfy_rapm/shared_store.py (open_store)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import distributed, journals, schedule, solver, storage

log = logging.getLogger(__name__)

FORMAT = "rapm-trajectories"
FORMAT_VERSION = 1
SAMPLER_VERSION = 1  # bump when the numbers a given set of inputs produces change
# 32 SD1.5 512-px trajectories at once: 6.3 GiB reserved, 4% faster than 16; SDXL 1024 px at 8 (9.6 GiB) is as fast as
# at 16 (14.1 GiB) (bench/results/archive/perf_h100_history.json, run5 and run12 under "earlier")
AUTO_BATCH_LATENT_PIXELS = 32 * 64 * 64


def default_batch_size(latent_shape) -> int:
    """What batch size 0 (auto) means: 32 at SD1.5's 64×64 latents, fewer in proportion to the latent area
    (SDXL's 128×128: 8), at least 1 and at most 32."""
    height, width = latent_shape[-2:]
    return max(1, min(32, AUTO_BATCH_LATENT_PIXELS // (height * width)))


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are ignored."""
    return [line.strip() for line in (text or "").splitlines() if line.strip() and not line.strip().startswith("#")]


@dataclass
class Spec:
    """Everything that determines a set's content. Two runs with equal specs give identical files."""
    prompts: list[str]
    negative_prompt: str
    width: int
    height: int
    count: int
    steps: int
    fine_steps: int
    cfg: float
    seed: int
    batch_size: int
    model: dict = field(default_factory=dict)  # family, latent_shape, fingerprint, prediction, num_timesteps
    solver: str = "ddim"  # the in-slot solver (solver.SOLVERS); part of the identity only when not DDIM

    def prompt(self, index: int) -> str:
        return self.prompts[index % len(self.prompts)]

    def seed_of(self, index: int) -> int:
        return self.seed + index

    def timesteps(self) -> list[int]:
        return schedule.trailing_timesteps(self.steps, self.model.get("num_timesteps", 1000))

    def slots(self) -> list[list[int]]:
        return schedule.slot_timesteps(self.steps, self.fine_steps, self.model.get("num_timesteps", 1000))

    def inputs(self) -> dict:
        out = {"prompts": self.prompts, "negative_prompt": self.negative_prompt, "width": self.width,
               "height": self.height, "count": self.count, "steps": self.steps, "fine_steps": self.fine_steps,
               "cfg": float(self.cfg), "seed": self.seed, "batch_size": self.batch_size, "model": self.model,
               "sampler_version": SAMPLER_VERSION}
        if self.solver != "ddim":  # absent = DDIM: sets made before the option keep their identity and resume
            if self.solver not in solver.SOLVERS:
                raise ValueError(f"in-slot solver {self.solver!r}: one of {', '.join(solver.SOLVERS)}")
            out["solver"] = self.solver
        return out


def generate_positions(denoise: solver.Denoiser, model_sampling: schedule.ModelSampling, noise: torch.Tensor,
                       slots: list[list[int]], on_step: Callable[[], None] | None = None,
                       solve: solver.Solve | None = None) -> torch.Tensor:
    """(B, N+1, C, H, W) VP positions z̃_N … z̃_0 from model-space noise, an M-step solve per slot (each slot on
    its own, from the last slot's end point): DDIM, or `solve` (host.slot_solver: ComfyUI's dpmpp_2m, uni_pc)."""
    solve = solve or solver.ddim_solve
    sigma_top = schedule.sigma_at(model_sampling, slots[0][0]).to(noise.device)
    x = schedule.initial_latent(model_sampling, noise, sigma_top)
    positions = [schedule.to_vp(x, sigma_top, model_sampling)]
    for slot in slots:
        sigmas = schedule.sigma_at(model_sampling, slot).to(noise.device)
        x = solve(denoise, x, sigmas, (lambda *_: on_step()) if on_step else None)
        positions.append(schedule.to_vp(x, sigmas[-1], model_sampling))
    return torch.stack(positions, dim=1)




@dataclass
class Shard:
    index: int
    start: int
    count: int

    @property
    def file(self) -> str:
        return f"shard-{self.index:05d}.safetensors"


class Store:
    """A trajectory set being written. `open()` creates the folder or resumes it."""

    def __init__(self, folder: Path, spec: Spec, manifest: dict):
        self.folder, self.spec, self.manifest = folder, spec, manifest

    @classmethod
    def open(cls, folder: str | os.PathLike, spec: Spec, clean_temporary: bool = False) -> "Store":
        """The whole set, for one process (shared_store.open_store gives a rank its share under torchrun)."""
        if distributed.current() is not None:
            raise RuntimeError("several processes are making this set: open it with shared_store.open_store")
        return cls._open(Path(folder), spec, clean_temporary)

    @classmethod
    def _open(cls, folder: Path, spec: Spec, clean_temporary: bool) -> "Store":
        path = folder / "manifest.json"
        if path.exists():
            manifest = storage.read_json(path)
            inputs = json.loads(json.dumps(spec.inputs()))  # as JSON would give them back (tuples → lists)
            if manifest.get("inputs") != inputs:
                raise ValueError(
                    f"a trajectory set named '{folder.name}' already exists with different inputs "
                    f"({storage.describe_difference(manifest.get('inputs', {}), inputs)}). "
                    f"Choose another name, or delete {folder} to recompute it.")
            done = {s["file"]: s for s in manifest["shards"]}
            manifest["shards"] = [s for s in done.values()
                                  if (folder / s["file"]).exists() and storage.sha256_file(folder / s["file"]) == s["sha256"]]
        else:
            if folder.exists() and any(folder.iterdir()):
                raise ValueError(f"{folder} exists and is not a trajectory set (no manifest.json); choose another name")
            folder.mkdir(parents=True, exist_ok=True)
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "inputs": spec.inputs(), "shards": [],
                        "complete": False}
        store = cls(folder, spec, manifest)
        if clean_temporary:
            journals.remove_temporary_files(folder)
        folded = journals.fold_journals(store)  # what ranks of an earlier multi-process run finished
        store._write_manifest()
        journals.remove(folded)
        return store

    def all_shards(self) -> list[Shard]:
        b = self.spec.batch_size
        return [Shard(i, start, min(b, self.spec.count - start)) for i, start in enumerate(range(0, self.spec.count, b))]

    def unrecorded(self) -> list[Shard]:
        """Shards the manifest does not list yet."""
        done = {s["file"] for s in self.manifest["shards"]}
        return [s for s in self.all_shards() if s.file not in done]

    def pending(self) -> list[Shard]:
        """The shards this process computes."""
        return self.unrecorded()

    def stored_count(self) -> int:
        """Trajectories already in finished shards."""
        return self.spec.count - sum(s.count for s in self.pending())

    def write_shard(self, shard: Shard, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        self._record(self._write_shard_file(shard, tensors, metadata))

    def _write_shard_file(self, shard: Shard, tensors: dict[str, torch.Tensor], metadata: dict) -> dict:
        path = self.folder / shard.file
        # One metadata key: safetensors writes several in random order, and shards must be reproducible.
        storage.write_safetensors(path, tensors, {"rapm": json.dumps(metadata, sort_keys=True)})
        return {"file": shard.file, "start": shard.start, "count": shard.count, "sha256": storage.sha256_file(path)}

    def _record(self, entry: dict) -> None:
        self.manifest["shards"] = sorted([s for s in self.manifest["shards"] if s["file"] != entry["file"]] + [entry],
                                         key=lambda s: s["start"])
        self._write_manifest()

    def check_others(self) -> None:
        """Before each shard: nothing to check for one process."""

    def finish(self, error: BaseException | None = None) -> None:
        """After the last shard (or a failure): nothing to do for one process."""

    def trajectory_set(self) -> "TrajectorySet":
        """The finished set (after generate)."""
        return TrajectorySet(self.folder)

    def out_of_memory_fix(self) -> str:
        """What to change after the teacher ran out of memory at this set's batch size: a set keeps its batch size,
        so resuming needs the same one; a lower one makes another set."""
        stored, batch = self.stored_count(), self.spec.batch_size
        lower = f"lower batch_size (e.g. {max(1, batch // 2)})"
        if stored:
            return (f"{stored} trajectories are stored in {self.folder} and a set keeps its batch size: free GPU memory "
                    f"and rerun with batch_size {batch} to resume, or {lower} under another name")
        return f"{lower} and rerun under another name, or delete {self.folder} (nothing is stored in it yet)"

    def _write_manifest(self) -> None:
        spec = self.spec
        self.manifest.update({
            "model": spec.model, "steps": spec.steps, "fine_steps": spec.fine_steps, "cfg": float(spec.cfg),
            "timesteps": spec.timesteps(), "slot_timesteps": spec.slots(), "count": spec.count,
            "sampler_version": SAMPLER_VERSION, "width": spec.width, "height": spec.height, "solver": spec.solver,
        })
        self.manifest["complete"] = not self.unrecorded()
        storage.write_json(self.folder / "manifest.json", self.manifest)


def generate(store: Store, run_batch: Callable[[list[str], list[int]], tuple[dict, dict]],
             on_batch_done: Callable[[int, int], None] | None = None) -> None:
    """Compute every pending shard. run_batch(prompts, seeds) → (tensors, metadata) for one shard.
    With several processes each computes its share, then they wait for one another and rank 0
    writes the manifest (store.finish)."""
    spec = store.spec
    done = store.stored_count()
    try:
        for shard in store.pending():
            store.check_others()
            indices = range(shard.start, shard.start + shard.count)
            prompts, seeds = [spec.prompt(i) for i in indices], [spec.seed_of(i) for i in indices]
            tensors, metadata = run_batch(prompts, seeds)
            tensors["seeds"] = torch.tensor(seeds, dtype=torch.int64)
            metadata = dict(metadata, prompts=prompts, start=shard.start)
            store.write_shard(shard, tensors, metadata)
            done += shard.count
            if on_batch_done:
                on_batch_done(done, spec.count)
    except BaseException as e:
        store.finish(e)
        raise
    store.finish()


# --- reading a finished set ----------------------------------------------------------------

@dataclass
class Trajectory:
    positions: torch.Tensor          # (N+1, C, H, W), VP, z̃_N … z̃_0
    positive: list                   # CONDITIONING, batch 1
    negative: list
    seed: int
    prompt: str


class TrajectorySet:
    """A finished set on disk: what the RAPM_TRAJECTORIES type carries between nodes."""

    def __init__(self, folder: str | os.PathLike, manifest: dict | None = None):
        """`manifest`: its content as its writer just wrote it (another rank's), instead of reading it."""
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if manifest is None and not path.exists():
            raise FileNotFoundError(f"no trajectory set at {self.folder} (manifest.json missing)")
        self.manifest = storage.read_json(path) if manifest is None else manifest
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a RAPM trajectory manifest")
        if not self.manifest.get("complete"):
            raise ValueError(f"trajectory set '{self.folder.name}' is incomplete "
                             f"({sum(s['count'] for s in self.manifest['shards'])} of {self.manifest['count']}); "
                             "rerun its Teacher Trajectories node with the same inputs to finish it")

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    @property
    def cfg(self) -> float:
        return float(self.manifest["cfg"])

    @property
    def timesteps(self) -> list[int]:
        return list(self.manifest["timesteps"])

    @property
    def solver(self) -> str:
        """The in-slot solver the set was made with (sets from before the option: DDIM)."""
        return self.manifest.get("inputs", {}).get("solver", "ddim")

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def fingerprint(self) -> str:
        """Identifies the content: the manifest's inputs and every shard's checksum."""
        blob = json.dumps([self.manifest["inputs"], [s["sha256"] for s in self.manifest["shards"]]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def verify(self) -> None:
        for s in self.manifest["shards"]:
            if storage.sha256_file(self.folder / s["file"]) != s["sha256"]:
                raise ValueError(f"{self.folder / s['file']} does not match its checksum in manifest.json "
                                 "(changed or damaged); delete it and rerun the Teacher Trajectories node")

    def load(self) -> list[Trajectory]:
        self.verify()
        out = []
        for s in self.manifest["shards"]:
            path = self.folder / s["file"]
            tensors = storage.read_safetensors(path)
            meta = json.loads(storage.read_safetensors_metadata(path)["rapm"])
            for i in range(s["count"]):
                out.append(Trajectory(
                    positions=tensors["positions"][i],
                    positive=_conditioning(tensors, meta, "positive", i),
                    negative=_conditioning(tensors, meta, "negative", i),
                    seed=int(tensors["seeds"][i]), prompt=meta["prompts"][i]))
        return out

    def check_compatible(self, model_info: dict, node: str, input_name: str = "trajectories") -> None:
        """Refuse a set made with another teacher before any work starts."""
        from .errors import NodeInputError
        mine = self.manifest["model"]
        for key, what in (("family", "model type"), ("latent_channels", "latent channels"),
                          ("prediction", "prediction type"), ("fingerprint", "teacher weights")):
            if key in mine and key in model_info and mine[key] != model_info[key]:
                raise NodeInputError(node, input_name,
                                     f"trajectory set '{self.name}' was made with a different teacher ({what}: "
                                     f"{mine[key]} in the set, {model_info[key]} for the connected model). "
                                     "Connect the model the set was made with, or make a new set with this model.")


def _conditioning(tensors: dict, meta: dict, which: str, i: int) -> list:
    extra = dict(meta.get(f"{which}_extra", [{}])[i])
    prefix = f"{which}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            extra[key[len(prefix):]] = value[i:i + 1]
    return [[tensors[which][i:i + 1], extra]]


def conditioning_tensors(conditioning: list, which: str) -> tuple[dict, list]:
    """A batched CONDITIONING → shard tensors and per-row scalar entries (for the metadata)."""
    cross, extra = conditioning[0]
    tensors = {which: cross}
    scalars = {}
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{which}.{key}"] = value
        elif isinstance(value, (int, float, str, bool)) or value is None:
            scalars[key] = value
    return tensors, [scalars] * cross.shape[0]


def list_sets(root: str | os.PathLike) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
