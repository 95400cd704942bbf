"""The upstream side: one aiohttp POST per stream, its SSE relayed into the session.

The only module that imports aiohttp. Foreign exceptions are mapped to protocol error codes here
and nowhere else (`relay` never raises but `CancelledError`). Cancelling a relay closes its
upstream connection instead of returning it to the pool half-read, so the upstream stops
generating (and billing) at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import orjson
import structlog
import yarl

from gateway import __version__
from gateway.config import Config
from gateway.core.clock import Clock, Timer
from gateway.core.dialects import (
    RequestDefaults,
    Translator,
    UpstreamFailure,
    dialect_for,
    parse_error_body,
    status_retryable,
)
from gateway.core.parts import PartLimits
from gateway.core.protocol import ErrorCode
from gateway.core.retry import RETRY_STATUSES, RetryPolicy
from gateway.core.routes import (
    CLOSED,
    DEFAULT_UPSTREAM,
    STATE_VALUES,
    Attempt,
    Breaker,
    UpstreamSpec,
    single_route,
)
from gateway.core.session import (
    Outbox,
    State,
    Stream,
    finish_done,
    finish_fail,
    prompt_chars,
)
from gateway.core.sse import SSEDecoder, SSEEventTooLarge
from gateway.core.usage import Meter, Pricer, prompt_estimate
from gateway.io.seams import attach_push, detach_push, pool_idle, set_reading
from gateway.io.timers import LoopClock
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from prometheus_client import Counter

log = structlog.get_logger("gateway.upstream")

#: Bytes of a non-2xx body we read to describe the error (the rest is never read).
ERROR_BODY_LIMIT: Final = 16 * 1024
#: Largest single SSE event accepted from the upstream (Perplexity's last chunk with search
#: results is tens of KB; a runaway event must not grow memory without bound).
MAX_EVENT_BYTES: Final = 4 * 1024 * 1024
#: After the last event: how long, and for how many bytes, the rest of the body is read so the
#: connection can be pooled (normally a 5-byte chunked terminator, there at once).
TAIL_TIMEOUT: Final = 0.5
TAIL_LIMIT: Final = 64 * 1024


class FlowControl:
    """Backpressure between a socket's writer and the upstream readers of its streams.

    A reader checks `congested()` after each upstream read (a plain attribute read on the hot
    path) and only then awaits `wait()`: it stops reading (and aiohttp stops reading the
    upstream socket) until the writer has emptied the outbox. The future readers wait on is
    created only when one has to wait, so an idle socket pays nothing for it.
    """

    __slots__ = ("_outbox", "_parked", "_space", "_stalled", "limit", "stalls", "waiting")

    def __init__(self, limit: int, outbox: Outbox) -> None:
        self.limit = limit
        self._outbox = outbox
        self._space: asyncio.Future[None] | None = None
        self._parked: list[Callable[[], None]] | None = None
        #: How many times a reader had to wait (a slow-client signal for logs and metrics).
        self.stalls = 0
        self._stalled: asyncio.Event | None = None
        #: Something waits for `wake()` (a paused reader or `wait()`): the writer calls it only
        #: then, a plain attribute read per flush instead of a call.
        self.waiting = False

    @property
    def stalled(self) -> asyncio.Event:
        """Set once any reader has had to wait (created on first use)."""
        if self._stalled is None:
            self._stalled = asyncio.Event()
            if self.stalls:
                self._stalled.set()
        return self._stalled

    def congested(self) -> bool:
        return self._outbox.buffered > self.limit

    def _stall(self) -> None:
        self.stalls += 1
        if self._stalled is not None:
            self._stalled.set()

    async def wait(self) -> None:
        """Wait until the outbox is under the limit (a remote follower's pacing)."""
        while self._outbox.buffered > self.limit:
            self._stall()
            if self._space is None or self._space.done():
                self._space = asyncio.get_running_loop().create_future()
            self.waiting = True
            await asyncio.shield(self._space)

    def on_wake(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, at the next `wake()` (a paused upstream body feed)."""
        self._stall()
        if self._parked is None:
            self._parked = []
        self._parked.append(callback)
        self.waiting = True

    def wake(self) -> None:
        """Paused readers check again: the writer emptied the outbox, a stream moved to
        another socket, or the socket is gone."""
        self.waiting = False
        space = self._space
        if space is not None:
            self._space = None
            if not space.done():
                space.set_result(None)
        parked = self._parked
        if parked:
            self._parked = None
            for callback in parked:
                callback()


class Route:
    """One upstream as the relay uses it: its spec, parsed URL, dialect, retry policy, circuit
    breaker and labelled metric series (resolved once: `labels()` takes a lock and builds its
    key on every call, docs/performance.md)."""

    __slots__ = (
        "_failures",
        "_fallbacks",
        "_metrics",
        "_state",
        "breaker",
        "dialect",
        "name",
        "requests",
        "retry",
        "spec",
        "timeout",
        "ttft",
        "url",
    )

    def __init__(self, spec: UpstreamSpec, retry_budget: float, metrics: Metrics) -> None:
        self.spec = spec
        self.name = spec.name
        self.dialect = dialect_for(spec.dialect)
        self.url = yarl.URL(spec.url)  # parsed once, not on every request
        self.retry = RetryPolicy(spec.retries, retry_budget)
        self.breaker = Breaker(spec.breaker_failures, spec.breaker_cooldown)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=spec.connect_timeout, sock_connect=spec.connect_timeout
        )
        self._metrics = metrics
        self.requests = metrics.upstream_requests.labels(spec.name)
        self.ttft = metrics.upstream_ttft.labels(spec.name)
        self._state = metrics.breaker_state.labels(spec.name)
        self._fallbacks: dict[str, Counter] = {}
        self._failures: dict[str, Counter] = {}
        self._state.set(STATE_VALUES[CLOSED])

    def allow(self, now: float) -> bool:
        allowed = self.breaker.allow(now)
        self._show()
        return allowed

    def succeeded(self) -> None:
        if self.breaker.state != CLOSED:
            self.breaker.success()
            self._show()
        else:
            self.breaker.success()

    def failed(self, now: float, failure: UpstreamFailure) -> None:
        """A failure of the upstream's own (retryable): counted, and held against it."""
        self._count(self._failures, self._metrics.upstream_failures, failure.code.value)
        hold = None
        if failure.status == 429 and failure.retry_after_ms is not None:
            hold = failure.retry_after_ms / 1000
        self.breaker.failure(now, hold)
        self._show()

    def released(self, now: float) -> None:
        self.breaker.release(now)
        self._show()

    def fallback(self, reason: str) -> None:
        """A stream moved on from this upstream (`error`), or skipped it (`breaker`)."""
        self._count(self._fallbacks, self._metrics.upstream_fallbacks, reason)

    def _count(self, cache: dict[str, Counter], family: Counter, label: str) -> None:
        series = cache.get(label)
        if series is None:
            series = cache[label] = family.labels(self.name, label)
        series.inc()

    def _show(self) -> None:
        self._state.set(STATE_VALUES[self.breaker.state])


class _DialectSeries:
    """The per-dialect metric series of the streams an upstream of that dialect served."""

    __slots__ = ("bytes", "chunks", "duration", "ended", "started", "ttfc")

    def __init__(self, metrics: Metrics, dialect: str) -> None:
        self.started = metrics.streams_started.labels(dialect)
        self.ttfc = metrics.time_to_first_chunk.labels(dialect)
        self.duration = metrics.stream_duration.labels(dialect)
        self.chunks = metrics.chunks.labels(dialect)
        self.bytes = metrics.upstream_bytes.labels(dialect)
        self.ended: dict[str, Counter] = {}


class Upstream:
    """The process-wide upstream client: one `ClientSession`, sized for `max_active_streams`,
    and the routes (`gateway.core.routes`): which upstreams serve a model, in which order, each
    with its own circuit breaker."""

    def __init__(
        self, config: Config, url: str, metrics: Metrics | None = None, clock: Clock | None = None
    ) -> None:
        self.clock: Clock = clock if clock is not None else LoopClock()
        self.defaults = RequestDefaults(config.default_max_tokens)
        #: Turns tokens into USD where the upstream gives no cost (--prices), else None.
        self.prices: Pricer | None = config.prices
        self.part_limits = PartLimits(
            config.max_reasoning_bytes, config.max_tool_args_bytes, config.max_sources
        )
        self.config = config
        self.url = url
        self.metrics = m = metrics if metrics is not None else Metrics()
        self.table = config.routes or single_route(
            UpstreamSpec(
                name=DEFAULT_UPSTREAM,
                url=url,
                dialect=config.dialect,
                api_key=config.api_key,
                connect_timeout=config.upstream_connect_timeout,
                first_byte_timeout=config.upstream_first_byte_timeout,
                read_timeout=config.upstream_read_timeout,
                retries=config.upstream_retries,
                breaker_failures=config.breaker_failures,
                breaker_cooldown=config.breaker_cooldown,
            ),
            config.default_model,
        )
        self.routes = {
            name: Route(spec, config.upstream_retry_budget, m)
            for name, spec in self.table.upstreams.items()
        }
        self._series = {
            name: _DialectSeries(m, name) for name in {r.dialect.name for r in self.routes.values()}
        }
        self._responses = {n: m.upstream_responses.labels(f"{n}xx") for n in range(1, 6)}
        self._session: aiohttp.ClientSession | None = None
        self._connector: aiohttp.TCPConnector | None = None
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": f"llm-ws-gateway/{__version__}",
        }
        #: Upstream responses currently open (a leak check for tests and a gauge for metrics).
        self.open_responses = 0
        #: The bodies being relayed now, by stream (the read-gap watchdog looks at them; a
        #: cancel closes their connections).
        self._live: dict[Stream, _BodyFeed] = {}
        self._watchdog: Timer | None = None
        #: Push mode (aiohttp hands each piece of body over in its callback) or pull mode
        #: (public API); set from the self-test's verdict before the first stream.
        self.push = config.upstream_body != "pull"

    def plan(self, stream: Stream) -> tuple[Attempt, ...]:
        """The upstreams to try for `stream`, in order (empty: no rule serves its model)."""
        model = stream.request.model or self.table.default_model
        return self.table.plan(model) if model is not None else ()

    def count_started(self, stream: Stream) -> None:
        """Count an accepted stream, under the dialect of the first upstream it will try."""
        plan = self.plan(stream)
        if plan:
            self._series[plan[0].upstream.dialect].started.inc()

    async def start(self) -> None:
        self._connector = aiohttp.TCPConnector(
            limit=self.config.max_active_streams,
            limit_per_host=0,
        )
        # No total timeout: answers stream for minutes. No sock_read either: aiohttp would
        # cancel and re-arm a timer on every read (a TimerHandle per chunk); the longest
        # allowed silence between upstream bytes is checked by one watchdog for every stream
        # instead (_check_read_gaps). The first byte has its own deadline (_first_response).
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.config.upstream_connect_timeout,
            sock_connect=self.config.upstream_connect_timeout,
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            timeout=timeout,
            headers=self._headers,
            raise_for_status=False,
            # Never keep upstream cookies: one principal's Set-Cookie must not ride along on
            # another principal's request (and the jar costs time on every response).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        if self._watch_period() > 0:
            self._watchdog = self.clock.call_later(self._watch_period(), self._check_read_gaps)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _watch_period(self) -> float:
        """How often the watchdog looks: a stream fails between 1 and 1.25 times its
        upstream's read timeout after its last bytes (at most a second late)."""
        limits = [r.spec.read_timeout for r in self.routes.values() if r.spec.read_timeout > 0]
        return min(1.0, min(limits) / 4) if limits else 0.0

    def _check_read_gaps(self) -> None:
        """Fail every body that has been silent longer than its upstream's read timeout (not
        counting our own flow-control pauses): the relay reports `upstream_timeout`."""
        now = self.clock.now()
        late = [f for f in self._live.values() if 0 < f.read_timeout < now - f.last_read]
        for feed in late:
            feed.fail(TimeoutError(f"no upstream bytes for {feed.read_timeout:g} s"))
        self._watchdog = self.clock.call_later(self._watch_period(), self._check_read_gaps)

    def _count_parts(self, dialect: str, frames: dict[int, bytes]) -> None:
        """Part messages by kind: each frame starts `{"type":"<kind>"`."""
        kinds: dict[bytes, int] = {}
        for frame in frames.values():
            kind = frame[9 : frame.find(b'"', 9)]
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, n in kinds.items():
            self.metrics.parts_sent.labels(dialect, kind.decode()).inc(n)

    def abort(self, stream: Stream) -> None:
        """Close `stream`'s upstream connection now (a cancel): the upstream sees it before the
        relay task has even run its cancellation, which under load is a loop iteration later.
        A request still waiting for its response is closed by that cancellation."""
        feed = self._live.get(stream)
        if feed is not None:
            feed.close()
            if stream.cancelled_at is not None:
                self.metrics.cancel_latency.observe(self.clock.now() - stream.cancelled_at)
                stream.cancelled_at = None  # observed: the relay's cancellation does not again

    @property
    def live_bodies(self) -> int:
        """Upstream bodies being relayed now (a leak check for tests)."""
        return len(self._live)

    def pool_idle(self) -> int:
        """Idle keep-alive connections in the pool (each holds a file descriptor)."""
        return pool_idle(self._connector)

    async def relay(self, stream: Stream, flow_for: Callable[[Stream], FlowControl | None]) -> None:
        """Run `stream`'s upstream request to its end, reporting into the stream (and so into
        whichever socket follows it now).

        Every outcome becomes `finish_done` or `finish_fail`; only cancellation propagates.
        `flow_for(stream)` is the flow control of the socket following it now, if any.
        """
        started = self.clock.now()
        try:
            await self._relay(stream, flow_for, started)
        except UpstreamFailure as failure:
            _bare(failure)  # its traceback's frames refer back to it (raised from a local)
            extra: dict[str, int] = {}
            if failure.status is not None:
                extra["status"] = failure.status
            if failure.retry_after_ms is not None:
                extra["retry_after_ms"] = failure.retry_after_ms
            finish_fail(stream, failure.code, failure.message, failure.retryable, **extra)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug of ours, not an upstream fault: log it with its traceback, tell the client
            # `internal`, keep serving everyone else.
            log.exception("stream.bug")
            finish_fail(stream, ErrorCode.INTERNAL, "internal gateway error")
        finally:
            if stream.cancelled_at is not None:
                # Cancelled before its body was live (connecting, or waiting for the response
                # headers): the connection is closed by now, by the cancellation in _relay.
                self.metrics.cancel_latency.observe(self.clock.now() - stream.cancelled_at)

    def stream_ended(self, stream: Stream, started: float) -> None:
        """Count and log a finished stream: one canonical line per stream (called by the
        server when the relay task is over, even one cancelled before it ever ran)."""
        m = self.metrics
        # Counted under the dialect of the upstream that served it (the first it would have
        # tried, when it never reached one).
        route = self.routes.get(stream.route) if stream.route is not None else None
        if route is None:
            plan = self.plan(stream)
            route = self.routes[plan[0].upstream.name] if plan else next(iter(self.routes.values()))
        dialect = route.dialect.name
        series = self._series[dialect]
        duration = self.clock.now() - started
        series.duration.observe(duration)
        m.coalesced.inc(stream.coalesced)
        ended = series.ended.get(stream.outcome)
        if ended is None:
            ended = series.ended[stream.outcome] = m.streams_ended.labels(dialect, stream.outcome)
        ended.inc()
        series.chunks.inc(stream.chunks_in)
        if stream.part_frames:
            self._count_parts(dialect, stream.part_frames)
        series.bytes.inc(stream.bytes_in)
        content: dict[str, Any] = {}
        usage = stream.usage
        if usage is not None:  # what it used (docs/usage.md): the canonical line carries it
            content.update(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                cost=round(usage.cost, 9) if usage.cost is not None else None,
                usage_estimated=usage.estimated,
            )
        if self.config.log_content:  # opt-in only: prompts and answers are user data
            content["prompt"] = orjson.dumps(stream.request.messages).decode()[:4000]
            content["answer"] = stream.text()[:4000]
        log.info(
            "stream.end",
            stream=stream.id,
            principal=stream.principal,
            dialect=dialect,
            upstream=stream.route,
            fallbacks=stream.fallbacks,
            outcome=stream.outcome,
            chunks_in=stream.chunks_in,
            chunks_out=stream.seq,
            bytes_in=stream.bytes_in,
            duration_ms=round(duration * 1000, 1),
            **content,
        )

    async def _first_response(
        self,
        route: Route,
        url: yarl.URL,
        headers: Mapping[str, str],
        body: bytes,
        retry: bool,
        meter: Meter,
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        """POST and read the first body bytes, retrying what is safe to retry when `retry` (the
        last upstream a stream may try; before that, a failure moves it on at once).

        Returns an open 2xx response and its first bytes (b"" for an empty body). Retries connect
        failures and 429/502/503/504 with jittered backoff (retry.py); nothing has reached the
        client yet, so a retried stream still starts its seqs at 1.
        """
        assert self._session is not None, "Upstream.start() was not awaited"
        spec = route.spec
        attempt, waited = 0, 0.0
        while True:
            retry_after: float | None = None
            route.requests.inc()
            try:
                async with asyncio.timeout(spec.first_byte_timeout):
                    resp = await self._session.post(
                        url, data=body, headers=headers, timeout=route.timeout
                    )
                    status_class = resp.status // 100
                    responses = self._responses.get(status_class)
                    if responses is None:  # not 1xx..5xx: labelled as it is, as before
                        responses = self.metrics.upstream_responses.labels(f"{status_class}xx")
                    responses.inc()
                    try:
                        if 200 <= resp.status < 300:
                            meter.answered = True  # it took the request: it may bill it
                            return resp, await resp.content.readany()
                        failure = await _status_failure(resp, spec.api_key)
                    except BaseException:
                        resp.close()  # cancelled or failed before we hand it over: no leak
                        raise
                    resp.close()
                if failure.status not in RETRY_STATUSES or not retry:
                    raise failure
                if failure.retry_after_ms is not None:
                    retry_after = failure.retry_after_ms / 1000
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                failure = UpstreamFailure(
                    ErrorCode.UPSTREAM_UNAVAILABLE, "cannot reach the upstream"
                )
                if not retry:
                    raise failure from None
            except aiohttp.ClientError:
                # The connection broke before any answer (reset, bad status line): no output
                # yet, but the request may have reached the upstream, so it is not retried.
                raise UpstreamFailure(
                    ErrorCode.UPSTREAM_UNAVAILABLE, "the upstream closed the connection"
                ) from None
            except TimeoutError:
                raise UpstreamFailure(
                    ErrorCode.UPSTREAM_TIMEOUT,
                    f"no answer from the upstream within {spec.first_byte_timeout:g} s",
                ) from None
            attempt += 1
            delay = route.retry.delay(attempt, retry_after, waited, random.random())
            if delay is None:
                raise failure
            waited += delay
            self.metrics.upstream_retries.inc()
            log.info(
                "upstream.retry",
                upstream=route.name,
                attempt=attempt,
                code=failure.code.value,
                status=failure.status,
                delay_ms=round(delay * 1000),
            )
            await asyncio.sleep(delay)

    def _failure(self, error: BaseException, route: Route) -> BaseException:
        """What a body that ended badly means for the client (a bug of ours stays itself)."""
        if isinstance(error, UpstreamFailure):
            return error
        if isinstance(error, TimeoutError):
            return UpstreamFailure(
                ErrorCode.UPSTREAM_TIMEOUT,
                f"no data from the upstream for {route.spec.read_timeout:g} s",
            )
        if isinstance(error, SSEEventTooLarge):
            return UpstreamFailure(
                ErrorCode.UPSTREAM_PROTOCOL_ERROR,
                f"upstream sent an event over {MAX_EVENT_BYTES} bytes",
            )
        if isinstance(error, aiohttp.ClientError):
            return UpstreamFailure(
                ErrorCode.STREAM_INTERRUPTED,
                "the upstream connection broke off; the chunks already sent stand",
            )
        return error

    async def _relay(
        self,
        stream: Stream,
        flow_for: Callable[[Stream], FlowControl | None],
        started: float,
    ) -> None:
        """Try the stream's upstreams in order (docs/upstreams.md, "Fallback"): one out of
        rotation is skipped; a failure of the upstream's own (retryable) before the stream has
        produced anything moves it to the next, invisibly to the client. The last one it may
        try gets its retries; what it says then is the stream's outcome."""
        plan = self.plan(stream)
        if not plan:  # admission refuses these; a race with a reload would end up here
            raise UpstreamFailure(
                ErrorCode.BAD_MESSAGE, "no upstream serves this model", retryable=False
            )
        now = self.clock.now
        routes = [self.routes[attempt.upstream.name] for attempt in plan]
        failure: UpstreamFailure | None = None
        for i, (attempt, route) in enumerate(zip(plan, routes, strict=True)):
            if not route.allow(now()):
                route.fallback("breaker")
                continue
            last = not any(later.breaker.available(now()) for later in routes[i + 1 :])
            stream.route = route.name
            try:
                await self._attempt(stream, flow_for, started, route, attempt.model, last)
                return
            except UpstreamFailure as exc:
                if last or stream.produced or not exc.may_retry or not stream.active:
                    raise
                _bare(exc)
                failure = exc
            route.fallback("error")
            stream.fallbacks += 1
            log.info(
                "upstream.fallback",
                upstream=route.name,
                code=failure.code.value,
                status=failure.status,
            )
        if failure is not None:
            raise failure
        wait = min(route.breaker.retry_in(now()) for route in routes)
        raise UpstreamFailure(
            ErrorCode.UPSTREAM_UNAVAILABLE,
            "every upstream of this model is out of rotation after repeated failures",
            retryable=True,
            retry_after_ms=max(1, math.ceil(wait * 1000)),
        )

    async def _attempt(
        self,
        stream: Stream,
        flow_for: Callable[[Stream], FlowControl | None],
        started: float,
        route: Route,
        model: str,
        last: bool,
    ) -> None:
        """One upstream's try at the stream, and the breaker's verdict on it: a first token
        (or a whole answer) is a success, a retryable failure a failure; a cancel or a refusal
        of the request itself says nothing about the upstream."""
        try:
            await self._run(stream, flow_for, started, route, model, last)
        except UpstreamFailure as exc:
            if exc.may_retry:
                route.failed(self.clock.now(), exc)
            else:
                route.released(self.clock.now())
            raise
        except BaseException:
            route.released(self.clock.now())
            raise
        if stream.outcome == "cancelled" and not stream.produced:
            route.released(self.clock.now())
        else:
            route.succeeded()

    async def _run(
        self,
        stream: Stream,
        flow_for: Callable[[Stream], FlowControl | None],
        started: float,
        route: Route,
        model: str,
        retry: bool,
    ) -> None:
        request = stream.request
        dialect = route.dialect
        translator = dialect.new_translator(stream.wants, stream, self.part_limits)
        # What the stream will be charged, from this attempt; an earlier attempt that the
        # upstream took and then failed (before any token: a fallback) is carried over.
        earlier = stream.meter
        meter = stream.meter = Meter(
            translator,
            prompt_estimate(prompt_chars(request.messages), len(request.messages)),
            (model, request.model) if request.model and request.model != model else (model,),
            self.prices,
            earlier.carry() if earlier is not None else None,
        )
        spec = route.spec
        req = dialect.request(
            spec.url, model, request.messages, request.options, spec.api_key, self.defaults
        )
        url = route.url if req.url == spec.url else yarl.URL(req.url)
        headers = {**spec.headers, **req.headers} if spec.headers else req.headers
        attempt_started = self.clock.now()
        resp, data = await self._first_response(
            route, url, headers, orjson.dumps(req.body), retry, meter
        )
        self.open_responses += 1
        finished_cleanly = False
        feed: _BodyFeed | None = None
        try:
            content_type = resp.headers.get("Content-Type", "")
            if "text/event-stream" not in content_type:
                raise UpstreamFailure(
                    ErrorCode.UPSTREAM_PROTOCOL_ERROR,
                    f"upstream answered {content_type or 'no content type'}, not an event stream",
                )
            content = resp.content
            feed = _BodyFeed(
                self, stream, translator, flow_for, started, resp, route, attempt_started
            )
            self._live[stream] = feed
            # The first bytes came with the response; then each piece of body goes to the feed
            # (the hot path, see _BodyFeed.data): pushed by aiohttp as it is parsed, or pulled
            # here with aiohttp's public API (gateway/io/seams/).
            feed.data(data)
            if not feed.done.done():
                if self.push:
                    feed.attach()
                else:
                    await feed.pull()
            await feed.done
            if feed.error is not None:
                error, feed.error = feed.error, None
                try:
                    raise self._failure(error, route)
                finally:
                    del error  # this frame must not hold what its traceback holds (a cycle)
            finish_done(stream, translator.meta, translator.final_text)
            # After the last event ([DONE], `done`) the body usually has a few bytes left (the
            # chunked-encoding terminator, often in a later segment). Reading them, after the
            # client already has its `done`, lets the connection go back to the pool: without
            # this, most streams paid for a new TCP (and TLS) connection.
            finished_cleanly = feed.at_eof or (translator.finished and await _read_tail(content))
        finally:
            self.open_responses -= 1
            dropped = translator.sources_dropped
            if dropped:
                self.metrics.sources_dropped.labels(dialect.name).inc(dropped)
            if feed is not None:
                feed.detach()
                self._live.pop(stream, None)
            if finished_cleanly:
                # Returned to the pool only when the body was read to its end; aiohttp closes
                # a connection whose payload is unfinished.
                resp.release()
            else:
                resp.close()


class _BodyFeed:
    """One upstream body, relayed from aiohttp's data callbacks: SSE events -> text deltas ->
    the stream's socket; `done` resolves when the body is over, with `error` set if it ended
    badly."""

    __slots__ = (
        "_attempt_started",
        "_content",
        "_first_seen",
        "_flow_for",
        "_limit",
        "_monotonic",
        "_paused",
        "_pulling",
        "_resp",
        "_route",
        "_started",
        "_stream",
        "_translator",
        "_upstream",
        "at_eof",
        "decode_sse",
        "done",
        "error",
        "last_read",
        "read_timeout",
    )

    def __init__(
        self,
        upstream: Upstream,
        stream: Stream,
        translator: Translator,
        flow_for: Callable[[Stream], FlowControl | None],
        started: float,
        resp: aiohttp.ClientResponse,
        route: Route,
        attempt_started: float,
    ) -> None:
        self._upstream = upstream
        self._route = route
        self._attempt_started = attempt_started
        #: The longest silence allowed between body bytes (the read-gap watchdog's limit).
        self.read_timeout = route.spec.read_timeout
        self._stream = stream
        self._translator = translator
        self._flow_for = flow_for
        self._limit = upstream.config.send_buffer_bytes
        self._started = started
        self._resp = resp
        self._content = resp.content
        #: Pull mode: what the reading loop waits on while the feed is paused.
        self._pulling: asyncio.Future[None] | None = None
        self.decode_sse = SSEDecoder(MAX_EVENT_BYTES).feed
        self._monotonic = upstream.clock.now
        self._first_seen = False
        self._paused = False
        #: When body bytes last arrived (monotonic; inf while we hold the reading ourselves).
        self.last_read = self._monotonic()
        #: The body ended with a clean EOF (so the connection can be pooled as it is).
        self.at_eof = False
        #: Resolves when the body is over; `error` then says what ended it, if anything (kept
        #: out of the future, so that the relay can let go of it: see `_relay`).
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None

    def attach(self) -> None:
        """Push mode: from now on aiohttp pushes the body here; relay what it buffered."""
        content = self._content
        attach_push(content, self)
        error = content.exception()
        if error is not None:
            self.fail(error)
            return
        buffered = content.read_nowait()
        if buffered:
            self.data(buffered)
        if not self.done.done() and content.is_eof():
            self.eof()

    async def pull(self) -> None:
        """Pull mode: read the body with aiohttp's public API until it is over (or the feed
        is done). A paused feed stops reading here; aiohttp's buffer limit then stops reading
        the socket, so backpressure still reaches the upstream."""
        done = self.done
        try:
            async for data in self._content.iter_any():
                self.data(data)
                if done.done():
                    return
                while self._paused:
                    self._pulling = asyncio.get_running_loop().create_future()
                    await asyncio.wait((self._pulling, done), return_when=FIRST_COMPLETED)
                    if done.done():
                        return
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.fail(_bare(exc))  # its traceback holds this frame, and so this feed
            return
        self.eof()

    def close(self) -> None:
        """Close the connection at once (not pooled): no more bytes come, none are read."""
        self.detach()
        self._resp.close()

    def detach(self) -> None:
        detach_push(self._content)

    def data(self, data: bytes) -> None:
        """The hot path: one piece of body -> its events -> deltas into the outbox."""
        if self.done.done():
            return
        if not self._paused:
            # While we pause reading, the silence is ours (last_read stays inf), even if aiohttp
            # still delivers the rest of a read: before 3.14 it did not pause its parser.
            self.last_read = self._monotonic()
        stream, translator = self._stream, self._translator
        try:
            stream.bytes_in += len(data)
            translate_event, push_text = translator.feed, stream.push
            for event in self.decode_sse(data):
                text = translate_event(event)
                if text is not None:
                    push_text(text)
                if translator.finished:
                    break
        except (UpstreamFailure, SSEEventTooLarge) as exc:
            # Expected: drop the traceback, whose frames (and this feed, through them) would
            # hold the body, up to the 4 MiB of an oversized event, in a reference cycle.
            self.fail(_bare(exc))
            return
        except Exception as exc:  # a bug of ours: keep the traceback for the log
            self.fail(exc)
            return
        if not self._first_seen and stream.produced:
            self._first_token()
        if translator.finished or stream.state is not State.ACTIVE:
            self._finish(None)
            return
        # The stream's sink is the outbox of the socket following it (if any): over the limit,
        # that socket's flow control decides. Checked here first, as a plain attribute read.
        if stream.sink.buffered > self._limit:
            flow = self._flow_for(stream)
            if flow is not None and flow.congested():
                self._pause(flow)

    def _first_token(self) -> None:
        """The upstream's first content: time to it (from the stream's start, by dialect; from
        this attempt's, by upstream), and its breaker closes (no silent switch from here)."""
        self._first_seen = True
        now = self._monotonic()
        route = self._route
        self._upstream._series[route.dialect.name].ttfc.observe(now - self._started)
        route.ttft.observe(now - self._attempt_started)
        route.succeeded()

    def _pause(self, flow: FlowControl) -> None:
        """The socket following the stream is behind: stop reading the upstream (TCP
        backpressure reaches it) until that socket, or the one it moves to, has room."""
        if not self._paused:
            self._paused = True
            self.last_read = math.inf  # our pause, not the upstream's silence
            self._reading(False)
        flow.on_wake(self._check_flow)

    def _check_flow(self) -> None:
        if self.done.done() or not self._paused:
            return
        # Asked again after every wake: a resume may have moved the stream to another
        # socket, or its socket may be gone.
        flow = self._flow_for(self._stream)
        if flow is not None and flow.congested():
            flow.on_wake(self._check_flow)
            return
        self._resume()

    def _resume(self) -> None:
        self._paused = False
        self.last_read = self._monotonic()
        self._reading(True)

    def _reading(self, on: bool) -> None:
        """Pause or resume taking the body: the connection's reading in push mode, the
        reading loop in pull mode."""
        if self._pulling is not None:
            if on and not self._pulling.done():
                self._pulling.set_result(None)
            return
        if self._upstream.push:
            set_reading(self._resp, on)

    def eof(self) -> None:
        """A clean end of the body: the dialect judges whether the answer was complete."""
        if self.done.done():
            return
        try:
            self._translator.end_of_stream()
        except UpstreamFailure as exc:
            self.fail(_bare(exc))
            return
        except Exception as exc:  # a bug of ours
            self.fail(exc)
            return
        self.at_eof = True
        self._finish(None)

    def fail(self, exc: BaseException) -> None:
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self.done.done():
            return
        self.detach()
        self.error = exc
        self.done.set_result(None)
        if exc is not None:
            if not self._upstream.push:
                self._resp.close()  # a pull loop waiting for bytes that will not come ends
            return
        if self._paused:
            self._resume()  # the rest of the body (its terminator) is read for the pool


def _bare(exc: BaseException) -> BaseException:
    """`exc` without its traceback and chained exceptions, whose frames would tie the feed
    that caught it (and the bytes in those frames) into a reference cycle."""
    exc.__context__ = exc.__cause__ = None
    return exc.with_traceback(None)


async def _read_tail(content: aiohttp.StreamReader) -> bool:
    """Read the rest of a finished answer's body; whether it ended (within TAIL_TIMEOUT and
    TAIL_LIMIT bytes). An upstream that keeps talking after its last event is not waited for:
    its connection is closed instead of pooled."""
    if content.is_eof():
        return True
    left = TAIL_LIMIT
    try:
        async with asyncio.timeout(TAIL_TIMEOUT):
            while left > 0:
                data = await content.readany()
                if not data:
                    return True
                left -= len(data)
    except (TimeoutError, aiohttp.ClientError):
        pass
    return False


async def _status_failure(resp: aiohttp.ClientResponse, api_key: str | None) -> UpstreamFailure:
    """Describe a non-2xx answer from a bounded read of its body (JSON, HTML or text); our own
    key is never echoed back, even if the upstream quotes it."""
    status = resp.status
    try:
        body = await resp.content.read(ERROR_BODY_LIMIT)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    retry_after_ms = _retry_after_ms(resp.headers.get("Retry-After"))
    message = parse_error_body(status, resp.headers.get("Content-Type", ""), body)
    if api_key:
        message = message.replace(api_key, "[redacted]")
    return UpstreamFailure(
        ErrorCode.UPSTREAM_ERROR,
        message,
        retryable=status_retryable(status),
        status=status,
        retry_after_ms=retry_after_ms,
    )


def _retry_after_ms(value: str | None) -> int | None:
    """Retry-After in milliseconds, from delta-seconds or an HTTP date (RFC 9110, 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return int(value) * 1000
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, int((when.timestamp() - time.time()) * 1000))
