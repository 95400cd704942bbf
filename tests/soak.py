"""The soak: a gateway under a realistic mix of traffic for minutes or hours, its memory sampled,
with a verdict (`make soak`, docs/reliability.md "Memory").

One gateway process (uvloop, Redis for resume mirroring) in front of the mock upstream process,
and in this process a load of about 105 concurrent streams on 43 sockets, 33 starts a second:
normal answers, cancels, abrupt TCP drops then a resume on a new socket, slow readers with
megabytes queued, upstream faults (429, 503, resets, stalls) and sockets sending hostile frames.
Every stream's frames are checked (contiguous seqs, one terminal, the exact text of a `done`).

Every `--interval` seconds the gateway's resident memory, open fds, asyncio tasks, open upstream
responses, retained resume bytes and Redis keys go to a CSV. Phases: a warm-up (not judged), the
measured load, then idle until everything is back. The verdict:

- RSS slope over the measured load (least squares), per hour, is under `--max-slope` (5%) of
  the warm RSS, allowing for what the run's length can resolve: the slope's own standard error,
  three times (a short run cannot tell 5%/h from noise; a leak of the kind this catches is
  hundreds of per cent per hour and has a small error);
- idle again, fds, tasks, sockets, streams, upstream responses, retained bytes and Redis keys are
  back at their idle baseline, and RSS is within 10% of the warm RSS;
- no protocol violation, no stream without its terminal, no unexpected outcome.

Exit status 0 when all hold, 1 otherwise (the CSV and the gateway's logs stay in the work dir).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import functools
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.faults.procs import GatewayProcess, MockProcess, http_session
from tests.support import expected_text as _expected_text

REDIS_URL = os.environ.get("SOAK_REDIS_URL", "redis://127.0.0.1:6379/11")
COLUMNS = (
    "t",
    "phase",
    "rss_bytes",
    "open_fds",
    "tasks",
    "open_sockets",
    "active_streams",
    "upstream_open",
    "upstream_pool_idle",
    "retained_bytes",
    "retained_streams",
    "redis_keys",
    "usage_keys",
    "streams_done",
    "gc_gen2_collections",
    "heap_blocks",
    "redis_connections",
    "tombstones",
)
#: What goes back to the idle baseline exactly once the load stops (RSS is judged apart).
SETTLES = ("tasks", "open_sockets", "active_streams", "upstream_open", "retained_bytes")


@functools.lru_cache(maxsize=4096)
def expected_text(prompt: str) -> str:
    return _expected_text(prompt)


def spawn(coro: Coroutine[Any, Any, None], name: str = "soak") -> asyncio.Task[None]:
    """A named task; its creator keeps it and awaits or cancels it."""
    return asyncio.get_running_loop().create_task(coro, name=name)


def terminal(frame: dict[str, Any]) -> bool:
    kind = frame.get("type")
    return kind in ("done", "cancelled") or (kind == "error" and "seq" in frame)


@dataclass
class Tally:
    """What the load saw: outcomes by kind, and every violation (kept to a bounded sample)."""

    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    hostile: int = 0

    def violation(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 50:
            self.violations.append(text)


class Socket:
    """One client socket with several streams in flight; frames go to per-stream queues that are
    dropped when the stream ends (the harness must not grow either)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.queues: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}
        #: Set whenever no stream runs on this socket.
        self.idle = asyncio.Event()
        self.reader = asyncio.get_running_loop().create_task(self._read(), name="soak reader")

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> Socket:
        ws = await connect(
            url, max_size=1 << 24, ping_interval=None, compression=None, open_timeout=10, **kwargs
        )
        welcome = orjson.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = orjson.loads(raw)
                queue = self.queues.get(frame.get("id"))
                if queue is not None:
                    queue.put_nowait(frame)
        except ConnectionClosed:
            pass
        finally:
            for queue in self.queues.values():
                queue.put_nowait(None)

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(obj).decode())

    def stream(self, sid: str) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.queues[sid] = queue
        self.idle.clear()
        return queue

    def done(self, sid: str) -> None:
        self.queues.pop(sid, None)
        if not self.queues:
            self.idle.set()

    async def close(self, abort: bool = False) -> None:
        if abort:
            self.ws.transport.abort()
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
            self.ws.transport.abort()
        await asyncio.wait([self.reader], timeout=5)
        self.reader.cancel()


