"""Usage per principal: every ended stream is charged, budgets are checked at each start, and
with `--redis-url` the totals are shared by every instance (docs/security.md, "Budgets").

The bookkeeping is `gateway.core.budget.Ledger` (pure); this shell feeds it:

- `charge(stream)` when a stream's relay is over: its settled usage goes into the ledger (and
  the usage metrics), and a sync is due;
- `admit(principal)` at each start, synchronously, from what this process knows: its own
  charges at once, the other instances' through Redis pub/sub within milliseconds, and a
  principal's window total read from Redis the first time this process sees the principal;
- the sync task sends the unsent charges in one pipeline of atomic increments and publishes the
  new totals. While Redis is unreachable, the charges stay here (still counted, so this process
  enforces budgets alone: a warning and `gateway_budget_shared 0`) and go out when it is back.
- `report(principal)` answers `GET /v1/usage`, from a fresh read of Redis when it can.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
import structlog
from redis.exceptions import RedisError

from gateway.auth import Principal
from gateway.config import Config
from gateway.core.budget import (
    Budget,
    Ledger,
    Totals,
    format_window,
    iso,
    window_start,
)
from gateway.core.clock import Clock
from gateway.core.protocol import ErrorCode
from gateway.core.session import Refused, Stream
from gateway.io.redis_store import RedisStore, honour_cancel
from gateway.metrics import Metrics

log = structlog.get_logger("gateway.usage")

#: Distinct `model` label values the usage metrics take; later models are counted as "other"
#: (a glob route passes model names the client chose: the label must stay bounded).
MODEL_LABELS: Final = 64
#: Longest wait for one exchange with Redis about usage, seconds.
REDIS_TIMEOUT: Final = 2.0
#: Pause before trying Redis again after a failure, seconds.
RETRY_EVERY: Final = 1.0
#: At most this many principals' totals are being read from Redis at once.
MAX_LOADS: Final = 256
#: The usage hashes outlive their window by this much (a late charge still lands), seconds.
KEY_SLACK: Final = 3600


def _limit(value: float | None) -> float | None:
    """0 means no limit, in the flags and in the overrides alike."""
    return value if value else None


class Accounting:
    """Every principal's usage and budget, in this process and (with Redis) across instances."""

    def __init__(
        self, config: Config, metrics: Metrics, clock: Clock, store: RedisStore | None
    ) -> None:
        self.window = config.budget_window
        self.default = Budget(config.budget_tokens or None, config.budget_cost or None)
        self.ledger = Ledger(self.window)
        self.metrics = metrics
        self.clock = clock
        self.store = store
        self._labels: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._loads: dict[str, asyncio.Task[None]] = {}
        #: The subscription to the other instances' totals (a redis PubSub), while open.
        self._pubsub: Any = None
        #: The batch of charges sent and not acknowledged yet: (its number, its charges). This
        #: instance's batches are numbered upwards, one sent at a time (redis_store.py).
        self._batch: tuple[int, list[tuple[str, int, Totals]]] | None = None
        self._sequence = 0
        self._publish_failed = False
        #: Whether Redis took our last exchange (False without Redis: per-process accounting).
        self.shared = store is not None
        #: Set after each batch of charges Redis has taken, after each update from another
        #: instance, and whenever `shared` changes (tests wait on them; nothing clears them).
        self.synced = asyncio.Event()
        self.updated = asyncio.Event()
        self.changed = asyncio.Event()
        metrics.mirror(metrics.budget_shared, lambda: int(self.shared))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self.store is None:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._sync(), name="usage sync"),
            loop.create_task(self._follow(), name="usage updates"),
        ]

    async def close(self) -> None:
        """Send what is still unsent (bounded), then stop."""
        for task in [*self._tasks, *self._loads.values()]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._loads.values(), return_exceptions=True)
        self._tasks = []
        if self.store is not None:
            if self._pubsub is not None:
                await self.store.usage_unsubscribe(self._pubsub)
                self._pubsub = None
            await self._flush()

    # ------------------------------------------------------------------ budgets

    def budget_of(self, principal: Principal) -> Budget:
        """The principal's budget: its own (tokens file, JWT claim) over the flags'."""
        budget = principal.budget.over(self.default) if principal.budget else self.default
        tokens = _limit(budget.tokens)
        return Budget(int(tokens) if tokens is not None else None, _limit(budget.cost))

    def admit(self, principal: Principal) -> Refused | None:
        """Whether `principal` may start a stream now (a budget used up: budget_exceeded)."""
        wall = self.clock.wall()
        self._load(principal.name, wall)
        budget = self.budget_of(principal)
        if not budget.limited:
            return None
        refusal = self.ledger.check(principal.name, budget, wall)
        if refusal is None:
            return None
        spent = self.ledger.spent(principal.name, wall)
        measure = "tokens" if budget.tokens and spent.total_tokens >= budget.tokens else "cost"
        self.metrics.budget_refusals.labels(measure).inc()
        log.info("budget.exceeded", principal=principal.name, measure=measure)
        return Refused(ErrorCode.BUDGET_EXCEEDED, refusal.message, refusal.retry_after_ms)

    def seen(self, principal: Principal) -> None:
        """A principal connected: read its window's total from Redis now, before its first
        start (the read is skipped when this process already has it)."""
        self._load(principal.name, self.clock.wall())

    # ------------------------------------------------------------------ charging

    def charge(self, stream: Stream) -> None:
        """A stream is over: its usage goes to its principal and to the metrics."""
        usage = stream.usage
        if usage is None:
            return  # it never reached an upstream: nothing was used
        upstream = stream.route or "none"
        meter = stream.meter
        model = self._label(meter.models[0] if meter is not None else "")
        # Its usage is settled: a stream kept for resumes holds that, not its meter.
        stream.meter = None
        m = self.metrics
        for kind, value in (
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("cached", usage.cached_tokens),
        ):
            if value:
                m.usage_tokens.labels(upstream, model, kind).inc(value)
        if usage.cost:
            m.usage_cost.labels(upstream, model).inc(usage.cost)
        m.usage_streams.labels(
            upstream,
            model,
            "true" if usage.estimated else "false",
            "true" if usage.cost is not None else "false",
        ).inc()
        if stream.principal is not None and (usage.total_tokens or usage.cost):
            self.ledger.charge(stream.principal, usage, self.clock.wall())
            if self.store is not None:
                self._wake.set()

    def _label(self, model: str) -> str:
        labels = self._labels
        if model in labels:
            return model
        if len(labels) < MODEL_LABELS and model:
            labels.add(model)
            return model
        return "other"

    # ------------------------------------------------------------------ GET /v1/usage

    async def report(self, principal: Principal) -> dict[str, Any]:
        """`GET /v1/usage`: the principal's usage in the current window and what is left."""
        wall = self.clock.wall()
        if self.store is not None:
            await self._read(principal.name, wall)
        spent = self.ledger.spent(principal.name, wall)
        budget = self.budget_of(principal)
        remaining_tokens = (
            max(0, budget.tokens - spent.total_tokens) if budget.tokens is not None else None
        )
        remaining_cost = (
            max(0.0, round(budget.cost - spent.cost, 9)) if budget.cost is not None else None
        )
        return {
            "principal": principal.name,
            "window": format_window(self.window),
            "usage": {
                "prompt_tokens": spent.prompt_tokens,
                "completion_tokens": spent.completion_tokens,
                "total_tokens": spent.total_tokens,
                "cost": round(spent.cost, 9),
            },
            "budget": {"tokens": budget.tokens, "cost": budget.cost},
            "remaining": {"tokens": remaining_tokens, "cost": remaining_cost},
            "resets_at": iso(self.ledger.resets_at(wall)),
            "shared": self.store is not None and self.shared,
        }

    # ------------------------------------------------------------------ Redis

    def _load(self, name: str, wall: float) -> None:
        """Read `name`'s window total from Redis in the background, once per window."""
        if (
            self.store is None
            or not self.shared
            or name in self._loads
            or len(self._loads) >= MAX_LOADS
            or self.ledger.loaded(name, wall)
        ):
            return
        task = asyncio.get_running_loop().create_task(self._read(name, wall), name="usage read")
        self._loads[name] = task
        task.add_done_callback(lambda _t: self._loads.pop(name, None))

    async def _read(self, name: str, wall: float) -> None:
        assert self.store is not None
        start = window_start(wall, self.window)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                p, c, t, n = await self.store.usage_read(name, start)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return
        self.ledger.absorb(name, start, Totals(p, c, t, n), wall)
        self.ledger.mark_loaded(name, wall)
        self._recovered()

    async def _sync(self) -> None:
        """Send the charges as they come (one pipeline for all that waited); after a failure,
        try again every RETRY_EVERY seconds until Redis takes them."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            flushed = await self._flush()
            honour_cancel()
            if not flushed:
                await asyncio.sleep(RETRY_EVERY)
                self._wake.set()

    async def _flush(self) -> bool:
        """Send the unsent charges, a batch at a time, until none is left; whether Redis took
        them all. A batch Redis did not acknowledge is sent again as it was (same id: counted
        once, however often it is sent), its charges counted here meanwhile."""
        while True:
            if self._batch is None:
                taken = self.ledger.take_unflushed(self.clock.wall())
                if not taken:
                    return True
                self._sequence += 1
                self._batch = (self._sequence, taken)
            if not await self._send(*self._batch):
                return False
            self._batch = None

    async def _send(self, batch: int, items: list[tuple[str, int, Totals]]) -> bool:
        assert self.store is not None
        rows = [
            (p, w, (t.prompt_tokens, t.completion_tokens, t.total_tokens, t.cost_nanos))
            for p, w, t in items
        ]
        expire_at = max(w for _, w, _ in items) + self.window + KEY_SLACK
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                totals = await self.store.usage_add(batch, rows, expire_at)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return False
        for (principal, start, sent), total in zip(items, totals, strict=True):
            self.ledger.flushed(principal, start, sent, Totals(*total))
        self._recovered()
        self.synced.set()
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.store.usage_publish(rows, totals)
        except (RedisError, OSError, TimeoutError) as exc:
            # Counted all the same; the other instances learn of it at their next read.
            if not self._publish_failed:
                self._publish_failed = True
                log.warning(
                    "usage.publish_failed",
                    error=str(exc) or type(exc).__name__,
                    hint="the Redis user needs the gw:usage channel (docs/deploy.md, ACL)",
                )
        else:
            self._publish_failed = False
        return True

    async def _follow(self) -> None:
        """The other instances' totals, as they publish them; subscribed again after a break
        (and every principal's total read again: messages may have been missed)."""
        assert self.store is not None
        while True:
            try:
                self._pubsub = await self.store.usage_subscribe()
                honour_cancel()
                self._subscribed()
                async for message in self._pubsub.listen():
                    if message.get("type") == "message":
                        self._on_update(message["data"])
            except (RedisError, OSError) as exc:
                self._failed(exc)
            honour_cancel()
            # Closed here only after its listen() is over (closing it under a listen() of
            # another task waits for that one's lock); `close()` does it after cancelling.
            pubsub, self._pubsub = self._pubsub, None
            if pubsub is not None:
                await self.store.usage_unsubscribe(pubsub)
            await asyncio.sleep(RETRY_EVERY)

    def _subscribed(self) -> None:
        self.ledger.unload_all()
        self._recovered()

    def _on_update(self, data: bytes) -> None:
        try:
            rows = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        wall = self.clock.wall()
        if not isinstance(rows, list):
            return
        for row in rows:
            if (
                isinstance(row, list)
                and len(row) == 6
                and isinstance(row[0], str)
                and all(isinstance(x, int) for x in row[1:])
            ):
                self.ledger.absorb(row[0], row[1], Totals(*row[2:]), wall)
        self.updated.set()

    def _failed(self, exc: BaseException) -> None:
        self.metrics.budget_sync_failures.inc()
        if self.shared:
            self.shared = False
            self.changed.set()
            log.warning(
                "usage.redis_unreachable",
                error=str(exc) or type(exc).__name__,
                effect="budgets are enforced by each instance alone until Redis is back; "
                "charges are kept and sent then",
            )

    def _recovered(self) -> None:
        if not self.shared:
            self.shared = True
            self.changed.set()
            log.info("usage.redis_recovered")
