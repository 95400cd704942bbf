"""The scenarios, as data: which fault, against which gateway flags, and how things must end.

Most upstream faults are one `OneStream` each (a directive for the mock upstream and the
terminal frame the client must get); client and process faults have a driver function of their
own. The runner (`tests.faults.runner`) adds what every scenario shares: a fresh gateway
process, a warm-up, the baseline, the runs, and the leak checks afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from websockets.exceptions import InvalidStatus

from tests.faults.client import TCP_CLOSE, Expect, WsClient
from tests.faults.context import QUESTION, Run
from tests.faults.procs import serve_flags

Driver = Callable[[Run], Awaitable[None]]
MIB = 1024 * 1024

#: Flags every gateway of the suite gets: timeouts short enough for a fast suite, long enough
#: that a loaded 2-core machine does not trip them by accident. Scenario flags come after
#: these and override them (argparse keeps the last occurrence).
FAST_FLAGS: tuple[str, ...] = (
    "--upstream-connect-timeout",
    "1",
    "--upstream-first-byte-timeout",
    "2",
    "--upstream-read-timeout",
    "2",
    "--upstream-retries",
    "2",
    "--upstream-retry-budget",
    "3",
    "--slow-client-timeout",
    "5",
    "--ping-interval",
    "5",
    "--ping-timeout",
    "5",
    "--idle-timeout",
    "60",
    "--drain-timeout",
    "5",
)


#: Flags passed only when the gateway has them (its CLI grows). --resume-grace 0: a dropped
#: socket's streams are cancelled at once, the behaviour the scenarios check; the scenario
#: abrupt-close-resume gives them a 1 s grace instead and checks that they are freed after it.
OPTIONAL_FLAGS: tuple[tuple[str, str], ...] = (("--resume-grace", "0"),)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One fault and what must happen; see the module docstring."""

    name: str
    group: Literal["upstream", "client", "process"]
    #: What is injected, and what the gateway must do (for the report).
    fault: str
    expect: str
    drive: Driver
    #: Runs in the short suite (`make test`) and in the full one (`make faults`).
    runs: tuple[int, int] = (2, 20)
    #: The mock route the gateway relays (its dialect); None points it at a dead port.
    route: str | None = "/perplexity"
    flags: tuple[str, ...] = ()
    #: (flag, value) pairs passed after `flags` only if `serve --help` lists the flag.
    optional: tuple[tuple[str, str], ...] = ()
    concurrency: int = 1
    #: One normal stream before the baseline is taken (opens the upstream pool, etc.).
    warmup: bool = True
    #: The driver starts (and ends) gateways itself; only the mock is checked afterwards.
    own_gateway: bool = False
    #: The client cannot see its streams end (it cut itself off): count the gateway's ends.
    gateway_side: bool = False
    #: Upstream retries the gateway must make per run (gateway_upstream_retries_total).
    retries_per_run: int | None = None
    #: A run taking longer than this is a hang.
    run_timeout: float = 20.0
    #: Allowed RSS growth over the baseline after the scenario, MiB (docs/reliability.md).
    rss_slack_mib: float = 48.0

    def run_count(self, full: bool) -> int:
        return self.runs[1] if full else self.runs[0]