#: The mix: (kind, weight). Faults are the mock's knobs (tests/faults and gateway/mock/knobs.py).
MIX = (
    ("normal", 55),
    ("cancel", 10),
    ("drop_resume", 8),
    ("slow", 2),
    ("status_429", 5),
    ("status_503", 5),
    ("reset", 6),
    ("stall", 4),
    ("long", 5),
)
#: Outcomes each kind may end with (terminal frame type, or error code).
ALLOWED = {
    "normal": {"done"},
    "long": {"done"},
    "slow": {"done"},
    "cancel": {"cancelled", "done"},
    "drop_resume": {"done"},
    "status_429": {"upstream_error"},
    "status_503": {"upstream_error"},
    "reset": {"stream_interrupted"},
    "stall": {"upstream_timeout"},
}
WORDS = ("sky", "ocean", "coffee", "tides", "metrics", "glaciers", "volcano", "honey")


def prompt_for(kind: str, rng: random.Random) -> str:
    word = rng.choice(WORDS)
    pace = f"chunks={rng.randint(20, 40)} delay_ms={rng.randint(70, 110)}"
    knobs = {
        "normal": pace,
        "cancel": pace,
        "drop_resume": pace,
        "long": f"chunks={rng.randint(80, 120)} delay_ms=30",
        "slow": "chunks=400 words=25",
        "status_429": "status=429",
        "status_503": "status=503",
        "reset": f"{pace} fault=reset after={rng.randint(1, 10)}",
        "stall": f"{pace} fault=stall after={rng.randint(1, 5)}",
    }[kind]
    return f"{word} [[mock {knobs}]]"


async def run_stream(
    url: str, sock: Socket, sid: str, kind: str, rng: random.Random, tally: Tally
) -> None:
    """Start one stream of `kind` on `sock`, drive it to its end, check what arrived."""
    prompt = prompt_for(kind, rng)
    queue = sock.stream(sid)
    frames: list[dict[str, Any]] = []
    try:
        await sock.send({"type": "start", "id": sid, "prompt": prompt})
        cancel_after = rng.randint(1, 8) if kind == "cancel" else None
        drop_after = rng.randint(2, 8) if kind == "drop_resume" else None
        chunks = 0
        async with asyncio.timeout(120):
            while True:
                frame = await queue.get()
                if frame is None:
                    tally.violation(f"{kind} {sid}: socket closed before the terminal")
                    return
                frames.append(frame)
                chunks += frame["type"] == "text_chunk"
                if cancel_after is not None and chunks >= cancel_after:
                    cancel_after = None
                    await sock.send({"type": "cancel", "id": sid})
                if drop_after is not None and chunks >= drop_after:
                    frames = await drop_and_resume(url, frames, sid, tally)
                    break
                if terminal(frame):
                    break
    except TimeoutError:
        tally.violation(f"{kind} {sid}: no terminal in 120 s")
        return
    except (ConnectionClosed, OSError, InvalidHandshake) as exc:
        tally.violation(f"{kind} {sid}: {exc!r}")
        return
    finally:
        sock.done(sid)
    if frames:
        check(kind, sid, prompt, frames, tally)


async def drop_and_resume(
    url: str, frames: list[dict[str, Any]], sid: str, tally: Tally
) -> list[dict[str, Any]]:
    """Lose this stream's socket (its own, so the others are not disturbed), then resume on a
    new one with the last seq seen; return every frame of the stream, both sockets together."""
    started = frames[0]
    last = max(f["seq"] for f in frames if f["type"] == "text_chunk")
    fresh = await Socket.open(url)
    try:
        queue = fresh.stream(sid)
        await fresh.send(
            {"type": "resume", "id": sid, "resume_token": started["resume_token"], "after": last}
        )
        async with asyncio.timeout(120):
            while True:
                frame = await queue.get()
                if frame is None:
                    tally.violation(f"resume {sid}: socket closed")
                    return frames
                if frame["type"] == "resumed":
                    continue
                frames.append(frame)
                if terminal(frame) or frame["type"] == "error":
                    return frames
    finally:
        await fresh.close()


