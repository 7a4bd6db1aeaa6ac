"""Progress text with rate and ETA (plain Python): the nodes' text line and the headless runner's bar."""
from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def format_rate(seconds_per_unit: float, unit: str) -> str:
    """'2.5 it/s' when faster than one a second, else '1.30 s/it'."""
    return f"{seconds_per_unit:.2f} s/{unit}" if seconds_per_unit >= 1 else f"{1 / seconds_per_unit:.1f} {unit}/s"


class Clock:
    """Rate and ETA from the work done since this clock started (work resumed from disk does not count). Once
    `settle` fresh units are done the rate counts only what follows: the first units carry the one-time costs
    (CUDA graph captures, warm-ups), which would make an early ETA of a long run hours too long."""

    def __init__(self, total: int, done: int = 0, unit: str = "it", settle: int = 2,
                 now: Callable[[], float] = time.monotonic):
        self.total, self.start_done, self.unit, self.settle, self.now = total, done, unit, settle, now
        self.start = now()
        self.settled = None  # (time, done) when `settle` fresh units were first seen done

    def seconds_per_unit(self, done: float) -> float | None:
        now = self.now()
        if self.settled is None and done - self.start_done >= self.settle > 0:
            self.settled = (now, done)
        since, base = self.settled if self.settled is not None and done > self.settled[1] else (self.start, self.start_done)
        fresh = done - base
        return (now - since) / fresh if fresh > 0 else None

    def elapsed(self) -> float:
        return self.now() - self.start

    def rate_and_eta(self, done: float) -> list[str]:
        """['1.30 s/it', 'ETA 2m10s'], or [] before the first unit of fresh work."""
        per = self.seconds_per_unit(done)
        if per is None:
            return []
        return [format_rate(per, self.unit), f"ETA {format_duration(per * max(0, self.total - done))}"]

    def text(self, done: int, extra: str = "") -> str:
        parts = [f"{done}/{self.total} {self.unit}"] + self.rate_and_eta(done)
        if extra:
            parts.append(extra)
        return " · ".join(parts)


class Throttle:
    """True at most every `seconds` (and always the first time): how often a node's text line is resent."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, None

    def due(self) -> bool:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


class TrainingLine:
    """A training node's text line: where the run stands, its rate, ETA and losses (resent at most every
    `seconds`, and after the last iteration), and after Cancel where the checkpoint is. `show` puts a line on the
    node; `note` is added under every progress line (a reason the run is slower than it could be)."""

    def __init__(self, total: int, show: Callable[[str], None], seconds: float = 1.0, note: str | None = None):
        self.total, self.show, self.note = total, show, note
        self.throttle, self.clock, self.losses = Throttle(seconds), None, {}

    def loading(self, saved: int) -> None:
        self.show(f"{saved}/{self.total} it · loading the model and trajectories")

    def started(self, done: int) -> None:
        self.clock = Clock(self.total, done, "it")
        self.show(self.clock.text(done, "resumed" if done else "started"))

    def iteration(self, done: int, losses: dict) -> None:
        self.losses.update(losses)
        if self.throttle.due() or done == self.total:
            line = self.clock.text(done, " · ".join(f"{key} {v:.4g}" for key, v in sorted(self.losses.items())))
            self.show(line + (f"\n{self.note}" if self.note else ""))

    def cancelled(self, saved: int, folder, name: str) -> None:
        self.show(f"Cancelled at {saved}/{self.total} it: checkpoint saved in {folder}. "
                  f"Queue again with the same name ({name}) and settings to resume.")