# --------------------------------------------------------------------------------------------
# Upstream faults: one stream per run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OneStream:
    """Run one stream whose upstream request carries `directive` and check how it ends.

    `delivered`: the client's answer is the first that many pieces (a clean EOF). `requests`:
    how many upstream requests the mock must have seen for the stream (retries show here).
    `then="cancel"`: cancel the stream after its first chunk. `mock_bytes_below`: the mock
    must have written less than this for the stream (the gateway stopped reading).
    """

    directive: str
    expect: Expect
    delivered: int | None = None
    requests: int | None = None
    then: Literal["wait", "cancel"] = "wait"
    mock_bytes_below: int | None = None

    async def __call__(self, run: Run) -> None:
        client = await run.connect()
        tag = run.tag()
        directive = f"{self.directive} tag={tag}"
        started = time.monotonic()
        await run.stream(client, "s1", directive, self.expect, wait=False)
        run.tally.faults += 1
        if self.then == "cancel":
            await client.wait_for(lambda: client.count("s1", "text_chunk") > 0, 5)
            await client.cancel("s1")
        await run.finish(
            client, "s1", directive, self.expect, started=started, delivered=self.delivered
        )
        if self.requests is None and self.mock_bytes_below is None:
            return
        records = (await run.mock.stats(run.http, tag=tag))["records"]
        if self.requests is not None and len(records) != self.requests:
            run.tally.problem(f"the mock saw {len(records)} requests, expected {self.requests}")
        if self.mock_bytes_below is not None:
            sent = sum(int(r["bytes_sent"]) for r in records)
            if sent >= self.mock_bytes_below:
                run.tally.problem(f"the gateway read {sent} bytes of a runaway upstream")


# --------------------------------------------------------------------------------------------
# Client faults
# --------------------------------------------------------------------------------------------


async def cancel_racing_the_end(run: Run) -> None:
    """Streams of 1..3 chunks with no delay, cancelled right after the start, after `started`
    or after the first chunk: the cancel crosses the stream's own end on the wire. Exactly one
    terminal (done or cancelled) each, and no unknown_id for a cancel that lost the race."""
    client = await run.connect()
    expect = Expect(("done", "cancelled"), text="exact")
    directives: dict[str, str] = {}
    started = time.monotonic()
    for k in (1, 2, 3):
        sid = f"r{k}"
        directives[sid] = f"chunks={k} delay_ms=0 tag={run.tag()}"
        await run.stream(client, sid, directives[sid], expect, wait=False)
        timing = (run.index + k) % 3
        if timing == 1:
            await client.wait_frame(sid, ("started",), 2)
        elif timing == 2:
            await client.wait_frame(sid, ("text_chunk", "done", "error"), 2)
        await client.cancel(sid)
        run.tally.faults += 1
    await client.wait_terminals(directives, expect.within)
    # Anything the gateway answers to the cancels arrives before the pong.
    if not await client.barrier():
        run.tally.problem("no pong after the cancels")
    for sid, directive in directives.items():
        await run.finish(client, sid, directive, expect, started=started)


async def cancel_finished_and_unknown(run: Run) -> None:
    """Cancel a stream that already ended (silently ignored: it may have crossed the end) and
    an id that never ran (unknown_id, without seq, ending nothing)."""
    client = await run.connect()
    directive = f"chunks=2 tag={run.tag()}"
    frames = await run.stream(client, "f1", directive, Expect("done", text="exact"))
    unknown = f"never-{run.index}"
    await client.cancel("f1")
    await client.cancel(unknown)
    run.tally.faults += 2
    if not await client.barrier():
        run.tally.problem("no pong after the cancels")
    if frames is not None and len(client.frames["f1"]) != len(frames):
        run.tally.problem("the cancel of a finished stream was answered")
    answers = client.frames.get(unknown, [])
    if [(f.get("type"), f.get("code"), "seq" in f) for f in answers] != [
        ("error", "unknown_id", False)
    ]:
        run.tally.problem(f"cancel of an unknown id answered {answers}")


async def sixteen_started_and_cancelled(run: Run) -> None:
    """Rounds of 16 streams (the per-socket limit) started and cancelled, reusing the ids,
    alternately before and after their `started` frames."""
    client = await run.connect()
    expect = Expect("cancelled")
    sids = [f"c{i}" for i in range(16)]
    for round_ in range(4):
        since = {sid: len(client.frames.get(sid, [])) for sid in sids}
        directives = {sid: f"chunks=400 delay_ms=20 tag={run.tag()}" for sid in sids}
        started = time.monotonic()
        for sid in sids:
            await run.stream(client, sid, directives[sid], expect, wait=False)
        if round_ % 2:
            for sid in sids:
                await client.wait_frame(sid, ("started",), 5, since[sid])
        for sid in sids:
            await client.cancel(sid)
            run.tally.faults += 1
        await client.wait_terminals(sids, expect.within, since)
        for sid in sids:
            await run.finish(
                client, sid, directives[sid], expect, started=started, since=since[sid]
            )


