"""Prometheus metrics of a gateway process, and the event-loop lag probe.

Apart from gateway/observability.py (logging) so that `--workers N` can set up prometheus-client's
multiprocess mode before anything imports prometheus_client: the parent never imports this
module, and each forked worker imports it with PROMETHEUS_MULTIPROC_DIR already set, so every
worker writes its values to files there and any worker's `/metrics` answers for all of them.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Callable
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector

from gateway.config import METRICS_DIR_ENV


class Metrics:
    """Prometheus metrics of one gateway process, in their own registry.

    Per-chunk work stays off the metrics: counts are added once per stream when it ends, and
    gauges that mirror live state are read from callbacks (`mirror`), so the hot path pays
    nothing for them.

    In multiprocess mode (METRICS_DIR_ENV set: `--workers N`) the values live in files that
    `render` sums over every live worker: counters and histograms add up, the live-state gauges
    are summed over live workers ("livesum"), and `draining`/`overloaded` are 1 if any worker is.
    The mirrored gauges are then written by `refresh` (every loop-lag tick and before a scrape),
    since a scrape reads the files, not the callbacks. The process_* and python_gc_* metrics are
    left out there (they would describe only the worker that happened to answer): each worker's
    resident memory and collector counts are exported instead, with a `pid` label
    (`gateway_worker_*`).
    """

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(METRICS_DIR_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        self._mirrors: list[tuple[Gauge, Callable[[], float]]] = []
        r = self.registry
        if not self.multiprocess:
            ProcessCollector(registry=r)  # process_resident_memory_bytes, open fds, CPU
            GCCollector(registry=r)  # python_gc_collections_total, ..._objects_collected_total
        else:
            self._worker_memory()

        def live(name: str, doc: str) -> Gauge:
            """A gauge of this process's live state (summed over live workers)."""
            return Gauge(name, doc, registry=r, multiprocess_mode="livesum")

        self.open_sockets = live("gateway_open_sockets", "WebSockets open now")
        self.active_streams = live(
            "gateway_active_streams", "Streams running now (upstream requests)"
        )
        self.upstream_open = live("gateway_upstream_open_responses", "Upstream responses open now")
        self.upstream_pool_idle = live(
            "gateway_upstream_pool_idle", "Idle keep-alive upstream connections"
        )
        self.tasks = live("gateway_asyncio_tasks", "asyncio tasks alive in the process")
        self.draining = Gauge(
            "gateway_draining", "1 while the gateway drains", registry=r, multiprocess_mode="max"
        )
        self.streams_started = Counter(
            "gateway_streams_started", "Streams accepted", ["dialect"], registry=r
        )
        self.streams_ended = Counter(
            "gateway_streams_ended", "Streams ended, by outcome", ["dialect", "outcome"], registry=r
        )
        self.chunks = Counter(
            "gateway_upstream_chunks", "Upstream text deltas relayed", ["dialect"], registry=r
        )
        self.parts_sent = Counter(
            "gateway_parts",
            "Part messages sent (reasoning_chunk, sources, tool_call, progress), by kind",
            ["dialect", "kind"],
            registry=r,
        )
        self.sources_dropped = Counter(
            "gateway_sources_dropped",
            "Sources an upstream revealed beyond --max-sources in one stream (not relayed)",
            ["dialect"],
            registry=r,
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
        self.transport_streams = Counter(
            "gateway_transport_streams",
            "Streams started, by the transport of their client: websocket, http (POST "
            "/v1/streams) or ai_sdk (POST /v1/ai-sdk/chat)",
            ["transport"],
            registry=r,
        )
        self.http_requests = Counter(
            "gateway_http_requests",
            "Requests on the HTTP side of the streams, by route (streams: POST /v1/streams; "
            "stream: GET or DELETE /v1/streams/{id}; other) and status",
            ["route", "status"],
            registry=r,
        )
        # By upstream (route names from --routes, or `default`: bounded by configuration).
        self.upstream_requests = Counter(
            "gateway_upstream_requests",
            "Upstream requests sent (retries included), by upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "gateway_upstream_failures",
            "Upstream attempts that failed the upstream's way (unreachable, 429, 5xx, overloaded, "
            "timeout, broken off), by upstream and protocol error code",
            ["upstream", "code"],
            registry=r,
        )
        self.upstream_fallbacks = Counter(
            "gateway_upstream_fallbacks",
            "Streams that moved on from an upstream before their first token: after its failure "
            "(reason=error) or because its circuit breaker was open (reason=breaker)",
            ["upstream", "reason"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "gateway_upstream_breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open (a probe is out), 2 open",
            ["upstream"],
            registry=r,
            multiprocess_mode="max",
        )
        self.upstream_ttft = Histogram(
            "gateway_upstream_ttft_seconds",
            "From sending a request to an upstream to its first token, by upstream",
            ["upstream"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=r,
        )
        # Usage and cost (docs/usage.md): by upstream and model, never by principal (bounded:
        # the model label is capped, see gateway.io.accounting.MODEL_LABELS).
        self.usage_tokens = Counter(
            "gateway_usage_tokens",
            "Tokens used by ended streams, by upstream, model and kind (prompt, completion, "
            "reasoning and cached are parts of prompt and completion; total = prompt + "
            "completion)",
            ["upstream", "model", "kind"],
            registry=r,
        )
        self.usage_cost = Counter(
            "gateway_usage_cost_usd",
            "USD spent by ended streams (the upstream's figure or the price table's), by "
            "upstream and model",
            ["upstream", "model"],
            registry=r,
        )
        self.usage_streams = Counter(
            "gateway_usage_streams",
            "Ended streams charged, by upstream, model and whether their usage was estimated "
            "(the upstream reported none: cancelled or broken streams) or priced (cost known)",
            ["upstream", "model", "estimated", "priced"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "gateway_budget_refusals",
            "Starts refused with budget_exceeded, by measure (tokens or cost)",
            ["measure"],
            registry=r,
        )
        self.budget_shared = Gauge(
            "gateway_budget_shared",
            "1 while usage is accounted in Redis across instances, 0 while this process counts "
            "alone (no --redis-url, or Redis unreachable: see gateway_budget_sync_failures)",
            registry=r,
            multiprocess_mode="min",
        )
        self.budget_sync_failures = Counter(
            "gateway_budget_sync_failures",
            "Failed exchanges with Redis about usage (the charges are kept and sent again)",
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
            multiprocess_mode="max",
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late a timer due every 0.25 s ran: the wait every chunk and first token adds "
            "when the event loop is saturated",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )

        self.resume_retained_bytes = live(
            "gateway_resume_retained_bytes",
            "Memory held by ended streams kept for a resume (bounded by --resume-total-bytes)",
        )
        self.resume_retained_streams = live(
            "gateway_resume_retained_streams", "Ended streams kept for a resume"
        )
        self.resume_tombstones = live(
            "gateway_resume_tombstones",
            "Forgotten resume tokens remembered to answer resume_unavailable (bounded)",
        )
        self.heap_blocks = live(
            "gateway_python_heap_blocks",
            "Memory blocks CPython's allocator has handed out and not got back "
            "(sys.getallocatedblocks): falls back when objects are freed, unlike resident memory",
        )
        self.mirror(self.heap_blocks, sys.getallocatedblocks)
        self.seam_mode = Gauge(
            "gateway_seam_mode",
            "1 for the mode each dependency shortcut runs in (gateway/io/seams/: push or pull "
            "upstream bodies, fast or standard client frames)",
            ["seam", "mode"],
            registry=r,
            multiprocess_mode="max",
        )
        self.gc_full_collection = Histogram(
            "gateway_gc_full_collection_seconds",
            "How long each periodic full garbage collection held the event loop",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )

    def _worker_memory(self) -> None:
        """Per-worker resident memory and collector counts (multiprocess mode)."""
        r = self.registry
        rss = Gauge(
            "gateway_worker_resident_memory_bytes",
            "Resident memory of each worker process",
            registry=r,
            multiprocess_mode="liveall",
        )
        self.mirror(rss, resident_memory_bytes)
        collections = Gauge(
            "gateway_worker_gc_collections",
            "Garbage collections run by each worker, by generation",
            ["generation"],
            registry=r,
            multiprocess_mode="liveall",
        )
        collected = Gauge(
            "gateway_worker_gc_objects_collected",
            "Objects freed by each worker's garbage collections, by generation",
            ["generation"],
            registry=r,
            multiprocess_mode="liveall",
        )
        for generation in range(len(gc.get_stats())):
            self.mirror(collections.labels(str(generation)), _gc_stat(generation, "collections"))
            self.mirror(collected.labels(str(generation)), _gc_stat(generation, "collected"))

    def mirror(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Keep `gauge` equal to `read()`: read at scrape time in one process; written by
        `refresh` in multiprocess mode."""
        if self.multiprocess:
            self._mirrors.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh(self) -> None:
        """Write the mirrored gauges (multiprocess mode; nothing to do otherwise)."""
        for gauge, read in self._mirrors:
            gauge.set(read())

    def render(self) -> bytes:
        """The text exposition format for `GET /metrics` (every worker's, in multiprocess
        mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.refresh()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped module
        return generate_latest(registry)


_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _gc_stat(generation: int, key: str) -> Callable[[], float]:
    """Reads one of the collector's cumulative counts for one generation."""

    def read() -> float:
        return float(gc.get_stats()[generation][key])

    return read


def resident_memory_bytes() -> float:
    """This process's resident set size (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return float(int(statm.read().split()[1]) * _PAGE_SIZE)
    except (OSError, ValueError, IndexError):
        return 0.0


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
    `on_tick` runs on every tick (the gateway refreshes its multiprocess gauges there).
    """

    def __init__(
        self,
        histogram: Histogram,
        interval: float = LOOP_LAG_INTERVAL,
        limit: float = 0.0,
        on_change: Callable[[bool, float], None] | None = None,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self._histogram = histogram
        self._on_tick = on_tick
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
        if self._on_tick is not None:
            self._on_tick()
        self._schedule()
