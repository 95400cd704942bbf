"""The mock upstream's server (I/O): `MockUpstream`, an aiohttp server that streams the planned
answers (or replays recorded ones, `gateway.mock.replay`), performs the faults and keeps a
`RequestRecord` of every request.

``GET /_mock/stats`` takes ``?records=0`` (counters only, cheap to poll) and ``?tag=T`` (only the
records tagged T); ``POST /_mock/reset`` clears the records and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from aiohttp import hdrs, web

from gateway.mock.answers import choose_answer, text_chunks
from gateway.mock.formats import (
    _FORMATTERS,
    DEFAULT_MODELS,
    ROUTES,
    Dialect,
    Fault,
    Step,
    StreamSpec,
    error_body,
    keepalive_comment,
    keepalive_offsets,
    plan_stream,
    validate_for_dialect,
)
from gateway.mock.formats.base import BadRequest, MockRequest, _dumps
from gateway.mock.knobs import (
    _DIRECTIVE_RE,
    BodyKind,
    DirectiveError,
    FaultKind,
    Knobs,
    Split,
    parse_directive,
)
from gateway.mock.pacer import FAST_BATCH_BYTES, _FastRender, _PacedJob, _Pacer
from gateway.mock.replay import Splitter, Transcript, TranscriptLibrary, no_library, plan_replay
from gateway.mock.script import build_parts

Outcome = Literal["completed", "client_closed", "fault", "error_status", "server_stopped", "open"]

#: Size of each write of `fault=endless` (the line of x's that never ends).
ENDLESS_WRITE_BYTES: Final = 64 * 1024


# --------------------------------------------------------------------------------------------
# Request decoding (pure)
# --------------------------------------------------------------------------------------------


def _decode_request(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _question_and_knobs(request: MockRequest) -> tuple[str, Knobs, int]:
    """(question, knobs, prompt_tokens) from the conversation; the directive is read from the
    last user turn only."""
    texts = [text for _, text in request.turns]
    user = [i for i, (role, _) in enumerate(request.turns) if role == "user"]
    question, knobs = parse_directive(texts[user[-1]]) if user else ("", Knobs())
    prompt_tokens = sum(len(_DIRECTIVE_RE.sub(" ", t).split()) for t in texts)
    return question, knobs, max(prompt_tokens, 1)


def _stream_mode(body: Mapping[str, Any], dialect: Dialect, knobs: Knobs) -> Knobs:
    """Perplexity's ``stream_mode`` request field: "concise" scripts concise mode, as the real
    API answers it (a replayed transcript is what it is)."""
    if "concise" not in _FORMATTERS[dialect].scripts or "stream_mode" not in body:
        return knobs
    mode = body["stream_mode"]
    if mode not in ("full", "concise"):
        raise BadRequest('\'stream_mode\' must be "full" or "concise"', "stream_mode")
    if mode == "concise" and knobs.transcript is None and not knobs.concise:
        return dataclasses.replace(knobs, concise=True)
    return knobs


@dataclass(frozen=True, slots=True)
class _Plan:
    """What `MockUpstream._stream` writes: the steps, the knobs that pace and cut them, the
    line ending of heartbeats and the X-Request-Id."""

    steps: Iterable[Step]
    knobs: Knobs
    eol: bytes
    request_id: str


# --------------------------------------------------------------------------------------------
# The server (I/O)
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class RequestRecord:
    """What the mock saw of one streaming request, and how it ended."""

    tag: str | None
    path: str
    body: Any
    authorization: str | None
    status: int | None = None
    chunks_sent: int = 0
    outcome: Outcome = "open"
    fault: FaultKind | None = None
    #: Body bytes handed to the transport (an endless line shows how much the client took).
    bytes_sent: int = 0
    #: `: ping` heartbeats written because of keepalive_ms.
    keepalives_sent: int = 0
    #: Whether the client went away while the handler ran (seen through handler cancellation).
    client_gone: bool = False
    #: time.monotonic_ns() when the handler finished (the benchmark joins it with the times its
    #: clients cancelled, to measure cancel-to-upstream-close).
    ended_ns: int | None = None
    #: time.monotonic_ns() when the mock's server first heard that the connection was lost
    #: (aiohttp's connection_lost, before the handler's cancellation is even scheduled): when
    #: the upstream learned of a cancel, without the mock's own task switches after it.
    closed_ns: int | None = None
    #: The client's address ("host:port"): requests that share it came over one kept-alive
    #: connection (tests check that the gateway pools its upstream connections).
    peer: str | None = None
    #: With split=: the size of each body write, in order (None otherwise).
    write_sizes: list[int] | None = None
    #: Set when the handler finished for any reason (client disconnect included).
    ended: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    #: Set when the requested fault took effect (e.g. the stall began, the reset happened).
    fault_fired: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.write_sizes is None else {"write_sizes": self.write_sizes}
        return {
            "tag": self.tag,
            "path": self.path,
            "body": self.body,
            "authorization": self.authorization,
            "status": self.status,
            "chunks_sent": self.chunks_sent,
            "outcome": self.outcome,
            "fault": self.fault,
            "bytes_sent": self.bytes_sent,
            "keepalives_sent": self.keepalives_sent,
            "ended": self.ended.is_set(),
            "ended_ns": self.ended_ns,
            "closed_ns": self.closed_ns,
            "peer": self.peer,
            **extra,
        }


def _json_response(obj: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_dumps(obj), content_type="application/json")


def _client_closed(rec: RequestRecord, exc: ConnectionResetError) -> None:
    """The gateway went away mid-answer. aiohttp keeps the exception on the request's body
    reader, and its traceback holds this handler's frames, which hold the request: a reference
    cycle per dropped request unless the traceback goes."""
    rec.outcome = "client_closed"
    exc.__traceback__ = None


class _BodyWriter:
    """Writes one stream's body: each step whole, a byte at a time (bytewise=1), or cut by
    split= across steps (each piece its own write, recorded in `write_sizes`)."""

    def __init__(self, request: web.Request, resp: web.StreamResponse, rec: RequestRecord) -> None:
        self.request = request
        self.resp = resp
        self.rec = rec
        self.splitter: Splitter | None = None

    def cut(self, split: Split | None) -> None:
        if split is not None:
            self.splitter = Splitter(split)
            self.rec.write_sizes = []

    async def write(self, data: bytes, bytewise: bool) -> None:
        if self.splitter is None:
            await MockUpstream._write(self.request, self.resp, self.rec, data, bytewise)
            return
        for piece in self.splitter.feed(data):
            await self._piece(piece)

    async def flush(self) -> None:
        """Write what split= still holds (before a wait with heartbeats, a fault, the end)."""
        if self.splitter is not None:
            rest = self.splitter.flush()
            if rest:
                await self._piece(rest)

    async def _piece(self, piece: bytes) -> None:
        assert self.rec.write_sizes is not None
        await self.resp.write(piece)
        self.rec.bytes_sent += len(piece)
        self.rec.write_sizes.append(len(piece))
        await self.request.writer.drain()
        # Yield so that each piece reaches the socket on its own (aiohttp's server sets
        # TCP_NODELAY), as bytewise=1 does for each byte.
        await asyncio.sleep(0)


class MockUpstream:
    """The fake upstream server; see `gateway.mock` for routes and `gateway.mock.knobs` for
    knobs. `transcripts_dir` is where ``transcript=NAME`` finds recorded streams (None: the knob
    is refused with a 400); it can also be set later through `transcripts`."""

    def __init__(
        self,
        default_delay_ms: float = 35.0,
        require_key: str | None = None,
        *,
        max_records: int = 10_000,
        transcripts_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.default_delay_ms = default_delay_ms
        self.require_key = require_key
        #: The recorded streams transcript= replays (NotADirectoryError if the path is none).
        self.transcripts = (
            TranscriptLibrary(transcripts_dir) if transcripts_dir is not None else None
        )
        #: Streaming requests in arrival order; only the newest `max_records` are kept, so that
        #: a long demo or load test does not grow without bound.
        self.records: list[RequestRecord] = []
        self.max_records = max_records
        self.open_requests = 0
        self._total = 0
        self._outcomes: Counter[str] = Counter()
        #: Requests seen per tag among those with `times=N` (which errors only N times).
        self._times_seen: Counter[str] = Counter()
        self.base_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        #: The record of each connection's request in flight (for `closed_ns`).
        self._in_flight: dict[object, RequestRecord] = {}
        self._stopping = False
        # Replaced on every change; waiters re-check their condition when it fires.
        self._changed = asyncio.Event()
        #: Paces every fast=1 rate=R stream with one timer.
        self._pacer = _Pacer()
        #: Knobs that replace every request's own (`force = "status=503"`): this one upstream
        #: misbehaves whatever the prompt says, as when a gateway routes one prompt to several
        #: upstreams and only one of them is down. Set and cleared by tests at any time.
        self.force: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application()
        for path, dialect in ROUTES.items():
            app.router.add_post(path, self._stream_handler(dialect))
        app.router.add_get("/_mock/stats", self._stats)
        app.router.add_post("/_mock/reset", self._reset)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 = any free port); return the base URL."""
        if self._runner is not None:
            raise RuntimeError("mock upstream already started")
        # handler_cancellation: a client disconnect cancels its handler, which is how we see it.
        runner = web.AppRunner(self.make_app(), handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        self._stamp_connection_lost(runner.server)
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.base_url = f"http://{shown}:{bound_port}"
        return self.base_url

    def _stamp_connection_lost(self, server: web.Server | None) -> None:
        """Stamp `closed_ns` on the request in flight when its connection is lost. aiohttp has
        no hook for it: its per-connection handler tells the server first thing in its own
        connection_lost, so the server's method is wrapped (on this instance only)."""
        if server is None:
            return
        lost = server.connection_lost
        in_flight = self._in_flight

        def connection_lost(handler: Any, exc: BaseException | None) -> None:
            rec = in_flight.get(handler)
            if rec is not None and rec.closed_ns is None:
                rec.closed_ns = time.monotonic_ns()
            lost(handler, exc)

        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]

    async def stop(self) -> None:
        """Cut every open stream (outcome "server_stopped") and close the listener."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        try:
            for task in list(self._handler_tasks):
                task.cancel()
            # runner.cleanup() below force-closes whatever is still left.
            with contextlib.suppress(TimeoutError):
                await self.wait_idle(timeout=5.0)
            await runner.cleanup()
        finally:
            self._stopping = False

    async def __aenter__(self) -> MockUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- observation ------------------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_until(self, predicate: Callable[[], bool], limit: float) -> None:
        async with asyncio.timeout(limit):
            while not predicate():
                await self._changed.wait()

    async def wait_idle(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (API)
        """Wait until no streaming request is open (TimeoutError otherwise)."""
        await self._wait_until(lambda: self.open_requests == 0, timeout)

    def record(self, tag: str) -> RequestRecord:
        """The most recent request tagged `tag` (KeyError if none)."""
        for rec in reversed(self.records):
            if rec.tag == tag:
                return rec
        raise KeyError(tag)

    async def wait_request(self, tag: str, timeout: float = 5.0) -> RequestRecord:  # noqa: ASYNC109
        """Wait until a request tagged `tag` has arrived; return its record."""
        await self._wait_until(lambda: any(r.tag == tag for r in self.records), timeout)
        return self.record(tag)

    def stats(self, *, records: bool = True, tag: str | None = None) -> dict[str, Any]:
        """Counters since start (or the last reset) and the retained records, as JSON.

        `records=False` leaves the records out (a poller wants the counters, and ten thousand
        records are a megabyte of JSON); `tag` keeps only the records with that tag.
        """
        stats: dict[str, Any] = {
            "open": self.open_requests,
            "total": self._total,
            "completed": self._outcomes["completed"],
            "client_closed": self._outcomes["client_closed"],
        }
        if records:
            stats["records"] = [r.to_json() for r in self.records if tag is None or r.tag == tag]
        return stats

    async def _stats(self, request: web.Request) -> web.Response:
        query = request.query
        with_records = query.get("records", "1")
        if with_records not in ("0", "1"):
            error = {"message": "records must be 0 or 1", "param": "records", "code": 400}
            return _json_response({"error": error}, status=400)
        return _json_response(self.stats(records=with_records == "1", tag=query.get("tag")))

    async def _reset(self, request: web.Request) -> web.Response:
        cleared = len(self.records)
        self.records.clear()
        self._total = 0
        self._outcomes.clear()
        self._times_seen.clear()
        self._notify()
        return _json_response({"cleared": cleared})

    # -- streaming endpoints ----------------------------------------------------------------

    def _stream_handler(
        self, dialect: Dialect
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._handle(request, dialect)

        return handler

    async def _handle(self, request: web.Request, dialect: Dialect) -> web.StreamResponse:
        raw = await request.read()
        body: dict[str, Any] | None = None
        problem: BadRequest | DirectiveError | None = None
        question, knobs, prompt_tokens = "", Knobs(), 1
        mock_request: MockRequest | None = None
        transcript: Transcript | None = None
        try:
            body = _decode_request(raw)
            mock_request = _FORMATTERS[dialect].read_request(body, request.match_info.get("model"))
            question, knobs, prompt_tokens = _question_and_knobs(mock_request)
            if self.force is not None:
                knobs = parse_directive(f"[[mock {self.force}]]")[1]
            knobs = _stream_mode(body, dialect, knobs)
            validate_for_dialect(knobs, dialect)
            if knobs.transcript is not None:
                if self.transcripts is None:
                    raise no_library(knobs.transcript)
                transcript = self.transcripts.load(knobs.transcript)
        except (BadRequest, DirectiveError) as exc:
            problem = exc
        rec = RequestRecord(
            tag=knobs.tag,
            path=request.path,
            body=body,
            authorization=request.headers.get(hdrs.AUTHORIZATION),
            fault=knobs.fault,
            peer=_peer(request),
        )
        task = asyncio.current_task()
        self._in_flight[request.protocol] = rec
        self.records.append(rec)
        if len(self.records) > self.max_records:
            del self.records[: len(self.records) - self.max_records]
        self._total += 1
        self.open_requests += 1
        if task is not None:
            self._handler_tasks.add(task)
        self._notify()
        try:
            if (
                self.require_key is not None
                and _FORMATTERS[dialect].api_key(request.headers) != self.require_key
            ):
                return await self._send_error(request, rec, 401, "html", dialect=dialect)
            if problem is not None:
                return await self._send_bad_request(request, rec, problem, dialect)
            assert mock_request is not None
            if not mock_request.stream:
                problem = BadRequest('the mock upstream only streams: set "stream": true', "stream")
                return await self._send_bad_request(request, rec, problem, dialect)
            if knobs.header_delay_ms > 0:
                await asyncio.sleep(knobs.header_delay_ms / 1000)
            if knobs.status is not None and self._error_due(knobs):
                return await self._send_error(
                    request, rec, knobs.status, knobs.body, knobs.retry_after, dialect
                )
            if transcript is not None:
                plan = _Plan(plan_replay(transcript, knobs), knobs, transcript.eol, _replay_id())
            else:
                spec = self._spec(dialect, mock_request, question, knobs, prompt_tokens)
                if knobs.fast:
                    return await self._stream_fast(request, rec, spec)
                plan = _Plan(plan_stream(spec), knobs, spec.eol, spec.request_id)
            if knobs.ignore_close:
                return await self._stream_ignoring_close(request, rec, plan)
            return await self._stream(request, rec, plan)
        except asyncio.CancelledError:
            rec.client_gone = not self._stopping
            if rec.outcome == "open":
                rec.outcome = "server_stopped" if self._stopping else "client_closed"
            raise
        except Exception:
            if rec.outcome == "open":
                rec.outcome = "error_status"
                rec.status = rec.status or 500
            raise
        finally:
            if task is not None:
                self._handler_tasks.discard(task)
            if self._in_flight.get(request.protocol) is rec:
                del self._in_flight[request.protocol]
            self.open_requests -= 1
            self._outcomes[rec.outcome] += 1
            rec.ended_ns = time.monotonic_ns()
            rec.ended.set()
            self._notify()

    def _error_due(self, knobs: Knobs) -> bool:
        """Whether this request gets its `status`: always, or with `times=N` only the first N
        requests of its tag."""
        if knobs.times is None or knobs.tag is None:
            return True
        self._times_seen[knobs.tag] += 1
        return self._times_seen[knobs.tag] <= knobs.times

    async def _stream_ignoring_close(
        self, request: web.Request, rec: RequestRecord, plan: _Plan
    ) -> web.StreamResponse:
        """`ignore_close=1`: run the stream in its own task that a disconnect does not cancel.

        aiohttp reports a disconnect by cancelling the handler; the handler then waits for the
        stream task, which notices only when a write fails. `stop()` still cancels both (the
        task is registered with the handler tasks).
        """
        task = asyncio.get_running_loop().create_task(
            self._stream(request, rec, plan), name=f"mock stream ignoring close {rec.tag}"
        )
        self._handler_tasks.add(task)
        task.add_done_callback(self._handler_tasks.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._stopping:
                task.cancel()
            else:
                rec.client_gone = True
                # Keep writing: the shielded task runs on until a write fails. Another
                # cancellation here (stop()) also reaches the task through _handler_tasks.
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if rec.outcome in ("open", "completed"):
                    rec.outcome = "client_closed"
            raise

    def _spec(
        self,
        dialect: Dialect,
        mock_request: MockRequest,
        question: str,
        knobs: Knobs,
        prompt_tokens: int,
    ) -> StreamSpec:
        answer = choose_answer(question)
        model = mock_request.model
        pieces = tuple(text_chunks(answer.text, knobs.chunks, knobs.words))
        request_id = _FORMATTERS[dialect].make_request_id(uuid.uuid4())
        return StreamSpec(
            dialect=dialect,
            model=model if model is not None else DEFAULT_MODELS[dialect],
            answer=answer,
            pieces=pieces,
            prompt_tokens=prompt_tokens,
            knobs=knobs,
            include_usage=mock_request.include_usage,
            request_id=request_id,
            created=int(time.time()),
            parts=build_parts(answer, knobs, pieces, request_id) if knobs.scripted else None,
        )

    async def _send_bad_request(
        self,
        request: web.Request,
        rec: RequestRecord,
        problem: BadRequest | DirectiveError,
        dialect: Dialect,
    ) -> web.StreamResponse:
        param = problem.key if isinstance(problem, DirectiveError) else problem.param
        error = _FORMATTERS[dialect].error_json(400, "invalid_request_error", str(problem), param)
        return await self._send(request, rec, 400, _dumps(error), "application/json")

    async def _send_error(
        self,
        request: web.Request,
        rec: RequestRecord,
        status: int,
        kind: BodyKind,
        retry_after: str | None = None,
        dialect: Dialect = "perplexity",
    ) -> web.StreamResponse:
        payload, content_type = error_body(status, kind, dialect=dialect)
        headers: dict[str, str] = {hdrs.RETRY_AFTER: retry_after} if retry_after is not None else {}
        return await self._send(request, rec, status, payload, content_type, headers)

    async def _send(
        self,
        request: web.Request,
        rec: RequestRecord,
        status: int,
        payload: bytes,
        content_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Send a whole non-stream answer inside the handler, so `ended` means "sent"."""
        resp = web.Response(status=status, body=payload, content_type=content_type, headers=headers)
        rec.status = status
        rec.outcome = "error_status"
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except ConnectionResetError as exc:
            _client_closed(rec, exc)
        return resp

    async def _stream(
        self, request: web.Request, rec: RequestRecord, plan: _Plan
    ) -> web.StreamResponse:
        knobs = plan.knobs
        delay = (knobs.delay_ms if knobs.delay_ms is not None else self.default_delay_ms) / 1000
        resp = web.StreamResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Request-Id": plan.request_id,
            },
        )
        out = _BodyWriter(request, resp, rec)
        out.cut(knobs.split)
        try:
            await resp.prepare(request)
            rec.status = 200
            paced_before = False
            for step in plan.steps:
                if isinstance(step, Fault):
                    await out.flush()
                    rec.fault_fired.set()
                    await self._perform(request, resp, rec, step, plan)
                    return resp
                if step.paced:
                    if paced_before and delay > 0:
                        if knobs.keepalive_ms is not None:
                            await out.flush()  # a heartbeat must not land inside an event
                        await self._pause(resp, rec, plan, delay)
                    elif delay == 0:
                        # write() does not suspend while the transport takes the data, so an
                        # unpaced stream to a fast reader would starve every other request.
                        await asyncio.sleep(0)
                    paced_before = True
                await out.write(step.data, knobs.bytewise)
                if step.kind == "text":
                    rec.chunks_sent += 1
                elif step.kind == "fault":
                    rec.fault_fired.set()
            await out.flush()
            if knobs.linger_ms is not None:
                await asyncio.sleep(knobs.linger_ms / 1000)
            await resp.write_eof()
            rec.outcome = "completed"
        except ConnectionResetError as exc:  # aiohttp: "Cannot write to closing transport"
            _client_closed(rec, exc)
        return resp

    async def _stream_fast(
        self, request: web.Request, rec: RequestRecord, spec: StreamSpec
    ) -> web.StreamResponse:
        """fast=1: pre-rendered events in big writes (no rate), or paced by the shared pacer
        (rate=R). A client that goes away cancels the handler, as on the slow path."""
        resp = web.StreamResponse(
            status=200,
            headers={
                hdrs.CONTENT_TYPE: "text/event-stream; charset=utf-8",
                hdrs.CACHE_CONTROL: "no-cache",
                "X-Request-Id": spec.request_id,
            },
        )
        fast = _FastRender(spec)
        try:
            await resp.prepare(request)
            rec.status = 200
            if spec.knobs.rate is None:
                await self._write_fast(resp, rec, fast, spec.pieces)
            else:
                # Headers and preamble through aiohttp; then the pacer writes chunked-encoding
                # frames to the transport itself, and write_eof() ends the body as usual.
                if fast.preamble:
                    await resp.write(fast.preamble)
                    rec.bytes_sent += len(fast.preamble)
                else:
                    # aiohttp 3.11+ holds the headers back for the first body write; before,
                    # prepare() wrote them and there is no send_headers().
                    send_headers = getattr(request.writer, "send_headers", None)
                    if send_headers is not None:
                        send_headers()
                job = _PacedJob(fast, spec.pieces, spec.knobs.rate, rec)
                try:
                    self._pacer.add(job, request.transport)
                    await job.done
                finally:
                    job.finished = True
            await resp.write_eof()
            rec.outcome = "completed"
        except ConnectionResetError as exc:
            _client_closed(rec, exc)
        return resp

    @staticmethod
    async def _write_fast(
        resp: web.StreamResponse, rec: RequestRecord, fast: _FastRender, pieces: tuple[str, ...]
    ) -> None:
        batch = [fast.preamble]
        size = len(fast.preamble)
        stamp = time.monotonic_ns()
        for piece in pieces:
            if size >= FAST_BATCH_BYTES:
                data = b"".join(batch)
                await resp.write(data)
                rec.bytes_sent += len(data)
                batch.clear()
                size = 0
                # write() does not suspend while the transport takes the data: yield, so the
                # other streams (and the pacer) get their turn.
                await asyncio.sleep(0)
                stamp = time.monotonic_ns()
            event = fast.text(piece, stamp)
            batch.append(event)
            size += len(event)
            rec.chunks_sent += 1
        batch.append(fast.finale())
        data = b"".join(batch)
        await resp.write(data)
        rec.bytes_sent += len(data)

    @staticmethod
    async def _pause(
        resp: web.StreamResponse, rec: RequestRecord, plan: _Plan, wait: float
    ) -> None:
        """Sleep `wait` seconds, sending `: ping` heartbeats meanwhile if keepalive_ms says so."""
        if plan.knobs.keepalive_ms is None:
            await asyncio.sleep(wait)
            return
        ping = keepalive_comment(plan.eol)
        elapsed = 0.0
        for offset in keepalive_offsets(wait, plan.knobs.keepalive_ms / 1000):
            await asyncio.sleep(offset - elapsed)
            elapsed = offset
            await resp.write(ping)
            rec.bytes_sent += len(ping)
            rec.keepalives_sent += 1
        await asyncio.sleep(wait - elapsed)

    async def _perform(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        rec: RequestRecord,
        fault: Fault,
        plan: _Plan,
    ) -> None:
        if fault.kind == "stall":
            # Hold the connection open until the client goes away (its handler gets cancelled,
            # or with ignore_close a heartbeat fails) or the server stops.
            keepalive_ms = plan.knobs.keepalive_ms
            if keepalive_ms is None:
                await asyncio.Event().wait()
                return
            ping = keepalive_comment(plan.eol)
            while True:
                await asyncio.sleep(keepalive_ms / 1000)
                await self._write(request, resp, rec, ping, False)
                rec.keepalives_sent += 1
        elif fault.kind == "endless":
            # One data line that never ends: "data: " then x's, 64 KiB per write, until the
            # client goes away (a failed write raises ConnectionResetError; a disconnect
            # otherwise cancels the handler). write() drains, so this is paced by the client.
            piece = b"x" * ENDLESS_WRITE_BYTES
            await self._write(request, resp, rec, b"data: ", False)
            while True:
                await self._write(request, resp, rec, piece, False)
                await asyncio.sleep(0)  # fair to other requests while the reader keeps up
        elif fault.kind == "eof":
            # A clean end without any terminal marker (chunked terminator included).
            await resp.write_eof()
            rec.outcome = "fault"
        else:  # reset
            transport = request.transport
            if transport is not None:
                # Let what was written reach the socket first: abort() drops the write buffer.
                transport.set_write_buffer_limits(high=0)
                await request.writer.drain()
                transport.abort()
            rec.outcome = "fault"

    @staticmethod
    async def _write(
        request: web.Request,
        resp: web.StreamResponse,
        rec: RequestRecord,
        data: bytes,
        bytewise: bool,
    ) -> None:
        if not bytewise:
            await resp.write(data)
            rec.bytes_sent += len(data)
            return
        view = memoryview(data)
        for i in range(len(view)):
            await resp.write(view[i : i + 1])
            rec.bytes_sent += 1
            await request.writer.drain()
            # Yield so that every byte can reach the peer on its own.
            await asyncio.sleep(0)


async def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8081,
    default_delay_ms: float = 35.0,
    *,
    on_ready: Callable[[str], None] | None = None,
    transcripts_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Run a MockUpstream until cancelled (the `python -m gateway mock-upstream` command)."""
    mock = MockUpstream(default_delay_ms=default_delay_ms, transcripts_dir=transcripts_dir)
    url = await mock.start(host, port)
    routes = " ".join(fmt.routes[0] for fmt in _FORMATTERS.values())
    replays = "" if mock.transcripts is None else f"; transcripts in {mock.transcripts.directory}"
    print(
        f"mock upstream listening on {url} (POST {routes}; GET /_mock/stats{replays})", flush=True
    )
    if on_ready is not None:
        on_ready(url)
    try:
        await asyncio.Event().wait()
    finally:
        await mock.stop()


def _replay_id() -> str:
    """The X-Request-Id of a replay (its payloads keep their recorded ids)."""
    return f"replay-{uuid.uuid4().hex[:24]}"


def _peer(request: web.Request) -> str | None:
    peername = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peername[0]}:{peername[1]}" if peername else None
