"""Teacher trajectories: generation and the on-disk store.

One trajectory is the initial noise z̃_N and the teacher's positions z̃_{N-1} … z̃_0, each reached
by M-step DDIM with CFG inside its slot, all in the paper's VP space. A set is a folder:

    <name>/manifest.json             what made it (model, grid, cfg, prompts, seed…) + finished shards
    <name>/shard-00000.safetensors   one batch: positions, the text conditioning as the teacher saw it,
                                     seeds; prompts and scalar conditioning entries in the metadata

Shards are written atomically and the manifest after each, so a crash or Cancel loses at most the
batch in flight, and a rerun with the same inputs continues where it stopped.

Several processes (torchrun, see comfy_rapm/distributed.py) make the same files: rank 0 opens the set
and says which shards are done; the pending ones are dealt out round-robin (so any number of
processes resumes any set); each rank writes only its own shard files and records each one, with its
checksum, in its own journal (`<name>/journals/<run>-rank<r>.json`) instead of the manifest; after a
barrier rank 0 checks every shard against the checksum its writer recorded and writes the manifest. A
rank that dies leaves its journal: the next open, by any number of processes, takes in the shards
whose files still match it. A rank that fails leaves a stop marker beside its journal, so the others
stop after their current batch and all report it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import distributed, schedule, solver, storage

log = logging.getLogger(__name__)

FORMAT = "rapm-trajectories"
FORMAT_VERSION = 1
JOURNALS = "journals"
JOURNAL_FORMAT = "rapm-trajectories-journal"
SAMPLER_VERSION = 1  # bump when the numbers a given set of inputs produces change
# 32 SD1.5 512-px trajectories at once: 6.3 GiB reserved, 4% faster than 16; SDXL 1024 px at 8 (9.6 GiB) is as fast as
# at 16 (14.1 GiB) (bench/results/perf.json, run5 and run12 under "earlier")
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


def inputs_digest(spec: Spec) -> str:
    return hashlib.sha256(json.dumps(spec.inputs(), sort_keys=True).encode()).hexdigest()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def valid_entry(raw, expected: dict[str, "Shard"]) -> dict | None:
    """A shard record as the set's own layout has it (file, start and count of one of its shards and a
    sha256), or None: a record never names any other file."""
    if not isinstance(raw, dict) or not isinstance(raw.get("file"), str):
        return None
    shard = expected.get(raw["file"])
    if shard is None or raw.get("start") != shard.start or raw.get("count") != shard.count:
        return None
    if not isinstance(raw.get("sha256"), str) or not _SHA256.match(raw["sha256"]):
        return None
    return {"file": shard.file, "start": shard.start, "count": shard.count, "sha256": raw["sha256"]}


def _remove_temporary_files(folder: Path) -> None:
    """What storage's atomic writes leave when a process is killed mid-write (.<name>.<random>.tmp)."""
    for where in (folder, folder / JOURNALS):
        if where.is_dir():
            _remove(list(where.glob(".*.tmp")))


def _remove(paths) -> None:
    """Remove files (journals once the manifest holds their shards; stale temporary files), then the
    journals folder if that left it empty."""
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    for folder in {path.parent for path in paths if path.parent.name == JOURNALS}:
        try:
            folder.rmdir()
        except OSError:  # not empty: a journal still being written, or one not read
            pass


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:600] if text else type(error).__name__