def check(kind: str, sid: str, prompt: str, frames: list[dict[str, Any]], tally: Tally) -> None:
    """Protocol v1 for one stream: started first, one terminal last, seqs 1..n, exact text."""
    if frames[0]["type"] != "started":
        tally.violation(f"{kind} {sid}: first frame {frames[0]}")
        return
    end = frames[-1]
    outcome = end["type"] if end["type"] != "error" else end.get("code", "?")
    tally.outcomes[f"{kind}:{outcome}"] += 1
    if outcome not in ALLOWED[kind]:
        tally.violation(f"{kind} {sid}: ended {outcome}: {str(end)[:200]}")
    if sum(1 for f in frames if terminal(f)) != 1:
        tally.violation(f"{kind} {sid}: {sum(1 for f in frames if terminal(f))} terminals")
    seqs = [f["seq"] for f in frames if f["type"] == "text_chunk"]
    if seqs != list(range(1, len(seqs) + 1)):
        tally.violation(f"{kind} {sid}: seqs not contiguous")
    text = "".join(f["text"] for f in frames if f["type"] == "text_chunk")
    if end["type"] == "done":
        if end["text"] != text or text != expected_text(prompt):
            tally.violation(f"{kind} {sid}: text mismatch")
    elif not expected_text(prompt).startswith(text):
        tally.violation(f"{kind} {sid}: text is not a prefix of the answer")


async def socket_worker(
    url: str, index: int, stop: asyncio.Event, rate: float, tally: Tally
) -> None:
    """One client socket: starts streams at `rate` per second (Poisson), several in flight;
    `slow` streams get a socket of their own that stops reading for a while."""
    rng = random.Random(index)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    n = 0
    tasks: set[asyncio.Task[None]] = set()
    sock = await Socket.open(url)
    # Apps reconnect now and then (network changes, app restarts): a socket serves 20 to 60
    # streams, then new streams go to a new one and the old one closes once they are done. So
    # what a socket keeps for its life (its recent ids, up to 256) reaches a steady state.
    lifetime = rng.randint(20, 60)
    try:
        while not stop.is_set():
            if n >= lifetime:
                lifetime = n + rng.randint(20, 60)
                task = spawn(retire(sock), "soak retire")
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sock = await Socket.open(url)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.expovariate(rate))
            if stop.is_set():
                break
            if sock.reader.done():  # closed under us (must not happen): count and reconnect
                tally.violation(f"socket {index} closed: {sock.ws.close_code}")
                try:
                    sock = await Socket.open(url)
                except (OSError, TimeoutError, InvalidHandshake) as exc:
                    tally.violation(f"socket {index} reconnect: {exc!r}")
                    break
            kind = rng.choices(kinds, weights)[0]
            n += 1
            sid = f"w{index}-{n}"
            if kind == "slow":
                task = spawn(slow_reader(url, sid, rng, tally), name="soak slow")
            elif len(sock.queues) >= 14:  # under --max-streams: skip a beat
                continue
            else:
                task = spawn(run_stream(url, sock, sid, kind, rng, tally), name=sid)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=150)
    finally:
        for task in tasks:
            task.cancel()
        await sock.close()


async def retire(sock: Socket) -> None:
    """Close a socket once the streams it still runs are done."""
    if sock.queues and not sock.reader.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sock.idle.wait(), 150)
    await sock.close()


async def slow_reader(url: str, sid: str, rng: random.Random, tally: Tally) -> None:
    """A client on a bad link: stops reading until megabytes wait for it (the gateway pauses
    the upstream), then reads everything."""
    try:
        sock = await Socket.open(url, max_queue=4)
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        tally.violation(f"slow {sid}: {exc!r}")
        return
    try:
        sock.ws.transport.pause_reading()
        asyncio.get_running_loop().call_later(
            rng.uniform(1.0, 3.0), sock.ws.transport.resume_reading
        )
        await run_stream(url, sock, sid, "slow", rng, tally)
    finally:
        await sock.close()


