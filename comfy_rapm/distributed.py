"""Several processes making one thing together (torchrun): this rank, the world, and the few
messages they exchange. Plain torch.distributed; the only module of the pack that calls it.

A process takes part only when torch.distributed is initialised with more than one rank (the
headless runner does that under torchrun: headless/ranks.py); everywhere else (the ComfyUI UI,
tests, a plain `python headless/run.py`) `current()` is None and callers keep their one-process path.

Messages are UTF-8 text (JSON) in uint8 tensors on the CPU, never pickled objects, over the default
group's gloo backend (the runner makes a gloo group on GPUs too: the ranks exchange a few kilobytes,
and gloo's barrier is the one that reports which ranks did not arrive). Every wait is bounded by the
group's timeout; a timeout or a lost peer becomes a RankError whose message names this rank and,
where known, the ranks that did not answer. Nothing here keeps a reference to the process group (one
that outlives destroy_process_group can abort the process at exit)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_TIMEOUT_S = 1800.0  # torch's own default for gloo; what the ranks wait when the group does not say


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
    group = Group(rank=dist.get_rank(), world=dist.get_world_size(), timeout_s=group_timeout())
    if "gloo" not in str(dist.get_backend()):
        raise RankError(f"{group.label}: torch.distributed is initialised with {dist.get_backend()!r}; making a trajectory "
                        "set in several processes needs a gloo backend for its messages (init_process_group('gloo') "
                        "or 'cpu:gloo,cuda:nccl'; headless/run.py under torchrun does that)")
    return group


def group_timeout() -> float:
    """The timeout the default group was made with (init_process_group(timeout=…)), in seconds."""
    try:
        dist = _dist()
        return float(dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except Exception:  # noqa: BLE001  (private API of torch.distributed; older or newer torch)
        return DEFAULT_TIMEOUT_S


@dataclass
class Group:
    rank: int
    world: int
    timeout_s: float

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
            dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
        except (RuntimeError, ValueError) as e:  # (ValueError: a group without gloo on an older torch)
            raise self._fail(what, e) from None

    def all_texts(self, text: str, what: str) -> list[str]:
        """Every rank's text, in rank order, on every rank."""
        dist = _dist()
        data = _encode(text)
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
            longest = max(1, max(int(s) for s in sizes))
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[:data.numel()] = data
            out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(out, padded)
        except RuntimeError as e:
            raise self._fail(what, e) from None
        return [_decode(o[:int(s)]) for o, s in zip(out, sizes)]

    def from_rank0(self, text: str | None, what: str) -> str:
        """Rank 0's text on every rank (the others pass None)."""
        dist = _dist()
        data = _encode(text or "") if self.rank == 0 else None
        try:
            size = torch.tensor([data.numel() if data is not None else 0], dtype=torch.int64)
            dist.broadcast(size, src=0)
            buf = data if data is not None else torch.zeros(int(size), dtype=torch.uint8)
            if int(size):
                dist.broadcast(buf, src=0)
        except RuntimeError as e:
            raise self._fail(what, e) from None
        return _decode(buf)


def _encode(text: str) -> torch.Tensor:
    raw = text.encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def _decode(t: torch.Tensor) -> str:
    return t.numpy().tobytes().decode("utf-8")
