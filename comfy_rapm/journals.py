"""Journals: the record each rank of a multi-process run keeps of the shards it wrote, with their checksums
(`<set>/journals/<run>-rank<r>.json`, comfy_rapm/shared_store.py), and how any later open of the set — by one
process or several — takes in the shards a rank finished before it died, trusting a record only where the file
still has its checksum and the record names one of the set's own shards."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

from . import storage

log = logging.getLogger(__name__)

JOURNALS = "journals"
JOURNAL_FORMAT = "rapm-trajectories-journal"


def inputs_digest(spec) -> str:
    return hashlib.sha256(json.dumps(spec.inputs(), sort_keys=True).encode()).hexdigest()


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def valid_entry(raw, expected: dict) -> dict | None:
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


def remove_temporary_files(folder: Path) -> None:
    """What storage's atomic writes leave when a process is killed mid-write (.<name>.<random>.tmp)."""
    for where in (folder, folder / JOURNALS):
        if where.is_dir():
            remove(list(where.glob(".*.tmp")))


def remove(paths) -> None:
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


def fold_journals(store) -> list[Path]:
        """Add the shards that ranks of an earlier multi-process run recorded in their journals (and that
        the manifest does not list yet) when the file still has the recorded checksum. Returns the
        journals read and the runs' stop markers, to remove once the manifest that holds their shards is
        written (by the one process that opens the set, or by rank 0 after the ranks' last barrier)."""
        journals = store.folder / JOURNALS
        if not journals.is_dir():
            return []
        expected = {s.file: s for s in store.all_shards()}
        digest = inputs_digest(store.spec)
        known = {s["file"]: s for s in store.manifest["shards"]}
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
                file = store.folder / entry["file"]
                if file.is_file() and storage.sha256_file(file) == entry["sha256"]:
                    known[entry["file"]] = entry
        store.manifest["shards"] = sorted(known.values(), key=lambda s: s["start"])
        return read + sorted(journals.glob("*.stop"))