#: Bad frames, each sent on a new socket after its handshake, and what the gateway must do:
#: close the socket, or answer with an `error` frame and keep it open.
HOSTILE = (
    (b"\x8f\x80\0\0\0\0", "close"),  # a reserved opcode
    (b"\x81\x05hello", "close"),  # unmasked
    (b"\x81\x82\0\0\0\0\xff\xfe", "close"),  # invalid UTF-8
    (b"\x81\xff" + (1 << 40).to_bytes(8, "big") + b"\0\0\0\0", "close"),  # 1 TiB announced
    (b"\x01\x82\0\0\0\0{}\x81\x82\0\0\0\0{}", "close"),  # a frame inside a fragmented one
    (b"\x81\x89\0\0\0\0{bad json", "error"),  # not JSON
    (b"\x81\x8a\0\0\0\0[1,2,3,4]]", "error"),  # not an object
)


async def hostile_worker(port: int, stop: asyncio.Event, tally: Tally) -> None:
    """A socket that sends a bad frame every few seconds (each a new connection)."""
    rng = random.Random(7)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(2, 6))
        if stop.is_set():
            return
        frame, expect = rng.choice(HOSTILE)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            received = b""
            async with asyncio.timeout(10):
                await reader.readuntil(b"\r\n\r\n")  # the 101, then the bad frame
                writer.write(frame)
                while data := await reader.read(65536):
                    received += data
                    if expect == "error" and b'"type":"error"' in received:
                        break
            writer.close()
            tally.hostile += 1
            if expect == "error" and b'"type":"error"' not in received:
                tally.violation(f"hostile {frame[:12]!r}: no error frame")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            tally.violation(f"hostile {frame[:12]!r} ({expect}): {exc!r}")


async def sample(
    gateway: GatewayProcess, http: Any, redis: Any, t0: float, phase: str
) -> dict[str, Any]:
    for attempt in range(3):  # a scrape that times out under load is tried again
        try:
            m = await gateway.metrics(http)
            break
        except (TimeoutError, OSError):
            if attempt == 2:
                raise
    row = {
        "t": round(time.monotonic() - t0, 1),
        "phase": phase,
        "rss_bytes": m.get("process_resident_memory_bytes"),
        "open_fds": m.get("process_open_fds"),
        "tasks": m.get("gateway_asyncio_tasks"),
        "open_sockets": m.get("gateway_open_sockets"),
        "active_streams": m.get("gateway_active_streams"),
        "upstream_open": m.get("gateway_upstream_open_responses"),
        "upstream_pool_idle": m.get("gateway_upstream_pool_idle"),
        "retained_bytes": m.get("gateway_resume_retained_bytes"),
        "retained_streams": m.get("gateway_resume_retained_streams"),
        # The usage hashes (gw:u:{window}:{principal}) are one per principal and budget window
        # by design, kept an hour past their window: judged apart (`usage_keys`).
        "redis_keys": await redis.dbsize() - (usage_keys := await count_usage_keys(redis)),
        "usage_keys": usage_keys,
        "streams_done": m.get("gateway_streams_ended_total"),
        "gc_gen2_collections": m.get("python_gc_collections_total", generation="2"),
        "heap_blocks": m.get("gateway_python_heap_blocks"),
        "redis_connections": redis_connections(gateway.pid, REDIS_PORT),
        "tombstones": m.get("gateway_resume_tombstones"),
    }
    return row


async def count_usage_keys(redis: Any) -> int:
    return sum([1 async for _ in redis.scan_iter(match="gw:u:*", count=1000)])


REDIS_PORT = int(REDIS_URL.rsplit(":", 1)[1].split("/")[0])


