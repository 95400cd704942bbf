"""Logging setup: structlog with JSON lines (orjson) for machines, pretty output on a TTY.

Context is bound with contextvars: `session` per socket and `stream` per stream task, so every
line a stream's code writes says which socket and stream it belongs to. Prompts, answers and keys
are never passed to a logger.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import BinaryIO, Final

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    fmt: str = "json", level: str = "info", stream: BinaryIO | None = None
) -> None:
    """Configure structlog (and stdlib logging of our libraries) once per process.

    `stream` (JSON only) redirects the log lines, for tests that read them."""
    numeric = _LEVELS[level]
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "console":
        structlog.configure(
            processors=[
                *shared,
                structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            logger_factory=structlog.BytesLoggerFactory(
                file=stream if stream is not None else sys.stderr.buffer
            ),
            cache_logger_on_first_use=True,
        )
    # websockets and aiohttp log through stdlib logging; keep their warnings, drop their chatter.
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(message)s"
    )


class Metrics:
    """Prometheus metrics of one gateway process, in their own registry.

    Per-chunk work stays off the metrics: counts are added once per stream when it ends, and
    gauges that mirror live state are read at scrape time (callbacks), so the hot path pays
    nothing for them.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, open_fds, ...
        r = self.registry
        self.open_sockets = Gauge("gateway_open_sockets", "WebSockets open now", registry=r)
        self.active_streams = Gauge(
            "gateway_active_streams", "Streams running now (upstream requests)", registry=r
        )
        self.upstream_open = Gauge(
            "gateway_upstream_open_responses", "Upstream responses open now", registry=r
        )
        self.upstream_pool_idle = Gauge(
            "gateway_upstream_pool_idle", "Idle keep-alive upstream connections", registry=r
        )
        self.tasks = Gauge(
            "gateway_asyncio_tasks", "asyncio tasks alive in the process", registry=r
        )
        self.draining = Gauge("gateway_draining", "1 while the gateway drains", registry=r)
        self.streams_started = Counter(
            "gateway_streams_started", "Streams accepted", ["dialect"], registry=r
        )
        self.streams_ended = Counter(
            "gateway_streams_ended", "Streams ended, by outcome", ["dialect", "outcome"], registry=r
        )
        self.chunks = Counter(
            "gateway_upstream_chunks", "Upstream text deltas relayed", ["dialect"], registry=r
        )
        self.upstream_bytes = Counter(
            "gateway_upstream_bytes", "Upstream body bytes read", ["dialect"], registry=r
        )
        self.upstream_retries = Counter(
            "gateway_upstream_retries", "Upstream requests retried before any output", registry=r
        )
        self.slow_client_closes = Counter(
            "gateway_slow_client_closes", "Sockets closed with 4408 (slow consumer)", registry=r
        )
        self.upstream_responses = Counter(
            "gateway_upstream_responses",
            "Upstream HTTP answers by status class",
            ["status"],
            registry=r,
        )
        self.coalesced = Counter(
            "gateway_coalesced_deltas",
            "Upstream deltas merged into a previous frame because the socket was busy",
            registry=r,
        )
        self.time_to_first_chunk = Histogram(
            "gateway_time_to_first_chunk_seconds",
            "From accepting a start to its first upstream text delta",
            ["dialect"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.stream_duration = Histogram(
            "gateway_stream_duration_seconds",
            "From accepting a start to its terminal frame",
            ["dialect"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 40, 80, 160),
            registry=r,
        )
        self.cancel_latency = Histogram(
            "gateway_cancel_latency_seconds",
            "From deciding to cancel a stream to its upstream connection being closed",
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1),
            registry=r,
        )
        self.rejected = Counter(
            "gateway_rejected_connections", "Upgrades refused, by reason", ["reason"], registry=r
        )
        self.overloaded = Gauge(
            "gateway_overloaded",
            "1 while the event-loop lag is over --max-loop-lag (/readyz then answers 503)",
            registry=r,
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late a timer due every 0.25 s ran: the wait every chunk and first token adds "
            "when the event loop is saturated",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format for `GET /metrics`."""
        return generate_latest(self.registry)


#: How often the loop-lag probe runs (four timer callbacks a second cost nothing measurable).
LOOP_LAG_INTERVAL: Final = 0.25
#: --max-loop-lag judges the worst lag of this many recent ticks (2 s at the interval above):
#: one slow tick does not flip readiness, and it recovers once the loop has kept up that long.
LOOP_LAG_WINDOW: Final = 8


class LoopLag:
    """Measures event-loop lag: a timer due every `interval` seconds notes how late it ran.

    One event loop serves every socket of a process, so when it is saturated every chunk waits
    about one loop iteration and a new stream's first chunk about three; the relay's own
    metrics do not show that, this does (`gateway_event_loop_lag_seconds`). Lag is read with
    time.monotonic(), finer than uvloop's 1 ms timer clock.

    With a `limit` (--max-loop-lag), `overloaded` is set while the worst lag of the last
    LOOP_LAG_WINDOW ticks is over it, and `on_change` hears each change (the gateway then
    answers /readyz with 503, so that a load balancer sends new sockets elsewhere).
    """

    def __init__(
        self,
        histogram: Histogram,
        interval: float = LOOP_LAG_INTERVAL,
        limit: float = 0.0,
        on_change: Callable[[bool, float], None] | None = None,
    ) -> None:
        self._histogram = histogram
        self._interval = interval
        self._limit = limit
        self.on_change = on_change
        self._recent = [0.0] * LOOP_LAG_WINDOW
        self._slot = 0
        self.overloaded = False
        self._due = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def worst(self) -> float:
        """The largest lag of the recent ticks, seconds."""
        return max(self._recent)

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        self._due = time.monotonic() + self._interval
        self._timer = asyncio.get_running_loop().call_later(self._interval, self._tick)

    def _tick(self) -> None:
        # uvloop rounds timers to its 1 ms clock, so a timer on time can run up to 1 ms early.
        lag = max(0.0, time.monotonic() - self._due)
        self._histogram.observe(lag)
        self._recent[self._slot] = lag
        self._slot = (self._slot + 1) % LOOP_LAG_WINDOW
        if self._limit > 0:
            over = self.worst() > self._limit
            if over is not self.overloaded:
                self.overloaded = over
                if self.on_change is not None:
                    self.on_change(over, self.worst())
        self._schedule()