def generate_positions(denoise: solver.Denoiser, model_sampling, noise: torch.Tensor, slots: list[list[int]],
                       on_step: Callable[[], None] | None = None, solve: solver.Solve | None = None) -> torch.Tensor:
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
    def open(cls, folder: str | os.PathLike, spec: Spec) -> "Store":
        group = distributed.current()
        if group is not None:  # one of several processes (torchrun): this rank's share
            return SharedStore.open_shared(Path(folder), spec, group)
        return cls._open_local(Path(folder), spec)

    @classmethod
    def _open_local(cls, folder: Path, spec: Spec, clean_temporary: bool = False) -> "Store":
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
            _remove_temporary_files(folder)
        folded = store._fold_journals()
        store._write_manifest()
        _remove(folded)
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

    def _fold_journals(self) -> list[Path]:
        """Add the shards that ranks of an earlier multi-process run recorded in their journals (and that
        the manifest does not list yet) when the file still has the recorded checksum. Returns the
        journals read and the runs' stop markers, to remove once the manifest that holds their shards is
        written (by the one process that opens the set, or by rank 0 after the ranks' last barrier)."""
        journals = self.folder / JOURNALS
        if not journals.is_dir():
            return []
        expected = {s.file: s for s in self.all_shards()}
        digest = inputs_digest(self.spec)
        known = {s["file"]: s for s in self.manifest["shards"]}
        read = []
        for path in sorted(journals.glob("*.json")):
            try:
                journal = storage.read_json(path)
            except (OSError, ValueError) as e:
                log.warning("RAPM: ignoring unreadable journal %s (%s)", path, e)
                continue
            if not isinstance(journal, dict) or journal.get("format") != JOURNAL_FORMAT:
                continue
            read.append(path)
            if journal.get("inputs") != digest:
                continue
            for raw in journal.get("shards") or []:
                entry = valid_entry(raw, expected)
                if entry is None or entry["file"] in known:
                    continue
                file = self.folder / entry["file"]
                if file.is_file() and storage.sha256_file(file) == entry["sha256"]:
                    known[entry["file"]] = entry
        self.manifest["shards"] = sorted(known.values(), key=lambda s: s["start"])
        return read + sorted(journals.glob("*.stop"))

    def _write_manifest(self) -> None:
        spec = self.spec
        self.manifest.update({
            "model": spec.model, "steps": spec.steps, "fine_steps": spec.fine_steps, "cfg": float(spec.cfg),
            "timesteps": spec.timesteps(), "slot_timesteps": spec.slots(), "count": spec.count,
            "sampler_version": SAMPLER_VERSION, "width": spec.width, "height": spec.height, "solver": spec.solver,
        })
        self.manifest["complete"] = not self.unrecorded()
        storage.write_json(self.folder / "manifest.json", self.manifest)


class _Stopped(RuntimeError):
    """This rank stopped because another one failed."""