async def abrupt_close(run: Run) -> None:
    """Two streams, then the TCP connection is aborted (RST, no close frame): right after the
    starts, after `started`, or mid-answer. Every other run's upstream ignores the close."""
    client = await run.connect()
    ignore = " ignore_close=1" if run.index % 2 else ""
    sids = ("a1", "a2")
    for sid in sids:
        prompt = f"{QUESTION} [[mock chunks=300 delay_ms=10{ignore} tag={run.tag()}]]"
        await client.start(sid, prompt)
    mode = run.index % 3
    if mode == 1:
        await client.wait_for(lambda: all(client.count(s, "started") for s in sids), 2)
    elif mode == 2:
        await client.wait_for(lambda: any(client.count(s, "text_chunk") for s in sids), 2)
    await client.abort()
    run.tally.faults += 1


#: Peak RSS a client that never reads may cost the gateway, over its baseline. The gateway
#: holds at most --send-buffer-bytes (1 MiB) of text for the socket, the websockets write
#: buffer (32 KiB), and per stream aiohttp's paused read buffer (~256 KiB) and one SSE event:
#: about 3 MiB here. 32 MiB is ten times that (allocator slack, JSON encoding copies), and far
#: below what an unbounded queue would gather: the four streams carry 64 MB of text (64 words
#: per chunk, so text dominates the SSE bytes), which the mock writes in seconds on loopback.
NEVER_READS_RSS_MIB = 32.0
#: --slow-client-timeout of the never-reads scenario.
SLOW_CLIENT_TIMEOUT = 2.0


async def never_reads(run: Run) -> None:
    """A client with a 4 KiB receive buffer starts four long /openai streams and never reads.

    Coalescing alone cannot save the gateway here: 64 MB of text is far more than the kernel's
    socket buffers (at most 4 MiB), so the writer blocks, the outbox passes --send-buffer-bytes
    and the upstream reads must pause (bounded RSS). After --slow-client-timeout of a blocked
    send the gateway starts closing with 4408 and cancels the streams; the client then reads
    again and must find the 4408 close frame behind its backlog (within --close-timeout, 3 s).
    """
    gw = run.gw
    assert run.baseline is not None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (gw.host, gw.port))
    except OSError:
        sock.close()
        raise
    client = await run.connect(sock=sock)
    at_start = await gw.metrics(run.http)
    before = at_start.get("gateway_slow_client_closes_total")
    start_rss = at_start.get("process_resident_memory_bytes")
    tags = [run.tag(f"n{i}-") for i in range(4)]
    for i, tag in enumerate(tags):
        directive = f"chunks=40000 words=64 delay_ms=0 tag={tag}"
        await client.start(f"n{i}", f"{QUESTION} [[mock {directive}]]")
    client.pause()
    paused = time.monotonic()
    run.tally.faults += 1
    peak, closing = 0.0, False
    while time.monotonic() - paused < SLOW_CLIENT_TIMEOUT + 15:
        metrics = await gw.metrics(run.http)
        peak = max(peak, metrics.get("process_resident_memory_bytes"))
        if metrics.get("gateway_slow_client_closes_total") - before >= 1:
            closing = True
            break
        await asyncio.sleep(0.1)
    # Growth during this run's stall; runs before it may have left the allocator bigger.
    growth = (peak - start_rss) / MIB
    run.tally.notes.append(
        f"peak RSS +{growth:.1f} MiB while stalled (+{(peak - run.baseline.rss) / MIB:.1f} "
        f"over the scenario baseline); 4408 after {time.monotonic() - paused:.1f} s"
    )
    if not closing:
        run.tally.problem("the gateway did not give up on the non-reading socket (4408)")
    if growth > NEVER_READS_RSS_MIB:
        run.tally.problem(f"RSS grew {growth:.1f} MiB (bound {NEVER_READS_RSS_MIB:g})")
    # The client's link recovers. Its 4 KiB receive buffer must go with the stall: the kernel
    # pads it to ~2 KiB windows against a ~2 KiB MSS, and a window a few bytes short of the MSS
    # is sent only on the persist timer, one segment per 200 ms or slower (seen in 1 of ~30
    # runs: 137 KB in 17 s of a 2.8 MB backlog). That is the kernel and that buffer, not the
    # gateway: no real client reads a megabyte backlog through 4 KiB.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    client.resume()
    resumed = time.monotonic()
    if not await client.wait_for(lambda: client.closed, 15):
        run.tally.problem("the socket did not close once the client read again")
    elif client.close_code != 4408:
        run.tally.problem(f"close code {client.close_code}, expected 4408")
    else:
        run.tally.notes.append(
            f"the 4408 arrived {time.monotonic() - resumed:.2f} s after the client read again"
        )
    sent = 0
    for tag in tags:
        sent += sum(int(r["bytes_sent"]) for r in (await run.mock.stats(run.http, tag))["records"])
    run.tally.notes.append(f"the upstream wrote {sent / MIB:.1f} MiB for the 4 streams")


