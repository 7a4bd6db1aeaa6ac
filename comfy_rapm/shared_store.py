"""One trajectory set made by several processes at once (torchrun; comfy_rapm/distributed.py), the same files as one
process makes.

Rank 0 opens the set and says which shards are done; the pending ones are dealt out round-robin (so any number of
processes resumes any set); each rank writes only its own shard files and records each one, with its checksum, in
its own journal (`<name>/journals/<run>-rank<r>.json`) instead of the manifest; after a barrier rank 0 checks every
shard against the checksum its writer recorded and writes the manifest. A rank that dies leaves its journal: the
next open, by any number of processes or by one, takes in the shards whose files still match it. A rank that fails
leaves a stop marker beside its journal, so the others stop after their current batch and all report it."""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from . import distributed, storage
from .journals import JOURNAL_FORMAT, JOURNALS, fold_journals, inputs_digest, remove, valid_entry
from .trajectories import FORMAT, FORMAT_VERSION, Shard, Spec, Store, TrajectorySet

log = logging.getLogger(__name__)


def open_store(folder: str | os.PathLike, spec: Spec) -> Store:
    """The set at `folder` as this process writes it: its rank's share under torchrun, else the whole set."""
    group = distributed.current()
    if group is not None:
        return SharedStore.open_shared(Path(folder), spec, group)
    return Store.open(folder, spec)

def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:600] if text else type(error).__name__


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
                store = Store._open(folder, spec, clean_temporary=True)  # rank 0 opens the whole set
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
            folded = fold_journals(self)  # (this run's journals hold what the statuses said)
            self._write_manifest()
            remove(folded)
            return {"manifest": self.manifest, "problems": problems}
        except Exception as e:  # noqa: BLE001  (every rank reports it)
            return {"error": f"rank 0 could not write the manifest: {_describe(e)}", "problems": []}

    def _record_what_is_there(self) -> None:
        """Rank 0, when the ranks did not all come: keep the manifest up to date with the journals."""
        try:
            folded = fold_journals(self)
            self._write_manifest()
            remove(folded)
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