def redis_connections(pid: int, port: int) -> int:
    """How many of the process's sockets are connected to `port` (its Redis connection pool,
    which may grow under load and keep what it grew: not a leak)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[9] in inodes:
                    count += 1
    return count


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of y over x, and its standard error."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    residual = sum((y - a - b * x) ** 2 for x, y in points)
    se = math.sqrt(residual / (n - 2) / sxx) if n > 2 else math.inf
    return b, se


@dataclass
class Verdict:
    ok: bool
    lines: list[str]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """A small SVG of resident memory (MiB) and retained resume memory over the run, with the
    phases shaded: enough to see a slope by eye (docs/reliability.md)."""
    width, height, left, bottom = 640, 240, 48, 28
    t_max = max(r["t"] for r in rows) or 1.0
    top_mib = max(r["rss_bytes"] for r in rows) / 2**20 * 1.15

    def x(t: float) -> float:
        return left + (width - left - 10) * t / t_max

    def y(mib: float) -> float:
        return height - bottom - (height - bottom - 10) * mib / top_mib

    def line(key: str, color: str) -> str:
        points = " ".join(f"{x(r['t']):.1f},{y(r[key] / 2**20):.1f}" for r in rows)
        return f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for phase, shade in (("warmup", "#f3f3f3"), ("idle", "#eef5ff")):
        ts = [r["t"] for r in rows if r["phase"] == phase]
        if ts:
            parts.append(
                f'<rect x="{x(min(ts)):.1f}" y="10" width="{x(max(ts)) - x(min(ts)):.1f}" '
                f'height="{height - bottom - 10}" fill="{shade}"/>'
            )
    for step in range(5):
        mib = top_mib * step / 4
        parts.append(f'<text x="4" y="{y(mib) + 4:.1f}">{mib:.0f}</text>')
        parts.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y(mib):.1f}" y2="{y(mib):.1f}" '
            'stroke="#ddd"/>'
        )
    for step in range(5):
        minutes = t_max * step / 4 / 60
        parts.append(
            f'<text x="{x(t_max * step / 4) - 8:.1f}" y="{height - 10}">{minutes:.0f} min</text>'
        )
    parts.append(line("rss_bytes", "#c0392b"))
    parts.append(line("retained_bytes", "#2471a3"))
    parts.append(
        f'<text x="{left + 6}" y="22" fill="#c0392b">resident memory (MiB)</text>'
        f'<text x="{left + 160}" y="22" fill="#2471a3">retained for resume (MiB)</text>'
        f'<text x="{left + 330}" y="22" fill="#888">shaded: warm-up, idle</text>'
    )
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def own_fds(row: dict[str, Any]) -> float:
    return float(row["open_fds"]) - float(row["redis_connections"])


def judge(
    rows: list[dict[str, Any]],
    baseline: dict[str, Any],
    tally: Tally,
    max_slope: float,
    rss_minutes: float = 30.0,
) -> Verdict:
    lines: list[str] = []
    ok = True
    load = [r for r in rows if r["phase"] == "load"]
    warm = [r for r in rows if r["phase"] == "warmup"]
    warm_rss = warm[-1]["rss_bytes"] if warm else load[0]["rss_bytes"]
    per_hour, se = slope([(r["t"] / 3600, r["rss_bytes"]) for r in load])
    allowed = max_slope * warm_rss
    minutes = (load[-1]["t"] - load[0]["t"]) / 60
    lines.append(
        f"RSS: warm {warm_rss / 2**20:.1f} MiB, slope over the load {per_hour / 2**20:+.1f} MiB/h "
        f"({100 * per_hour / warm_rss:+.1f}%/h, standard error {se / 2**20:.1f} MiB/h); "
        f"bound {100 * max_slope:.0f}%/h = {allowed / 2**20:.1f} MiB/h (+3 SE)"
        + ("" if minutes >= rss_minutes else f", judged from {rss_minutes:g} minutes of load")
    )
    # A young process's resident memory climbs for its first half hour or so while the C
    # allocator's heap reaches its working size (fragmentation, not objects), so a short run
    # judges the Python heap, which only objects move; a long one judges both.
    if minutes >= rss_minutes and per_hour > allowed + 3 * se:
        ok = False
        lines.append("FAIL: resident memory grows under sustained load")
    warm_blocks = warm[-1]["heap_blocks"] if warm else load[0]["heap_blocks"]
    blocks_per_hour, blocks_se = slope([(r["t"] / 3600, r["heap_blocks"]) for r in load])
    lines.append(
        f"Python heap: {warm_blocks:.0f} blocks warm, slope {blocks_per_hour:+.0f}/h "
        f"({100 * blocks_per_hour / warm_blocks:+.1f}%/h, standard error "
        f"{100 * blocks_se / warm_blocks:.1f}%/h); bound {100 * max_slope:.0f}%/h (+3 SE)"
    )
    if blocks_per_hour > max_slope * warm_blocks + 3 * blocks_se:
        ok = False
        lines.append("FAIL: the Python heap grows under sustained load (objects are kept)")
    idle = rows[-1]
    for key in SETTLES:
        if idle[key] != baseline[key]:
            ok = False
            lines.append(f"FAIL: idle {key} = {idle[key]}, baseline {baseline[key]}")
    # Open fds, less the Redis pool's connections (it keeps what it grew to under load).
    if own_fds(idle) > own_fds(baseline):
        ok = False
        lines.append(f"FAIL: idle open fds {idle['open_fds']}, baseline {baseline['open_fds']}")
    blocks = [r["heap_blocks"] for r in load]
    if idle["heap_blocks"] > 1.10 * sum(blocks) / len(blocks):
        ok = False
        lines.append(
            f"FAIL: idle Python heap {idle['heap_blocks']:.0f} blocks, over the load's mean +10%"
        )
    # Every soak socket is one principal (ip:127.0.0.1): one usage hash per window it spans.
    if idle["usage_keys"] > 2:
        ok = False
        lines.append(f"FAIL: {idle['usage_keys']} usage hashes for one principal")
    if idle["redis_keys"] > baseline["redis_keys"]:
        ok = False
        lines.append(
            f"FAIL: idle Redis keys {idle['redis_keys']}, baseline {baseline['redis_keys']}"
        )
    peak = max(r["rss_bytes"] for r in load)
    if idle["rss_bytes"] > 1.10 * max(warm_rss, peak):
        ok = False
        lines.append(f"FAIL: idle RSS {idle['rss_bytes'] / 2**20:.1f} MiB over the load's +10%")
    lines.append(
        f"idle: RSS {idle['rss_bytes'] / 2**20:.1f} MiB (load peak {peak / 2**20:.1f}), "
        f"fds {idle['open_fds']:.0f} of which Redis {idle['redis_connections']} (baseline "
        f"{baseline['open_fds']:.0f}, {baseline['redis_connections']}), tasks {idle['tasks']:.0f} "
        f"(baseline {baseline['tasks']:.0f}), Redis keys {idle['redis_keys']}, Python heap "
        f"{idle['heap_blocks']:.0f} blocks (baseline {baseline['heap_blocks']:.0f}, load mean "
        f"{sum(blocks) / len(blocks):.0f})"
    )
    total = sum(tally.outcomes.values())
    lines.append(
        f"streams checked: {total}; hostile sockets: {tally.hostile}; "
        f"violations: {tally.violation_count}"
    )
    lines.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items())))
    if tally.violation_count:
        ok = False
        lines.extend(f"  violation: {v}" for v in tally.violations[:20])
    if total == 0:
        ok = False
        lines.append("FAIL: no stream ran")
    return Verdict(ok, lines)


async def soak(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    csv_path = Path(args.csv) if args.csv else workdir / "soak.csv"
    redis = aioredis.Redis.from_url(REDIS_URL)
    await redis.flushdb()
    mock = MockProcess.start(workdir)
    flags = [
        "--redis-url", REDIS_URL,
        "--resume-grace", "3",
        # The fault mix fails a fifth of the streams on purpose, far above what the circuit
        # breaker is for (tests/e2e/test_routing.py tests it): five failures in a row would take
        # the only upstream out of rotation for 30 s and fail the healthy streams meanwhile.
        "--breaker-failures", "1000",
        "--resume-retention", str(args.retention),
        "--resume-tombstones", str(args.tombstones),
        "--slow-client-timeout", "20",
        "--upstream-read-timeout", "1.5",
        "--upstream-first-byte-timeout", "5",
        "--upstream-retries", "1",
        "--upstream-retry-budget", "1",
        "--max-streams", "16",
        "--idle-timeout", "0",
    ]  # fmt: skip
    gateway = await GatewayProcess.start("gateway", mock.url("/perplexity"), flags, workdir)
    rows: list[dict[str, Any]] = []
    tally = Tally()
    minutes = args.minutes
    warmup = args.warmup if args.warmup is not None else min(10.0, max(1.0, minutes / 4))
    t0 = time.monotonic()
    try:
        async with http_session() as http:
            baseline = await sample(gateway, http, redis, t0, "baseline")
            rows.append(baseline)
            stop = asyncio.Event()
            workers = [
                spawn(socket_worker(gateway.ws_url, i, stop, args.rate / args.sockets, tally))
                for i in range(args.sockets)
            ]
            workers.append(spawn(hostile_worker(gateway.port, stop, tally)))
            end = t0 + minutes * 60
            warm_end = t0 + warmup * 60
            with csv_path.open("w", newline="") as out:
                writer = csv.DictWriter(out, COLUMNS)
                writer.writeheader()
                writer.writerow(baseline)
                while time.monotonic() < end:
                    await asyncio.sleep(args.interval)  # the sampling period, not a synchronisation
                    # Warm until the bounded structures are full too: tombstones fill at the
                    # rate streams are forgotten, and their filling is not growth.
                    row = await sample(gateway, http, redis, t0, "warmup")
                    if rows[-1]["phase"] == "load" or (
                        time.monotonic() >= warm_end and row["tombstones"] >= args.tombstones
                    ):
                        row["phase"] = "load"
                    rows.append(row)
                    writer.writerow(row)
                    out.flush()
                    if not gateway.alive():
                        print("FAIL: the gateway died", file=sys.stderr)
                        return 1
                stop.set()
                await asyncio.gather(*workers)
                # Idle: everything must come back (retention and grace expire, the upstream
                # pool's keep-alive connections close), within retention + a minute.
                idle_end = time.monotonic() + args.retention + 60
                while True:
                    await asyncio.sleep(args.interval)
                    row = await sample(gateway, http, redis, t0, "idle")
                    rows.append(row)
                    writer.writerow(row)
                    out.flush()
                    settled = all(row[k] == baseline[k] for k in SETTLES) and (
                        own_fds(row) <= own_fds(baseline)
                        and row["redis_keys"] <= baseline["redis_keys"]
                    )
                    if settled or time.monotonic() > idle_end:
                        break
            final = await gateway.metrics(http)
        verdict = judge(rows, baseline, tally, args.max_slope, args.rss_minutes)
        collections = final.get("gateway_gc_full_collection_seconds_count")
        if collections:
            paused = final.get("gateway_gc_full_collection_seconds_sum")
            verdict.lines.append(
                f"periodic full collections: {collections:.0f}, "
                f"{1000 * paused / collections:.1f} ms each on average"
            )
    finally:
        await gateway.stop()
        mock.stop()
        await redis.flushdb()
        await redis.aclose()
    print(
        f"soak: {minutes:g} min ({warmup:g} warm-up), {args.sockets} sockets, "
        f"{args.rate:g} starts/s"
    )
    for line in verdict.lines:
        print(line)
    if args.plot:
        plot(rows, Path(args.plot))
    print(f"CSV: {csv_path}; logs: {workdir}")
    print("soak: PASS" if verdict.ok else "soak: FAIL")
    return 0 if verdict.ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", 5)))
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="minutes not judged (default: a quarter, 1 to 10)",
    )
    parser.add_argument("--rate", type=float, default=33.0, help="stream starts per second")
    parser.add_argument("--sockets", type=int, default=43)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--retention", type=float, default=30.0, help="--resume-retention of the gateway"
    )
    parser.add_argument(
        "--max-slope", type=float, default=0.05, help="RSS growth allowed per hour, of the warm RSS"
    )
    parser.add_argument(
        "--tombstones",
        type=int,
        default=1000,
        help="the gateway's --resume-tombstones (the warm-up lasts until they are all in use)",
    )
    parser.add_argument(
        "--rss-minutes",
        type=float,
        default=30.0,
        help="minutes of measured load from which the RSS slope is judged too (shorter runs "
        "judge the Python heap's slope only)",
    )
    parser.add_argument("--csv", default=None, help="where the samples go (default: work dir)")
    parser.add_argument("--plot", default=None, help="also draw RSS over time to this SVG")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    try:
        import uvloop

        sys.exit(uvloop.run(soak(args)))
    except ImportError:
        sys.exit(asyncio.run(soak(args)))


if __name__ == "__main__":
    main()