async def stops_answering_pings(run: Run) -> None:
    """Two streams, then the client stops reading (so it answers no ping). The gateway must
    close the socket after --ping-interval + --ping-timeout and end its streams."""
    gw = run.gw
    client = await run.connect()
    for sid in ("p1", "p2"):
        await client.start(sid, f"{QUESTION} [[mock chunks=1000 delay_ms=50 tag={run.tag()}]]")
    await client.wait_for(lambda: client.count("p1", "text_chunk") > 0, 5)
    client.pause()
    run.tally.faults += 1
    paused = time.monotonic()
    gone = False
    while time.monotonic() - paused < 8:
        if (await gw.metrics(run.http)).get("gateway_open_sockets") == 0:
            gone = True
            break
        await asyncio.sleep(0.05)
    if not gone:
        run.tally.problem("the gateway kept a socket that answers no ping for 8 s")
    else:
        run.tally.notes.append(f"closed {time.monotonic() - paused:.1f} s after it went quiet")
        # Dropped with a reset, so the kernel keeps nothing for it (docs/reliability.md).
        if (state := client.tcp_state()) != TCP_CLOSE:
            run.tally.problem(f"dropped without a reset: the client's TCP state is {state}")
    client.resume()
    await client.wait_for(lambda: client.closed, 5)
    run.tally.notes.append(f"the client saw close code {client.close_code}")


async def idle_socket(run: Run) -> None:
    """A stream longer than --idle-timeout keeps its socket open; once it is done and the
    client stays silent, the gateway closes the socket with 1000 after the idle timeout."""
    client = await run.connect()
    directive = f"chunks=10 delay_ms=100 tag={run.tag()}"
    await run.stream(client, "i1", directive, Expect("done", text="exact"))
    done_at = time.monotonic()
    run.tally.faults += 1
    if not await client.wait_for(lambda: client.closed, 0.5 + 4):
        run.tally.problem("an idle socket stayed open")
        return
    idle = time.monotonic() - done_at
    if client.close_code != 1000:
        run.tally.problem(f"idle close code {client.close_code}, expected 1000")
    if idle < 0.4:
        run.tally.problem(f"closed {idle:.2f} s after the last stream, before the idle timeout")


# --------------------------------------------------------------------------------------------
# Process faults
# --------------------------------------------------------------------------------------------

