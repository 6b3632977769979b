"""Progress bars that a job runner can read and stop.

Stages make their bars with `progress_bar(...)` (a tqdm). On the command line that is all it
is. Inside a job, the runner installs a `ProgressSink` first: every bar then also reports
(step, total, description) to it, at most every `interval` seconds, and checks whether the job
was asked to stop — so a cancelled job stops at its next step, with whatever it checkpointed
kept, and progress never comes from parsing terminal output.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm


class JobCancelled(Exception):
    """Raised inside a stage at its next step after its job was cancelled."""


class ProgressSink:
    """Where a job's bars report to: `report(step, total, desc)` and `cancelled() -> bool`."""

    def __init__(
        self,
        report: Callable[[int, int | None, str], None],
        cancelled: Callable[[], bool] = lambda: False,
        interval: float = 1.0,
    ):
        self.report, self.cancelled, self.interval = report, cancelled, interval
        self._last = 0.0

    def update(self, bar: tqdm, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            desc = getattr(bar, "desc", "") or ""  # a disabled bar (e.g. rank > 0) has none
            self.report(int(bar.n), None if bar.total is None else int(bar.total), desc)
        if self.cancelled():  # every step: a flag or a stat, far cheaper than a step
            raise JobCancelled("the job was cancelled")


_sink: ProgressSink | None = None


def install_sink(sink: ProgressSink | None) -> None:
    """Route every progress bar made from now on in this process to `sink` (None: stop)."""
    global _sink
    _sink = sink


class _ReportingBar(tqdm):
    def __iter__(self):  # tqdm's own iteration bypasses update()
        for item in super().__iter__():
            yield item
            if _sink is not None:
                _sink.update(self)

    def update(self, n=1):
        out = super().update(n)
        if _sink is not None:
            _sink.update(self)
        return out

    def close(self):
        if _sink is not None and not self.disable and self.total is not None:
            _sink.report(int(self.n), int(self.total), self.desc or "")
        super().close()


def progress_bar(*args, **kwargs) -> tqdm:
    """A tqdm progress bar that also reports to the installed sink, if any."""
    return _ReportingBar(*args, **kwargs)
