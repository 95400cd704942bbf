"""The process's memory policy: what the cyclic collector does, and how often it looks at all.

The gateway's own per-stream and per-socket objects form no reference cycles
(tests/io/test_memory.py proves it for every outcome), so reference counting frees them the
moment a stream or socket is done, whatever the collector does. Cycles can still come from
elsewhere (asyncio's own selector transports on Python 3.11 refer to themselves; a library's
error path may keep a traceback), and
with the thresholds below a full collection would come only every few hours under load. So a
timer runs one every `FULL_COLLECTION_INTERVAL`: whatever a dependency leaves in a cycle is freed
within minutes, never hours (docs/reliability.md, "Memory").
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import sys
import time
from collections.abc import Callable
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


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, which gives the free pages inside the C heap back to the system
    (fragmentation otherwise keeps them resident); None where there is none (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class FullCollections:
    """Runs a full collection every `interval` seconds, then gives the C heap's free pages
    back to the system (malloc_trim, where there is one), and records how long both paused
    the loop: the bound on how long anything caught in a reference cycle stays in memory, and
    on how far fragmentation lets resident memory drift above what is in use."""

    def __init__(
        self,
        pause: Histogram,
        interval: float = FULL_COLLECTION_INTERVAL,
        trim: Callable[[int], int] | None = None,
    ) -> None:
        self._pause = pause
        self.interval = interval
        self._trim = trim if trim is not None else _find_malloc_trim()
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
        if self._trim is not None:
            self._trim(0)
        paused = time.perf_counter() - began
        self._pause.observe(paused)
        if freed:
            log.debug("gc.full_collection", freed=freed, pause_ms=round(paused * 1000, 2))
        self.start()
