"""Several processes making one thing together (torchrun): this rank, the world, and the few
messages they exchange. Plain torch.distributed; the only module of the pack that calls it.

A process takes part only when torch.distributed is initialised with more than one rank (the
headless runner does that under torchrun: headless/ranks.py); everywhere else
(the ComfyUI UI, tests, a plain `python headless/run.py`) `current()` is None and callers keep
their one-process path.

Messages are UTF-8 text (JSON) in uint8 tensors over a gloo group on the CPU, never pickled
objects. On GPUs the default group is NCCL (`cuda:nccl`, with `cpu:gloo` beside it) and the messages
go through a separate gloo group, the one backend whose barrier reports which ranks did not arrive.
Every wait is bounded by the group's timeout; a timeout or a lost peer becomes a RankError whose
message names this rank and, where known, the ranks that did not answer."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; what the ranks wait when the group does not say
_control: dict = {}  # id(default process group) → gloo group for the messages


class RankError(RuntimeError):
    """A rank did not answer in time, or failed; the message says which and what to do."""


def _dist():
    import torch.distributed as dist
    return dist


def current() -> "Group | None":
    """This process's rank among several, or None when it works alone."""
    try:
        dist = _dist()
    except ImportError:  # a torch built without distributed support
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    timeout_s = group_timeout(dist.group.WORLD)
    key = id(dist.group.WORLD)
    if key not in _control:
        if dist.get_backend() == "gloo":
            _control[key] = dist.group.WORLD
        else:  # a collective: every rank makes it at the same point, its first use
            _control[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    return Group(rank=dist.get_rank(), world=dist.get_world_size(), timeout_s=timeout_s, _group=_control[key])


def group_timeout(group) -> float:
    """The timeout the group was made with (init_process_group(timeout=…)), in seconds."""
    try:
        return float(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except Exception:  # noqa: BLE001  (private API of torch.distributed; older or newer torch)
        return DEFAULT_TIMEOUT_S


@dataclass
class Group:
    rank: int
    world: int
    timeout_s: float
    _group: object = None

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world} ({socket.gethostname()}, pid {os.getpid()})"

    def _fail(self, what: str, error: BaseException) -> RankError:
        detail = " ".join(str(error).split())[:400]
        return RankError(
            f"{self.label}: no answer from the other ranks within {self.timeout_s:.0f} s while {what} ({detail}). "
            "A rank stopped or is much slower than the others; what the ranks finished is kept: rerun the same "
            "command to resume, with any number of processes")

    def barrier(self, what: str) -> None:
        """Wait for every rank; rank 0 names the ranks that did not come, the others name rank 0."""
        dist = _dist()
        try:
            dist.monitored_barrier(self._group, timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        except RuntimeError as e:
            raise self._fail(what, e) from None

    def all_texts(self, text: str, what: str) -> list[str]:
        """Every rank's text, in rank order, on every rank."""
        dist = _dist()
        data = _encode(text)
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=self._group)
            longest = max(1, max(int(s) for s in sizes))
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[:data.numel()] = data
            out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(out, padded, group=self._group)
        except RuntimeError as e:
            raise self._fail(what, e) from None
        return [_decode(o[:int(s)]) for o, s in zip(out, sizes)]

    def from_rank0(self, text: str | None, what: str) -> str:
        """Rank 0's text on every rank (the others pass None)."""
        dist = _dist()
        data = _encode(text or "") if self.rank == 0 else None
        src = dist.get_global_rank(self._group, 0) if self._group is not dist.group.WORLD else 0
        try:
            size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
            dist.broadcast(size, src=src, group=self._group)
            buf = data if data is not None else torch.zeros(int(size), dtype=torch.uint8)
            if int(size):
                dist.broadcast(buf, src=src, group=self._group)
        except RuntimeError as e:
            raise self._fail(what, e) from None
        return _decode(buf)


def _encode(text: str) -> torch.Tensor:
    raw = text.encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return t.numpy().tobytes().decode("utf-8")
