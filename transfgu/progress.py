"""The progress of a loop: a tqdm bar on a terminal, plain log lines otherwise (TRANSFGU_PROGRESS*)."""
from __future__ import annotations

import logging
import os
import sys
import time

from tqdm import tqdm

from . import dist

PROGRESS_ENV = "TRANSFGU_PROGRESS"                # auto (default) | bar | lines | off
PROGRESS_EVERY_ENV = "TRANSFGU_PROGRESS_EVERY"    # percent between two plain lines (default 10)
PROGRESS_SECONDS_ENV = "TRANSFGU_PROGRESS_SECONDS"  # and at least this many seconds (default 10)
progress_log = logging.getLogger("transfgu.progress")


def progress_mode(stream=None) -> str:
    """'bar' when `stream` (default stderr) is a terminal, else 'lines'; TRANSFGU_PROGRESS=bar|lines|off overrides."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "bar", "lines", "off"):
        raise ValueError(f"{PROGRESS_ENV}={mode!r}: expected auto, bar, lines or off")
    if mode == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    return mode


class LineProgress:
    """The non-terminal progress of a loop: one log line (logger transfgu.progress, INFO) each time another
    `every` percent of `total` items is done (without a total: at 1, 2, 4, 8... items), but not within
    `min_seconds` of the previous line (or of the start), so short loops stay silent; the last item gets a line
    when an earlier one had one or the loop took `min_seconds`. No carriage returns: a log piped to a file stays
    readable. Iterable like a tqdm bar; set_postfix adds values to the next line."""

    def __init__(self, iterable, desc: str = "", total=None, unit: str = "it", every: float = 10.0,
                 min_seconds: float = 10.0):
        self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
        if total is None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total, self.every, self.min_seconds = total, max(float(every), 1e-9), float(min_seconds)
        self.n, self.postfix, self.t0, self._next = 0, "", time.time(), 1
        self._last_time, self._lines, self._last_logged = self.t0, 0, 0

    def __len__(self):
        return self.total if self.total is not None else len(self.iterable)

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, now):
        dt = now - self.t0
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        rate = f", {self.n / dt:.3g} {self.unit}/s" if dt > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        progress_log.info("%s: %s%s in %.1f s%s%s", self.desc, done, pct, dt, rate, extra)
        self._last_time, self._lines, self._last_logged = now, self._lines + 1, self.n

    def _final(self, now):
        if self.n != self._last_logged and (self._lines or now - self.t0 >= self.min_seconds):
            self._line(now)

    def _tick(self):
        now = time.time()
        if self.total:
            if self.n == self.total:
                return self._final(now)
            step = self.total * self.every / 100
            due = self.n < self.total and int(self.n / step) > int((self.n - 1) / step)
        else:
            due = self.n >= self._next
            if due:
                self._next *= 2
        if due and now - self._last_time >= self.min_seconds:
            self._line(now)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1
            self._tick()
        self.close()

    def update(self, n: int = 1):
        self.n += n
        self._tick()

    def close(self):
        if not self.total:  # the end of a loop of unknown length
            self._final(time.time())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable, desc: str = "", total=None, unit: str = "it", disable: bool = False, **kwargs):
    """The progress of a loop, shown by rank 0 only: a tqdm bar when stderr is a terminal, else plain log lines,
    one per TRANSFGU_PROGRESS_EVERY percent (default 10) and at most one per TRANSFGU_PROGRESS_SECONDS (default
    10; see LineProgress). TRANSFGU_PROGRESS=bar, lines or off forces a mode. Other keyword arguments go to tqdm."""
    mode = "off" if disable or not dist.is_main() else progress_mode()
    if mode == "lines":
        return LineProgress(iterable, desc, total, unit, float(os.environ.get(PROGRESS_EVERY_ENV, 10)),
                            float(os.environ.get(PROGRESS_SECONDS_ENV, 10)))
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=mode == "off", **kwargs)