class SharedStore(Store):
    """One rank's part of a set that several processes make at once (see the module docstring)."""

    def __init__(self, folder: Path, spec: Spec, manifest: dict, group: "distributed.Group", run: str,
                 share: list[Shard]):
        super().__init__(folder, spec, manifest)
        self.group, self.run, self.share = group, run, share
        self.written: list[dict] = []
        self.final_manifest: dict | None = None

    @property
    def journal_path(self) -> Path:
        return self.folder / JOURNALS / f"{self.run}-rank{self.group.rank:05d}.json"

    @classmethod
    def open_shared(cls, folder: Path, spec: Spec, group: "distributed.Group") -> "SharedStore":
        me = json.dumps({"set": folder.name, "inputs": inputs_digest(spec)})
        views = group.all_texts(me, f"checking that every rank makes the set '{folder.name}'")
        differ = [r for r, view in enumerate(views) if view != views[0]]
        if differ:
            names = sorted({json.loads(views[r])["set"] for r in differ})
            raise distributed.RankError(
                f"{group.label}: rank(s) {', '.join(map(str, differ))} make another trajectory set than rank 0 "
                f"('{folder.name}' on rank 0, {', '.join(repr(n) for n in names)} there, or other inputs or teacher "
                "weights): start every process with the same workflow, the same --set options and the same models")
        reply, failure, store = None, None, None
        if group.rank == 0:
            try:
                store = Store._open_local(folder, spec, clean_temporary=True)
                reply = {"ok": True, "shards": store.manifest["shards"], "run": uuid.uuid4().hex[:12]}
            except ValueError as e:
                failure, reply = e, {"ok": False, "refused": str(e)}
            except Exception as e:  # noqa: BLE001  (told to the other ranks, then raised here)
                failure, reply = e, {"ok": False, "error": _describe(e)}
        reply = json.loads(group.from_rank0(json.dumps(reply) if group.rank == 0 else None,
                                            f"waiting for rank 0 to open the set '{folder.name}'"))
        if failure is not None:
            raise failure
        if not reply["ok"]:
            if "refused" in reply:  # the same message as rank 0's (e.g. other inputs under this name)
                raise ValueError(reply["refused"])
            raise distributed.RankError(f"{group.label}: rank 0 could not open {folder}: {reply['error']}")
        # Every rank must write into the folder rank 0 made, not into a folder of its own machine.
        seen = folder.joinpath("manifest.json").is_file() or _appears(folder / "manifest.json", min(60.0, group.timeout_s))
        views = group.all_texts(json.dumps({"sees": seen, "host": socket.gethostname()}),
                                f"checking that every rank sees the set '{folder.name}'")
        blind = [(r, json.loads(v)["host"]) for r, v in enumerate(views) if not json.loads(v)["sees"]]
        if blind:
            raise distributed.RankError(
                f"{group.label}: rank(s) {', '.join(f'{r} ({h})' for r, h in blind)} do not see {folder} that rank 0 "
                "created: every process must write to one shared output folder (--output-directory on a file system "
                "all machines mount at the same path)")
        manifest = store.manifest if store is not None else {
            "format": FORMAT, "version": FORMAT_VERSION, "inputs": spec.inputs(), "shards": reply["shards"],
            "complete": False}
        shards = Store(folder, spec, manifest).unrecorded()
        return cls(folder, spec, manifest, group, reply["run"], shards[group.rank::group.world])

    def pending(self) -> list[Shard]:
        """This rank's share, less what it has written (so stored_count() counts the trajectories this
        process does not compute: stored already, or another rank's share, and progress ends at count)."""
        written = {e["file"] for e in self.written}
        return [s for s in self.share if s.file not in written]

    def _stop_markers(self) -> list[Path]:
        return sorted((self.folder / JOURNALS).glob(f"{self.run}-rank*.stop"))

    def check_others(self) -> None:
        """A rank that failed leaves a marker: the others stop at their next shard instead of computing on
        while it waits for them (what is finished is kept either way)."""
        for marker in self._stop_markers():
            try:
                who = storage.read_json(marker)
            except (OSError, ValueError):
                who = {"rank": "?", "host": "?", "error": "?"}
            raise _Stopped(f"rank {who.get('rank')} ({who.get('host')}) failed: {who.get('error')}")

    def _record(self, entry: dict) -> None:
        self.written.append(entry)
        storage.write_json(self.journal_path, {
            "format": JOURNAL_FORMAT, "version": 1, "inputs": inputs_digest(self.spec), "run": self.run,
            "rank": self.group.rank, "world_size": self.group.world, "host": socket.gethostname(),
            "shards": self.written})

    def finish(self, error: BaseException | None = None) -> None:
        """Wait for every rank, then rank 0 checks and records all their shards in the manifest. Raises
        (on every rank) when a rank failed or did not come, unless this rank has its own `error` to raise."""
        group, name = self.group, self.folder.name
        stopped = isinstance(error, _Stopped)
        if error is not None and not stopped:
            if "Interrupt" in type(error).__name__:  # Cancel / Ctrl-C (the host's interrupt, KeyboardInterrupt)
                log.warning("RAPM: %s was cancelled on '%s'; the other ranks stop after their current batch.",
                            group.label, name)
            else:
                log.error("RAPM: %s failed on '%s': %s. The other ranks stop after their current batch.",
                          group.label, name, _describe(error))
            try:
                storage.write_json(self.folder / JOURNALS / f"{self.run}-rank{group.rank:05d}.stop",
                                   {"rank": group.rank, "host": socket.gethostname(), "error": _describe(error)})
            except OSError as e:
                log.warning("RAPM: could not tell the other ranks to stop (%s); they finish their shares", e)
        status = {"rank": group.rank, "host": socket.gethostname(), "ok": error is None, "stopped": stopped,
                  "error": _describe(error), "shards": self.written}
        try:
            group.barrier(f"waiting for every rank to finish its share of '{name}'")
            statuses = [json.loads(t) for t in group.all_texts(json.dumps(status), f"collecting the ranks' results for '{name}'")]
        except distributed.RankError as e:
            if group.rank == 0:
                self._record_what_is_there()
            if error is not None and not stopped:
                log.error("RAPM: %s", e)
                return
            raise
        reply = self._merge(statuses) if group.rank == 0 else None
        reply = json.loads(group.from_rank0(json.dumps(reply) if group.rank == 0 else None,
                                            f"waiting for rank 0 to write the manifest of '{name}'"))
        if error is not None and not stopped:
            return  # the caller raises this rank's own error
        failed = [s for s in statuses if not s["ok"] and not s.get("stopped")]
        problems = reply.get("problems") or []
        if failed or problems or not reply.get("manifest", {}).get("complete"):
            done = sum(s["count"] for s in (reply.get("manifest") or {}).get("shards", []))
            what = "; ".join([f"rank {s['rank']} ({s['host']}) failed: {s['error']}" for s in failed] + problems
                             + ([reply["error"]] if reply.get("error") else [])) or "the set is incomplete"
            raise distributed.RankError(
                f"{group.label}: {what}. {done} of {self.spec.count} trajectories are stored in {self.folder}: fix the "
                "cause and rerun the same command to resume (with any number of processes)")
        self.final_manifest = reply["manifest"]

    def _merge(self, statuses: list[dict]) -> dict:
        """Rank 0: every shard a rank reports, checked against its checksum, into the manifest."""
        try:
            expected = {s.file: s for s in self.all_shards()}
            known = {s["file"]: s for s in self.manifest["shards"]}
            problems = []
            for status in statuses:
                for raw in status["shards"]:
                    entry = valid_entry(raw, expected)
                    path = self.folder / entry["file"] if entry else None
                    who = f"rank {status['rank']} ({status['host']})"
                    if entry is None:
                        problems.append(f"{who} reported a shard that is not part of this set: {str(raw)[:120]}")
                    elif not path.is_file():
                        problems.append(f"{who} wrote {entry['file']}, which rank 0 does not find in {self.folder}: every "
                                        "process must write to one shared output folder (--output-directory)")
                    elif storage.sha256_file(path) != entry["sha256"]:
                        problems.append(f"{path} is not what {who} wrote (checksum differs): is another run writing "
                                        "this set? It is computed again on the next run")
                    else:
                        known[entry["file"]] = entry
            self.manifest["shards"] = sorted(known.values(), key=lambda s: s["start"])
            folded = self._fold_journals()  # (this run's journals hold what the statuses said)
            self._write_manifest()
            _remove(folded)
            return {"manifest": self.manifest, "problems": problems}
        except Exception as e:  # noqa: BLE001  (every rank reports it)
            return {"error": f"rank 0 could not write the manifest: {_describe(e)}", "problems": []}

    def _record_what_is_there(self) -> None:
        """Rank 0, when the ranks did not all come: keep the manifest up to date with the journals."""
        try:
            folded = self._fold_journals()
            self._write_manifest()
            _remove(folded)
        except Exception as e:  # noqa: BLE001  (the journals stay; the next run folds them)
            log.warning("RAPM: could not update %s: %s", self.folder / "manifest.json", e)

    def trajectory_set(self) -> "TrajectorySet":
        return TrajectorySet(self.folder, manifest=self.final_manifest)


def _appears(path: Path, seconds: float) -> bool:
    """Wait up to `seconds` for a file another machine wrote (network file systems cache negative look-ups)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if path.is_file():
            return True
    return False


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
