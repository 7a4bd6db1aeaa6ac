"""Files written atomically (temp file + rename), read only as safetensors/JSON, and names a
user types kept inside the folder they belong to."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,99}$")


def check_name(name: str, what: str = "name") -> str:
    """A folder or file name a user typed: letters, digits, '.', '_', '-', ' '; no path parts."""
    name = (name or "").strip()
    if not _NAME.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a plain name: use letters, digits, '.', '_', '-' or spaces "
                         "(no '/', '\\' or '..'), at most 100 characters")
    return name


def child_path(base: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """base/relative, refusing anything that resolves outside base (absolute paths, '..', links)."""
    base_resolved = Path(base).resolve()
    target = (base_resolved / relative).resolve()
    if target != base_resolved and base_resolved not in target.parents:
        raise ValueError(f"{what} {relative!r} points outside {base_resolved}")
    return target


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
    _atomic(Path(path), write)


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """folder/stem.suffix, or folder/stem_00001.suffix … if taken: never overwrite."""
    candidate = folder / f"{stem}{suffix}"
    counter = 1
    while candidate.exists():
        candidate = folder / f"{stem}_{counter:05d}{suffix}"
        counter += 1
    return candidate


def describe_difference(old: dict, new: dict) -> str:
    """'key: old → new; …' for what differs between two JSON-like dicts (nested dicts recursed)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diffs.append(f"{key} ({describe_difference(a, b)})")
            elif isinstance(a, list) and len(str(a)) > 80:
                diffs.append(f"{key} (a different list of {len(a)} vs {len(b) if isinstance(b, list) else b})")
            else:
                diffs.append(f"{key}: {a!r} → {b!r}")
    return "; ".join(diffs)
