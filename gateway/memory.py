"""The process's memory policy: what the cyclic collector does, and how often it looks at all.

The gateway's own per-stream and per-socket objects form no reference cycles (tests/test_memory.py
proves it for every outcome), so reference counting frees them the moment a stream or socket is
done, whatever the collector does. Cycles can still come from elsewhere (asyncio's own selector
transports on Python 3.11 refer to themselves; a library's error path may keep a traceback), and
with the thresholds below a full collection would come only every few hours under load. So a
timer runs one every `FULL_COLLECTION_INTERVAL`: whatever a dependency leaves in a cycle is freed
within minutes, never hours (docs/reliability.md, "Memory").
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import TYPE_CHECKING, Final

import structlog

if TYPE_CHECKING:  # not at run time: `--workers` must set up metrics before the first import
    from prometheus_client import Histogram

log = structlog.get_logger("gateway.memory")

#: Young-generation threshold (CPython's default is 700). Every relayed chunk allocates a few
#: short-lived objects; at the default, young collections (and the full collections they lead
#: to over every socket's objects) cost several per cent of a paced relay's CPU
#: (docs/performance.md).
GC_THRESHOLD: Final = (10_000, 20, 20)

#: Seconds between two full collections run by the timer (the pause is in
#: gateway_gc_full_collection_seconds).
FULL_COLLECTION_INTERVAL: Final = 300.0


def tune_gc() -> None:
    """Move everything allocated while starting (modules, config, the gateway) out of the
    collector's sight for good, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


class FullCollections:
    """Runs a full collection every `interval` seconds and records how long it paused the
    loop: the bound on how long anything caught in a reference cycle stays in memory."""

    def __init__(self, pause: Histogram, interval: float = FULL_COLLECTION_INTERVAL) -> None:
        self._pause = pause
        self.interval = interval
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._run)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _run(self) -> None:
        began = time.perf_counter()
        freed = gc.collect()
        paused = time.perf_counter() - began
        self._pause.observe(paused)
        if freed:
            log.debug("gc.full_collection", freed=freed, pause_ms=round(paused * 1000, 2))
        self.start()