DRAIN_TIMEOUT = 2.0


async def sigterm_with_streams_in_flight(run: Run) -> None:
    """SIGTERM with three short streams (and, every other run, one longer than the drain) in
    flight: readiness and new upgrades answer 503, a new start gets shutting_down, the short
    ones end done, the long one stream_interrupted, the socket closes 1001, the exit is 0."""
    flags = (*FAST_FLAGS, *optional_flags(), "--drain-timeout", str(DRAIN_TIMEOUT))
    gw = await run.spawn_gateway("/perplexity", flags)
    client = await run.connect(gw)
    long_one = run.index % 2 == 0
    shorts = {f"d{i}": f"chunks=8 delay_ms=60 tag={run.tag()}" for i in range(3)}
    long_directive = f"chunks=300 delay_ms=60 tag={run.tag()}"
    done = Expect("done", text="exact", within=DRAIN_TIMEOUT + 2)
    for sid, directive in shorts.items():
        await run.stream(client, sid, directive, done, wait=False)
    sids = list(shorts)
    if long_one:
        await client.start("long", f"{QUESTION} [[mock {long_directive}]]")
        sids.append("long")
    await client.wait_for(lambda: all(client.count(s, "text_chunk") for s in sids), 5)
    signalled = time.monotonic()
    gw.signal(signal.SIGTERM)
    run.tally.faults += 1

    ready: int | None = None
    while time.monotonic() - signalled < 1 and ready != 503:
        ready = await gw.get(run.http, "/readyz")
    if ready != 503:
        run.tally.problem(f"/readyz answered {ready} while draining, expected 503")
    draining = (await gw.metrics(run.http)).get("gateway_draining")
    if draining != 1:
        run.tally.problem(f"gateway_draining = {draining} while draining, expected 1")
    try:
        late = await WsClient.connect(gw.ws_url, timeout=2)
    except InvalidStatus as exc:
        if exc.response.status_code != 503:
            run.tally.problem(f"a new upgrade got HTTP {exc.response.status_code}, expected 503")
    except OSError as exc:
        run.tally.problem(f"a new upgrade failed ({exc!r}), expected HTTP 503")
    else:
        run.tally.problem("a new upgrade was accepted while draining")
        await late.close()
    await client.start("late", f"{QUESTION} [[mock chunks=2]]")
    await client.wait_for(lambda: bool(client.frames.get("late")), 2)
    if [(f.get("type"), f.get("code"), "seq" in f) for f in client.frames.get("late", [])] != [
        ("error", "shutting_down", False)
    ]:
        run.tally.problem(f"a start while draining got {client.frames.get('late')}")

    for sid, directive in shorts.items():
        await run.finish(client, sid, directive, done, started=signalled)
    if long_one:
        cut = Expect("stream_interrupted", retryable=True, text="prefix", within=DRAIN_TIMEOUT + 3)
        await run.finish(client, "long", long_directive, cut, started=signalled)
    if not await client.wait_for(lambda: client.closed, DRAIN_TIMEOUT + 5):
        run.tally.problem("the socket was not closed after the drain")
    elif client.close_code != 1001:
        run.tally.problem(f"close code {client.close_code} after the drain, expected 1001")
    code = await gw.wait(DRAIN_TIMEOUT + 10)
    took = time.monotonic() - signalled
    if code != 0:
        run.tally.problem(f"exit status {code} after SIGTERM, expected 0")
    if not long_one and took >= DRAIN_TIMEOUT:
        run.tally.problem(f"exit took {took:.1f} s though every stream ended before the timeout")
    run.tally.notes.append(f"exit after {took:.1f} s ({'with' if long_one else 'no'} long stream)")


# --------------------------------------------------------------------------------------------
# The list
# --------------------------------------------------------------------------------------------


