"""Progress of long work (training epochs, explaining a dataset): a tqdm bar on a terminal (stderr);
in a redirected log, a plain line on stdout every ``every_s`` seconds with the rate and the time left,
never carriage returns; nothing when disabled."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """``1h02m03s``, ``2m03s`` or ``3s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``total`` units of work (``unit``: "batch", "image") under the name ``desc``."""

    def __init__(
        self, total: int, desc: str, *, unit: str = "item", enabled: bool = True, every_s: float = 30.0
    ):
        self.total, self.desc, self.unit, self.enabled, self.every_s = total, desc, unit, enabled, every_s
        self.units = f"{unit}es" if unit.endswith(("ch", "sh", "s", "x")) else f"{unit}s"
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, count: int = 1, postfix: Callable[[], dict[str, str]] | None = None) -> None:
        """``count`` more units done. ``postfix`` gives fields to show; it is called only when something
        is shown (at most once a second on a terminal), so reading device values costs no sync on the
        other steps."""
        self.done += count
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(count)
            if postfix is not None and (now - self.last >= 1.0 or self.done >= self.total):
                self.last = now
                self.bar.set_postfix(postfix())
            return
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = duration((self.total - self.done) / rate) if rate > 0 else "?"
            fields = "".join(f", {k} {v}" for k, v in postfix().items()) if postfix is not None else ""
            print(
                f"{self.desc}: {self.done}/{self.total} {self.units}, {rate:.3g} {self.units}/s, {left} left"
                f"{fields}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
