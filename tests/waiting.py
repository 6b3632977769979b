"""Polling for what a test's background servers, workers and jobs will do."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    what: str, predicate: Callable[[], object], timeout: float = 300.0, interval: float = 0.2
) -> object:
    """`predicate()`'s first truthy value, polled every `interval` s; fails naming `what`
    after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