def optional_flags(pairs: tuple[tuple[str, str], ...] = OPTIONAL_FLAGS) -> tuple[str, ...]:
    """The (flag, value) pairs that this gateway's `serve` accepts, as arguments."""
    supported = serve_flags()
    return tuple(part for flag, value in pairs if flag in supported for part in (flag, value))


def _timeouts(**values: float) -> tuple[str, ...]:
    flags: list[str] = []
    for name, value in values.items():
        flags += [f"--{name.replace('_', '-')}", f"{value:g}"]
    return tuple(flags)


NO_HTML = ("<", "html", "openresty")

SCENARIOS: tuple[Scenario, ...] = (
    # ---- upstream ----
    Scenario(
        "refused",
        "upstream",
        "connection refused (gateway pointed at a dead port)",
        "upstream_unavailable, retryable, after --upstream-retries retries",
        OneStream("chunks=3", Expect("upstream_unavailable", retryable=True, within=8)),
        route=None,
        warmup=False,
        retries_per_run=2,
        concurrency=2,
    ),
    Scenario(
        "429-then-ok",
        "upstream",
        "429 with Retry-After: 1 once, then a normal stream",
        "done with the whole answer; the client never sees the 429",
        OneStream(
            "chunks=4 status=429 retry_after=1 times=1",
            Expect("done", text="exact", within=6),
            requests=2,
        ),
        retries_per_run=1,
        concurrency=4,
    ),
    Scenario(
        "500",
        "upstream",
        "HTTP 500 with a JSON error body",
        "upstream_error status 500, not retried",
        OneStream("status=500", Expect("upstream_error", status=500), requests=1),
        retries_per_run=0,
    ),
    Scenario(
        "503-always",
        "upstream",
        "HTTP 503 on every attempt",
        "upstream_error status 503, retryable, after the retries",
        OneStream(
            "status=503",
            Expect("upstream_error", retryable=True, status=503, within=8),
            requests=3,
        ),
        retries_per_run=2,
        concurrency=4,
    ),
    Scenario(
        "html-error",
        "upstream",
        "HTTP 403 with an openresty HTML page",
        "upstream_error status 403, not retryable, no HTML in the message",
        OneStream(
            "status=403 body=html",
            Expect("upstream_error", retryable=False, status=403, message_excludes=NO_HTML),
            requests=1,
        ),
        retries_per_run=0,
    ),
    Scenario(
        "reset",
        "upstream",
        "TCP reset after 3 of 8 chunks",
        "stream_interrupted, retryable; the text sent is a prefix of the answer",
        OneStream(
            "chunks=8 delay_ms=5 fault=reset after=3",
            Expect("stream_interrupted", retryable=True, text="prefix", max_seq=3),
            requests=1,
        ),
        retries_per_run=0,
    ),
    Scenario(
        "stall-before-headers",
        "upstream",
        "no response headers for 5 s (first-byte timeout 0.5 s, read timeout 4 s)",
        "upstream_timeout from the first-byte timeout",
        OneStream("chunks=3 header_delay_ms=5000", Expect("upstream_timeout", within=2)),
        flags=_timeouts(upstream_first_byte_timeout=0.5, upstream_read_timeout=4),
        concurrency=4,
    ),
    Scenario(
        "stall-before-first-event",
        "upstream",
        "headers, then silence (first-byte timeout 0.5 s, read timeout 4 s)",
        "upstream_timeout from the first-byte timeout",
        OneStream("chunks=3 fault=stall after=0", Expect("upstream_timeout", within=2)),
        flags=_timeouts(upstream_first_byte_timeout=0.5, upstream_read_timeout=4),
        concurrency=4,
    ),
    Scenario(
        "stall-mid-stream",
        "upstream",
        "silence after 3 chunks (read timeout 0.5 s)",
        "upstream_timeout; the 3 chunks stand",
        OneStream(
            "chunks=8 fault=stall after=3",
            Expect("upstream_timeout", retryable=True, text="prefix", max_seq=3, within=2),
        ),
        flags=_timeouts(upstream_read_timeout=0.5),
        concurrency=4,
    ),
    Scenario(
        "slow-no-keepalive",
        "upstream",
        "1 s between chunks, no heartbeat (read timeout 0.6 s)",
        "upstream_timeout (the control for keepalive-comments)",
        OneStream(
            "chunks=3 delay_ms=1000",
            Expect("upstream_timeout", text="prefix", max_seq=1, within=2.5),
        ),
        flags=_timeouts(upstream_read_timeout=0.6),
        concurrency=4,
    ),
    Scenario(
        "keepalive-comments",
        "upstream",
        "1 s between chunks with `: ping` every 150 ms (read timeout 0.6 s)",
        "done: heartbeats reset the read-gap timer",
        OneStream(
            "chunks=2 delay_ms=1000 keepalive_ms=150",
            Expect("done", text="exact", within=5),
        ),
        flags=_timeouts(upstream_read_timeout=0.6),
        concurrency=4,
    ),
    Scenario(
        "malformed-json",
        "upstream",
        "an event with invalid JSON after 2 chunks",
        "upstream_protocol_error, not retryable; the 2 chunks stand",
        OneStream(
            "chunks=6 fault=malformed after=2",
            Expect("upstream_protocol_error", retryable=False, text="prefix", max_seq=2),
        ),
    ),
    Scenario(
        "giant-event",
        "upstream",
        "one 4.3 MB event (over the 4 MiB cap) after 1 chunk",
        "upstream_protocol_error",
        OneStream(
            "chunks=4 fault=giant after=1 size=4300000",
            Expect("upstream_protocol_error", retryable=False, text="prefix", max_seq=1),
        ),
    ),
    Scenario(
        "big-event-under-cap",
        "upstream",
        "one 3 MB event (under the 4 MiB cap) after 1 chunk",
        "done with the whole answer (the cap is not too eager)",
        OneStream("chunks=4 fault=giant after=1 size=3000000", Expect("done", text="exact")),
    ),
    Scenario(
        "endless-line",
        "upstream",
        "a `data: xxx...` line that never ends, after 2 chunks",
        "upstream_protocol_error; the gateway stops reading near the cap",
        OneStream(
            "chunks=6 fault=endless after=2",
            Expect("upstream_protocol_error", text="prefix", max_seq=2),
            mock_bytes_below=64 * MIB,
        ),
    ),
    Scenario(
        "eof-perplexity",
        "upstream",
        "clean EOF after 3 of 6 chunks, /perplexity",
        "done with those 3 chunks (EOF is Perplexity's end marker)",
        OneStream(
            "chunks=6 fault=eof after=3", Expect("done", text="exact"), delivered=3, requests=1
        ),
    ),
    Scenario(
        "eof-openai",
        "upstream",
        "clean EOF after 3 of 6 chunks, /openai (no finish_reason, no [DONE])",
        "stream_interrupted; the 3 chunks stand",
        OneStream(
            "chunks=6 fault=eof after=3",
            Expect("stream_interrupted", retryable=True, text="prefix", max_seq=3),
        ),
        route="/openai",
    ),
    Scenario(
        "eof-events",
        "upstream",
        "clean EOF after 3 of 6 chunks, /events (no done event)",
        "stream_interrupted; the 3 chunks stand",
        OneStream(
            "chunks=6 fault=eof after=3",
            Expect("stream_interrupted", retryable=True, text="prefix", max_seq=3),
        ),
        route="/events",
    ),
    Scenario(
        "bytewise-perplexity",
        "upstream",
        "the body delivered one byte per write, /perplexity (CRLF, fat chunks)",
        "done, text exact",
        OneStream("chunks=12 bytewise=1", Expect("done", text="exact", within=10)),
    ),
    Scenario(
        "bytewise-events",
        "upstream",
        "the whole answer one byte per write, /events (UTF-8 split mid-character)",
        "done, text exact",
        OneStream("bytewise=1", Expect("done", text="exact", within=10)),
        route="/events",
    ),
    Scenario(
        "ignore-close",
        "upstream",
        "client cancels; the upstream ignores the close and keeps writing",
        "cancelled; the gateway frees the connection anyway",
        OneStream("chunks=200 delay_ms=40 ignore_close=1", Expect("cancelled"), then="cancel"),
    ),
    # ---- client ----
    Scenario(
        "abrupt-close",
        "client",
        "TCP abort with 2 streams in flight (before/after started, mid-answer)",
        "the gateway ends every stream and closes every upstream",
        abrupt_close,
        runs=(50, 1000),
        concurrency=8,
        gateway_side=True,
    ),
    Scenario(
        "abrupt-close-resume",
        "client",
        "TCP abort with 2 streams in flight, --resume-grace 1 s (nobody resumes)",
        "the detached streams run out their grace, then everything is freed",
        abrupt_close,
        runs=(10, 100),
        concurrency=4,
        gateway_side=True,
        optional=(("--resume-grace", "1"),),
    ),
    Scenario(
        "cancel-race",
        "client",
        "cancel of 1..3-chunk streams racing their own end",
        "exactly one terminal (done or cancelled), never unknown_id",
        cancel_racing_the_end,
        runs=(20, 300),
        concurrency=4,
    ),
    Scenario(
        "cancel-finished-unknown",
        "client",
        "cancel of a finished id and of an id that never ran",
        "nothing for the finished one, unknown_id (no seq) for the other",
        cancel_finished_and_unknown,
        runs=(5, 100),
        concurrency=4,
    ),
    Scenario(
        "cancel-16-loop",
        "client",
        "4 rounds of 16 streams started and cancelled, ids reused",
        "16 cancelled per round, contiguous seqs",
        sixteen_started_and_cancelled,
        runs=(2, 25),
        concurrency=2,
    ),
    Scenario(
        "never-reads",
        "client",
        "4 KiB receive buffer, 4 long /openai streams, never reads",
        "bounded RSS (backpressure), closed with 4408 after --slow-client-timeout",
        never_reads,
        runs=(1, 3),
        route="/openai",
        flags=("--ping-interval", "0", *_timeouts(slow_client_timeout=SLOW_CLIENT_TIMEOUT)),
        gateway_side=True,
        run_timeout=40,
    ),
    Scenario(
        "no-pong",
        "client",
        "client stops reading (answers no ping), 2 streams in flight",
        "socket closed after ping interval + timeout + close timeout (0.5 + 0.5 + 1 s), "
        "streams ended",
        stops_answering_pings,
        runs=(1, 5),
        flags=_timeouts(ping_interval=0.5, ping_timeout=0.5, close_timeout=1),
        gateway_side=True,
    ),
    Scenario(
        "idle-timeout",
        "client",
        "a silent client after its stream ended (idle timeout 0.5 s)",
        "kept open while a stream runs, then closed with 1000",
        idle_socket,
        runs=(1, 5),
        flags=_timeouts(idle_timeout=0.5),
    ),
    # ---- process ----
    Scenario(
        "sigterm-drain",
        "process",
        f"SIGTERM with streams in flight (drain timeout {DRAIN_TIMEOUT:g} s)",
        "503 for /readyz and upgrades, in-flight done, longer ones stream_interrupted, "
        "close 1001, exit 0",
        sigterm_with_streams_in_flight,
        runs=(2, 6),
        own_gateway=True,
        warmup=False,
    ),
)


def by_name(names: list[str]) -> tuple[Scenario, ...]:
    """The scenarios named (all when `names` is empty); unknown names raise KeyError."""
    if not names:
        return SCENARIOS
    index = {s.name: s for s in SCENARIOS}
    return tuple(index[n] for n in names)
