"""A training run on disk: what it is (run.json), where it is (checkpoint.safetensors, history.json), and the loop
that drives a Trainer to its budget with checkpoints, resume and Cancel. Written atomically; safetensors/JSON only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import storage
from .settings import Config
from .trainer import Trainer

CHECKPOINT_VERSION = 1


def run_identity(config: Config, trajectories_fingerprint: str, teacher_fingerprint: str, preset_kernel: int) -> dict:
    """What a run folder holds a run of: its resume key, the trajectory set, the teacher and the precision, and
    the heads' size when it is not the family's (runs from before that setting existed still resume)."""
    identity = {"config": config.resume_key(), "trajectories": trajectories_fingerprint, "teacher": teacher_fingerprint,
                "precision": config.precision}
    if config.discriminator_kernel != preset_kernel:
        identity["discriminator_kernel"] = config.discriminator_kernel
    return identity


class Run:
    """output/rapm_runs/<name>/: run.json (what the run is) and checkpoint.safetensors (where it is).
    Both are written atomically; a rerun with the same name and settings resumes."""

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self.identity = json.loads(json.dumps(identity))
        self.checkpoint = self.folder / "checkpoint.safetensors"

    def open(self) -> None:
        path = self.folder / "run.json"
        if path.exists():
            old = storage.read_json(path)
            if old.get("identity") != self.identity:
                raise ValueError(f"a training run named '{self.folder.name}' exists with other settings "
                                 f"({storage.describe_difference(old.get('identity', {}), self.identity)}). Use another name to "
                                 f"start a new run, or delete {self.folder} to start this one over.")
        else:
            storage.write_json(path, {"identity": self.identity, "version": CHECKPOINT_VERSION})

    def restore(self, trainer: Trainer) -> bool:
        if not self.checkpoint.exists():
            return False
        trainer.load_state_tensors(storage.read_safetensors(self.checkpoint))
        history = storage.read_json(self.folder / "history.json") if (self.folder / "history.json").exists() else None
        if history:
            trainer.history = history
        return True

    def saved_iteration(self) -> int:
        """The iteration the checkpoint holds (0 without one)."""
        if not self.checkpoint.exists():
            return 0
        return int(storage.read_safetensors_metadata(self.checkpoint)["rapm_iteration"])

    def save(self, trainer: Trainer) -> None:
        tensors = trainer.state_tensors()
        iteration = trainer.iteration
        storage.write_json(self.folder / "history.json", {k: v[: _history_len(k, iteration)] for k, v in trainer.history.items()})
        storage.write_safetensors(self.checkpoint, tensors, {"rapm_iteration": str(iteration)})


def _history_len(key: str, iteration: int) -> int:
    # Student entries come from odd iterations, discriminator entries from even ones.
    return iteration // 2 if key != "discriminator" else (iteration + 1) // 2


def train(trainer: Trainer, run: Run | None, on_iteration: Callable[[int, dict], None] | None = None,
          interrupted: type | tuple = KeyboardInterrupt, check_interrupt: Callable[[], None] | None = None) -> None:
    """Iterate to config.iterations with checkpoints every checkpoint_every iterations and at the end.

    Cancel (`interrupted`, raised anywhere in an iteration: by `check_interrupt` at its start, by an op
    inside it, or by the progress hook in `on_iteration` after it) saves a checkpoint, then the exception
    propagates. Inside the iteration, the state at its start is saved: parameters and optimizer states only
    change in its last action (the optimizer step), so only the random-number state needs rewinding; after
    it (from `on_iteration`), the finished iteration is saved. On a non-finite loss nothing is saved: the
    last good checkpoint stays."""
    cfg = trainer.config
    while trainer.iteration < cfg.iterations:
        rng_state, iteration = trainer.rng.get_state(), trainer.iteration
        finished = False
        try:
            if check_interrupt is not None:
                check_interrupt()
            result = trainer.run_iteration()
            finished = True
            if on_iteration is not None:
                on_iteration(trainer.iteration, result)
        except interrupted:
            if run is not None:
                if not finished:
                    trainer.rng.set_state(rng_state)
                    trainer.iteration = iteration
                    trainer.history = {k: v[: _history_len(k, iteration)] for k, v in trainer.history.items()}
                run.save(trainer)
            raise
        if run is not None and (trainer.iteration % cfg.checkpoint_every == 0 or trainer.iteration == cfg.iterations):
            run.save(trainer)
