"""Progress over the images of a dataset: a bar with images/s and the time left on a terminal; in a
redirected log, a plain line every 30 s (never carriage returns)."""

from __future__ import annotations

import sys
import time

__all__ = ["ImageProgress", "duration"]


def duration(seconds: float) -> str:
    """``1h02m03s``, ``2m03s`` or ``3s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ImageProgress:
    """Images explained out of ``total``: a tqdm bar on a terminal (stderr), else a line on stdout
    every ``every_s`` seconds with images/s and the time left; nothing when not ``enabled``."""

    def __init__(self, total: int, *, enabled: bool = True, every_s: float = 30.0, desc: str = "explain"):
        self.total, self.enabled, self.every_s, self.desc = total, enabled, every_s, desc
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="image", dynamic_ncols=True, leave=False)

    def update(self, images: int) -> None:
        """``images`` more are done."""
        self.done += images
        if self.bar is not None:
            self.bar.update(images)
            return
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = duration((self.total - self.done) / rate) if rate > 0 else "?"
            print(
                f"{self.desc}: {self.done}/{self.total} images, {rate:.3g} images/s, {left} left", flush=True
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
