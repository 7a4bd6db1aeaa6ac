"""Progress text with rate and ETA (plain Python; the host shows it on the node)."""
from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


class Clock:
    """ETA from the work done since this clock started (work resumed from disk does not count)."""

    def __init__(self, total: int, done: int = 0, unit: str = "it"):
        self.total, self.start_done, self.unit = total, done, unit
        self.start = time.monotonic()

    def text(self, done: int, extra: str = "") -> str:
        elapsed = time.monotonic() - self.start
        fresh = done - self.start_done
        parts = [f"{done}/{self.total} {self.unit}"]
        if fresh > 0:
            per = elapsed / fresh
            parts.append(f"{per:.2f} s/{self.unit}" if per >= 1 else f"{1 / per:.1f} {self.unit}/s")
            parts.append(f"ETA {format_duration(per * (self.total - done))}")
        if extra:
            parts.append(extra)
        return " · ".join(parts)
