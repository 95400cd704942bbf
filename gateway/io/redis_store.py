"""Resume across instances on Redis: the owner mirrors each stream's output, any instance can
replay it and follow it live, and a `cancel` sent anywhere reaches the owner.

The only module that imports redis. Keys (docs/deploy.md, "Redis"):

- `gw:s:{token}`  a Redis Stream: one entry per text_chunk (`s` seq, `x` text) and a final one
  (`e` the terminal frame, with the stream id as `__ID__`), capped with MAXLEN, expiring
  --resume-retention seconds after the end;
- `gw:m:{token}`  a hash: `p` principal, `o` owning instance;
- `gw:l:{token}`  the owner's lease (PX 5000), renewed every 1.5 s while the stream runs: a
  follower that sees neither new entries nor the lease knows the owner died, and ends the
  stream with `stream_interrupted` after what was retained (never a hang);
- `gw:ctl:{instance}` a pub/sub channel: `cancel <token>`, `moved <token>`, `dropped <token>`,
  subscribed again after Redis went away;
- `gw:u:{window}:{principal}` a hash: what a principal used in one budget window (`p` prompt and
  `c` completion tokens, `t` their total, `n` nano-USD), incremented atomically by every
  instance, expiring an hour after the window ends (gateway/io/accounting.py);
  each hash also holds, per instance, the number of its last batch applied there (`b:{id}`), so
  that a batch sent again after its answer was lost is not counted twice;
- `gw:usage` a pub/sub channel: after each batch of increments, the new totals, so that every
  instance's view of a principal's spend follows the others' within milliseconds.

Writes are batched by one writer task per process (one pipeline per loop iteration), so the
per-chunk cost on the owner is a list append; if Redis is down, streaming goes on and only
cross-instance resume is lost (logged). Redis unreachable at start-up is a misconfiguration
(StartupError): the gateway refuses to start rather than run without the resume it was told to
offer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from gateway.config import StartupError, redact_password
from gateway.core.session import Stream

log = structlog.get_logger("gateway.redis")

LEASE_MS: Final = 5000
RENEW_EVERY: Final = 1.5
#: Pause before subscribing to the control channel again after Redis went away, seconds.
RESUBSCRIBE_EVERY: Final = 1.0
#: Entries kept per stream (chunk frames); older ones are trimmed (then resume_unavailable).
MAX_ENTRIES: Final = 20_000
#: How long start-up waits for Redis to answer (and each later connect attempt), seconds.
CONNECT_TIMEOUT: Final = 3.0
#: The usage hash's fields: prompt, completion and total tokens, nano-USD.
USAGE_FIELDS: Final = ("p", "c", "t", "n")
USAGE_CHANNEL: Final = "gw:usage"
#: Adds a batch of usage at most once: KEYS are one hash per principal and window; ARGV is this
#: instance's batch field (`b:{instance}`), the batch's number (each instance numbers its
#: batches upwards and sends one at a time), the hashes' expiry, then four counts per hash. A
#: hash that already has this batch (or a later one) of this instance is left alone, so a
#: batch sent again after its answer was lost counts once. Returns every hash's four totals.
USAGE_SCRIPT: Final = """
local out = {}
local batch = tonumber(ARGV[2])
for i = 1, #KEYS do
  local at = 4 + (i - 1) * 4
  local last = tonumber(redis.call('HGET', KEYS[i], ARGV[1])) or 0
  if batch > last then
    redis.call('HINCRBY', KEYS[i], 'p', ARGV[at])
    redis.call('HINCRBY', KEYS[i], 'c', ARGV[at + 1])
    redis.call('HINCRBY', KEYS[i], 't', ARGV[at + 2])
    redis.call('HINCRBY', KEYS[i], 'n', ARGV[at + 3])
    redis.call('HSET', KEYS[i], ARGV[1], batch)
    redis.call('EXPIREAT', KEYS[i], ARGV[3])
  end
  local totals = redis.call('HMGET', KEYS[i], 'p', 'c', 't', 'n')
  for j = 1, 4 do
    out[#out + 1] = tonumber(totals[j]) or 0
  end
end
return out
"""


def honour_cancel() -> None:
    """Raise the cancel redis-py may have swallowed: one that lands while it connects or reads
    can come out as a connection error, or not at all, leaving a task that never ends."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisStore:
    """This process's view of the shared store."""

    def __init__(self, url: str, retention: float) -> None:
        self.redis: Any = aioredis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
        self.url = redact_password(url)
        self.instance = secrets.token_hex(6)
        self.retention = retention
        self._ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._wake = asyncio.Event()
        self._leases: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._pubsub: Any = None
        #: Control handlers set by the server: cancel / moved / dropped, by token.
        self.on_control: Callable[[str, str], None] | None = None
        self.healthy = True
        #: Whether the control channel is subscribed now, and whether it was lost since
        #: (tests wait on them).
        self.subscribed = asyncio.Event()
        self.unsubscribed = asyncio.Event()
        self._usage_script: Any = self.redis.register_script(USAGE_SCRIPT)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect and subscribe, or StartupError (close() then releases what was opened)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self.redis.ping()
                self._pubsub = self.redis.pubsub()
                await self._pubsub.subscribe(self.channel(self.instance))
                self.subscribed.set()
        except (RedisError, OSError, TimeoutError) as exc:
            reason = str(exc).rstrip(".") or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {CONNECT_TIMEOUT:g} s"
            raise StartupError(
                f"--redis-url {self.url}: cannot connect ({reason}); start Redis there or fix "
                "the URL"
            ) from None
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._writer(), name="redis writer"),
            loop.create_task(self._renew(), name="redis lease renewal"),
            loop.create_task(self._listen(), name="redis control"),
        ]

    async def close(self) -> None:
        await self._flush()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._leases:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(*(f"gw:l:{t}" for t in self._leases))
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        await self.redis.aclose()

    @staticmethod
    def channel(instance: str) -> str:
        return f"gw:ctl:{instance}"

    # ------------------------------------------------------------------ usage (accounting.py)

    async def usage_add(
        self,
        batch: int,
        items: list[tuple[str, int, tuple[int, int, int, int]]],
        expire_at: int,
    ) -> list[tuple[int, int, int, int]]:
        """Add each (principal, window, (prompt, completion, total, nanos)) to its window's
        hash, atomically and at most once per `batch` (this instance's batches are numbered
        upwards and sent one at a time: one sent again after its answer was lost is not counted
        twice); returns each window's totals. Raises RedisError or OSError."""
        keys = [f"gw:u:{window}:{principal}" for principal, window, _ in items]
        args: list[int | str] = [f"b:{self.instance}", batch, expire_at]
        for _, _, counts in items:
            args.extend(counts)
        flat: list[Any] = await self._usage_script(keys=keys, args=args)
        return [
            (int(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]

    async def usage_publish(
        self,
        items: list[tuple[str, int, tuple[int, int, int, int]]],
        totals: list[tuple[int, int, int, int]],
    ) -> None:
        """Tell the other instances the new totals (`gw:usage`). Raises RedisError or
        OSError."""
        message = orjson.dumps([[p, w, *t] for (p, w, _), t in zip(items, totals, strict=True)])
        await self.redis.publish(USAGE_CHANNEL, message)

    async def usage_read(self, principal: str, window: int) -> tuple[int, int, int, int]:
        """A principal's totals for one window (zeros when it used nothing there)."""
        values: Any = await self.redis.hmget(f"gw:u:{window}:{principal}", *USAGE_FIELDS)
        p, c, t, n = (int(v) if v is not None else 0 for v in values)
        return p, c, t, n

    async def usage_subscribe(self) -> Any:
        """A new subscription to `gw:usage` (a redis PubSub: `listen()` yields its messages;
        `usage_unsubscribe` closes it once nothing listens). Raises RedisError or OSError."""
        pubsub: Any = self.redis.pubsub()
        try:
            await pubsub.subscribe(USAGE_CHANNEL)
        except BaseException:
            await self.usage_unsubscribe(pubsub)
            raise
        return pubsub

    @staticmethod
    async def usage_unsubscribe(pubsub: Any) -> None:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()

    # ------------------------------------------------------------------ owner side (sync API)

    def _queue(self, op: str, *args: Any, **kwargs: Any) -> None:
        self._ops.append((op, args, kwargs))
        self._wake.set()

    def register(self, stream: Stream) -> None:
        """A stream started here: mirror its output from now on."""
        token = stream.resume_token
        if token is None:
            return
        self._queue(
            "hset", f"gw:m:{token}", mapping={"p": stream.principal or "", "o": self.instance}
        )
        self._queue("set", f"gw:l:{token}", self.instance, px=LEASE_MS)
        self._leases.add(token)
        stream.on_chunk = self._chunk
        stream.on_part = self._part
        stream.on_terminal = self._terminal

    def _chunk(self, stream: Stream, seq: int, text: str) -> None:
        self._queue(
            "xadd",
            f"gw:s:{stream.resume_token}",
            {"s": seq, "x": text},
            maxlen=MAX_ENTRIES,
            approximate=True,
        )

    def _part(self, stream: Stream, seq: int, template: bytes) -> None:
        """A part message (reasoning, sources, tool call, progress), its id the placeholder."""
        self._queue(
            "xadd",
            f"gw:s:{stream.resume_token}",
            {"s": seq, "p": template},
            maxlen=MAX_ENTRIES,
            approximate=True,
        )

    def _terminal(self, stream: Stream, frame: bytes) -> None:
        token = stream.resume_token
        self._queue("xadd", f"gw:s:{token}", {"e": frame}, maxlen=MAX_ENTRIES, approximate=True)
        for key in (f"gw:s:{token}", f"gw:m:{token}"):
            self._queue("expire", key, max(1, int(self.retention)))
        self._queue("delete", f"gw:l:{token}")
        self._leases.discard(str(token))

    def stream_gone(self, stream: Stream) -> None:
        """A stream ended without a terminal anyone can replay (cancelled, abandoned)."""
        token = stream.resume_token
        if token is None:
            return
        self._leases.discard(token)
        self._queue("delete", f"gw:l:{token}", f"gw:s:{token}", f"gw:m:{token}")

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        ops, self._ops = self._ops, []
        if not ops:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for op, args, kwargs in ops:
                    getattr(pipe, op)(*args, **kwargs)
                await pipe.execute()
            if not self.healthy:
                log.info("redis.recovered")
            self.healthy = True
        except (RedisError, OSError) as exc:
            if self.healthy:
                log.error("redis.write_failed", error=str(exc), dropped=len(ops))
            self.healthy = False

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY)
            for token in list(self._leases):
                self._queue("set", f"gw:l:{token}", self.instance, px=LEASE_MS)

    async def _listen(self) -> None:
        """This instance's control channel, subscribed again after Redis went away (past
        redis-py's own retries its listen() ends with an error: without this, cancels and
        moves sent from other instances would never reach this one again)."""
        while True:
            try:
                if self._pubsub is None:
                    pubsub = self.redis.pubsub()
                    self._pubsub = pubsub
                    await pubsub.subscribe(self.channel(self.instance))
                    honour_cancel()
                    log.info("redis.control_resubscribed")
                self.unsubscribed.clear()
                self.subscribed.set()
                async for message in self._pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        verb, token = message["data"].decode().split(" ", 1)
                    except (ValueError, UnicodeDecodeError):
                        continue
                    if self.on_control is not None:
                        self.on_control(verb, token)
            except (RedisError, OSError) as exc:
                log.warning("redis.control_lost", error=str(exc) or type(exc).__name__)
            honour_cancel()
            self.subscribed.clear()
            self.unsubscribed.set()
            # Closed only once its listen() is over (see accounting.py's subscription).
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is not None:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_EVERY)

    # ------------------------------------------------------------------ follower side

    async def lookup(self, token: str) -> dict[str, str] | None:
        """The stream's metadata (principal `p`, owner `o`), or None when unknown/expired."""
        meta: Any = await self.redis.hgetall(f"gw:m:{token}")
        if not meta:
            return None
        return {k.decode(): v.decode() for k, v in meta.items()}

    async def send_control(self, owner: str, verb: str, token: str) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.publish(self.channel(owner), f"{verb} {token}")

    async def follow(
        self,
        token: str,
        after: int,
        on_chunk: Callable[[int, str | bytes], None],
        on_terminal: Callable[[bytes], None],
        on_lost: Callable[[str], None],
        replayed: Callable[[int], Awaitable[bool]],
        pace: Callable[[], Awaitable[None]],
    ) -> None:
        """Replay entries with seq > `after`, then follow live until the terminal entry.

        `replayed(first_seq)` is awaited once with the first retained seq (0 if none) before
        anything is delivered; it returns False to stop (the retained output no longer reaches
        back to `after`). `on_lost` is called when the owner's lease is gone without a terminal.
        """
        key = f"gw:s:{token}"
        entries: Any = await self.redis.xrange(key, "-", "+")
        first = int(entries[0][1][b"s"]) if entries and b"s" in entries[0][1] else 0
        if not await replayed(first):
            return
        last_id = b"0-0"
        for entry_id, fields in entries:
            last_id = entry_id
            if self._deliver(fields, after, on_chunk, on_terminal):
                return
        while True:
            answer: Any = await self.redis.xread({key: last_id}, block=1000, count=500)
            if not answer:
                if not await self.redis.exists(f"gw:l:{token}"):
                    # One more look: the terminal may have landed just before the lease went.
                    tail: Any = await self.redis.xrange(key, f"({last_id.decode()}", "+")
                    for entry_id, fields in tail:
                        last_id = entry_id
                        if self._deliver(fields, after, on_chunk, on_terminal):
                            return
                    on_lost("the instance serving this stream went away")
                    return
                continue
            for entry_id, fields in answer[0][1]:
                last_id = entry_id
                if self._deliver(fields, after, on_chunk, on_terminal):
                    return
            await pace()  # backpressure: the following socket may be behind

    @staticmethod
    def _deliver(
        fields: dict[bytes, bytes],
        after: int,
        on_chunk: Callable[[int, str | bytes], None],
        on_terminal: Callable[[bytes], None],
    ) -> bool:
        if b"e" in fields:
            on_terminal(fields[b"e"])
            return True
        seq = int(fields[b"s"])
        if seq > after:
            # A text chunk's text, or a part's whole frame (bytes, its id the placeholder).
            part = fields.get(b"p")
            on_chunk(seq, fields[b"x"].decode() if part is None else part)
        return False
