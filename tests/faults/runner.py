"""Run scenarios against real processes and check, after each, that nothing leaked or hung.

Per scenario: start a gateway with the scenario's flags, run one warm-up stream, take the
baseline (asyncio tasks, open fds net of idle pooled upstream connections, RSS, counters), run
the scenario's runs (a run exceeding its timeout is a hang), then poll the gateway's /metrics
and the mock's /_mock/stats every 50 ms, for a bounded time, until:

* the mock has no open request (every upstream connection the gateway made is closed);
* gateway_active_streams, gateway_upstream_open_responses and gateway_open_sockets are 0;
* every stream the gateway started has ended (started_total == ended_total deltas);
* gateway_asyncio_tasks is back at (or under) the baseline;
* process_open_fds <= baseline + gateway_upstream_pool_idle (kept-alive connections may stay);

and then RSS <= baseline + the scenario's slack. Whatever still fails at the deadline is a leak.
Finally the gateway gets SIGTERM and must exit 0, and its log must hold no error line.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.faults.client import WsClient
from tests.faults.context import QUESTION, Baseline, Run, Tally
from tests.faults.procs import (
    GatewayProcess,
    Metrics,
    MockProcess,
    PendingGateway,
    ProcessError,
    dead_port,
    http_session,
)
from tests.faults.scenarios import FAST_FLAGS, Scenario, optional_flags

MIB = 1024 * 1024
#: How long the leak conditions may take to hold after the last run (closing handshakes,
#: an upstream that ignores the close and notices only at its next write, ...).
SETTLE_SECONDS = 6.0
POLL_SECONDS = 0.05
STARTED = "gateway_streams_started_total"
ENDED = "gateway_streams_ended_total"
RETRIES = "gateway_upstream_retries_total"
COUNTERS = (STARTED, ENDED, RETRIES, "gateway_slow_client_closes_total")
REQUIRED = (
    "gateway_open_sockets",
    "gateway_active_streams",
    "gateway_upstream_open_responses",
    "gateway_asyncio_tasks",
    "gateway_upstream_pool_idle",
    "process_open_fds",
    "process_resident_memory_bytes",
    STARTED,
    ENDED,
)


@dataclass
class ScenarioResult:
    """A scenario's tally, how long it took, where its logs are, and its RSS growth."""

    scenario: Scenario
    tally: Tally
    seconds: float
    workdir: Path
    rss_growth_mib: float = math.nan

    @property
    def ok(self) -> bool:
        t = self.tally
        return not t.problems and not t.leaks and t.hangs == 0 and t.terminal_ok == t.streams

    def report(self) -> str:
        """Everything that went wrong, for an assertion message or the console."""
        t = self.tally
        lines = [f"{self.scenario.name}: {'ok' if self.ok else 'FAILED'}"]
        lines += [f"  problem (x{n}): {p}" for p, n in t.problems.most_common(10)]
        if len(t.problems) > 10:
            lines.append(f"  ... and {len(t.problems) - 10} other problems")
        lines += [f"  leak: {leak}" for leak in t.leaks]
        lines += [f"  note: {note}" for note in dict.fromkeys(t.notes)]
        if not self.ok:
            lines.append(f"  logs: {self.workdir}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Baseline and leak checks
# --------------------------------------------------------------------------------------------


def _quiet(m: Metrics) -> bool:
    return (
        m.get("gateway_active_streams") == 0
        and m.get("gateway_open_sockets") == 0
        and m.get("gateway_upstream_open_responses") == 0
    )


async def take_baseline(gw: GatewayProcess, http: aiohttp.ClientSession) -> Baseline:
    """Wait (bounded) for the gateway to be quiet, then take the max of three samples."""
    deadline = time.monotonic() + 3
    # Another process's state: polling its /metrics is the only way to watch it.
    while time.monotonic() < deadline and not _quiet(await gw.metrics(http)):  # noqa: ASYNC110
        await asyncio.sleep(POLL_SECONDS)
    samples: list[Metrics] = []
    for _ in range(3):
        samples.append(await gw.metrics(http))
        await asyncio.sleep(0.03)
    return Baseline(
        tasks=max(m.get("gateway_asyncio_tasks") for m in samples),
        fds=max(m.get("process_open_fds") - m.get("gateway_upstream_pool_idle") for m in samples),
        rss=max(m.get("process_resident_memory_bytes") for m in samples),
        counters={name: samples[-1].get(name) for name in COUNTERS},
    )


async def leak_state(
    gw: GatewayProcess | None,
    mock: MockProcess,
    http: aiohttp.ClientSession,
    baseline: Baseline | None,
) -> tuple[list[str], Metrics | None]:
    """The leak conditions that do not hold right now (and the scrape they were judged on)."""
    issues: list[str] = []
    stats = await mock.stats(http)
    if stats["open"] != 0:
        issues.append(f"{stats['open']} upstream requests still open at the mock")
    if gw is None:
        return issues, None
    if not gw.alive():
        return [*issues, f"the gateway died (exit status {gw.exit_code})"], None
    m = await gw.metrics(http)
    missing = [name for name in REQUIRED if not m.has(name)]
    if missing or baseline is None:
        return [*issues, f"metrics missing: {', '.join(missing)}"], m
    for gauge in ("gateway_active_streams", "gateway_upstream_open_responses"):
        if m.get(gauge) != 0:
            issues.append(f"{gauge} = {m.get(gauge):g}")
    if m.get("gateway_open_sockets") != 0:
        issues.append(f"gateway_open_sockets = {m.get('gateway_open_sockets'):g}")
    started = m.get(STARTED) - baseline.counters[STARTED]
    ended = m.get(ENDED) - baseline.counters[ENDED]
    if started != ended:
        issues.append(f"{started:g} streams started but {ended:g} ended")
    if m.get("gateway_asyncio_tasks") > baseline.tasks:
        issues.append(f"asyncio tasks {m.get('gateway_asyncio_tasks'):g} > {baseline.tasks:g}")
    idle = m.get("gateway_upstream_pool_idle")
    if m.get("process_open_fds") > baseline.fds + idle:
        issues.append(
            f"open fds {m.get('process_open_fds'):g} > baseline {baseline.fds:g}"
            f" + {idle:g} idle pooled"
        )
    return issues, m


async def settle(
    gw: GatewayProcess | None,
    mock: MockProcess,
    http: aiohttp.ClientSession,
    baseline: Baseline | None,
    limit: float = SETTLE_SECONDS,
) -> tuple[list[str], Metrics | None]:
    """Poll `leak_state` every 50 ms until it is clean or `limit` seconds have passed."""
    deadline = time.monotonic() + limit
    while True:
        issues, m = await leak_state(gw, mock, http, baseline)
        if not issues or time.monotonic() >= deadline:
            return issues, m
        await asyncio.sleep(POLL_SECONDS)


# --------------------------------------------------------------------------------------------
# One scenario
# --------------------------------------------------------------------------------------------


class Launcher:
    """Starts scenarios' gateways ahead of time (`prefetch`), so that a gateway's start-up
    (~0.7 s, most of a short scenario) overlaps the scenario before it. Each scenario still
    gets a fresh process of its own."""

    def __init__(self, mock: MockProcess, workdir: Path) -> None:
        self.mock = mock
        self.workdir = workdir
        self._pending: dict[str, PendingGateway] = {}

    def _spawn(self, sc: Scenario) -> PendingGateway:
        upstream = (
            self.mock.url(sc.route)
            if sc.route is not None
            else f"http://127.0.0.1:{dead_port()}/perplexity"
        )
        flags = (*FAST_FLAGS, *optional_flags(), *sc.flags, *optional_flags(sc.optional))
        return GatewayProcess.spawn(f"gw-{sc.name}", upstream, flags, self.workdir / sc.name)

    def prefetch(self, sc: Scenario | None) -> None:
        if sc is not None and not sc.own_gateway and sc.name not in self._pending:
            self._pending[sc.name] = self._spawn(sc)

    async def take(self, sc: Scenario) -> GatewayProcess:
        pending = self._pending.pop(sc.name, None) or self._spawn(sc)
        return await pending.ready()

    def close(self) -> None:
        """Kill the gateways prefetched for scenarios that did not run."""
        for pending in self._pending.values():
            pending.discard()
        self._pending.clear()


async def warm_up(gw: GatewayProcess, tally: Tally) -> None:
    """One normal stream, so that lazily created state (the upstream pool) is in the baseline."""
    try:
        client = await WsClient.connect(gw.ws_url)
    except (OSError, TimeoutError) as exc:
        tally.problem(f"warm-up connect failed: {exc!r}")
        return
    try:
        await client.start("warm", f"{QUESTION} [[mock chunks=2]]")
        await client.wait_terminals(["warm"], 5)
        end = client.terminal("warm")
        if end is None or end.get("type") != "done":
            tally.problem(f"warm-up stream ended {end}")
    finally:
        await client.close()


def log_problems(gw: GatewayProcess) -> list[str]:
    """Error-level lines (and anything that is not a JSON log line) in the gateway's log."""
    found: list[str] = []
    for event in gw.events():
        if event.get("event") == "raw":
            found.append(f"gateway stderr: {str(event['raw'])[:120]}")
        elif event.get("level") in ("error", "critical", "exception") or (
            event.get("event") == "stream.bug"
        ):
            found.append(f"gateway logged {event.get('level')}: {event.get('event')}")
    return found


async def _one_run(sc: Scenario, run: Run, gate: asyncio.Semaphore) -> None:
    async with gate:
        try:
            async with asyncio.timeout(sc.run_timeout) as deadline:
                await sc.drive(run)
        except TimeoutError as exc:
            if deadline.expired():
                run.tally.hangs += 1
                run.tally.problem(f"run not finished after {sc.run_timeout:g} s")
            else:
                run.tally.problem(f"run raised TimeoutError: {exc}")
        except Exception as exc:
            run.tally.problem(f"run raised {type(exc).__name__}: {exc}")
        finally:
            await run.close_clients()
            for spawned in run.spawned:
                if spawned.alive():
                    _, killed = await spawned.stop(5)
                    if killed:
                        run.tally.problem("a gateway needed SIGKILL")
                for line in log_problems(spawned):
                    run.tally.problem(line)
            run.tally.runs += 1


async def run_scenario(
    sc: Scenario,
    mock: MockProcess,
    *,
    full: bool,
    workdir: Path,
    launcher: Launcher | None = None,
) -> ScenarioResult:
    """Run every run of `sc` against a fresh gateway and check for leaks and hangs.

    Never raises for a misbehaving gateway: a gateway that does not start, dies or stops
    answering /metrics fails the scenario with that as its problem.
    """
    began = time.monotonic()
    result = ScenarioResult(sc, Tally(), 0.0, workdir / sc.name)
    own_launcher = launcher is None
    launcher = launcher or Launcher(mock, workdir)
    async with http_session() as http:
        gw: GatewayProcess | None = None
        try:
            if not sc.own_gateway:
                gw = await launcher.take(sc)
            await _exercise(sc, gw, mock, http, result, full=full)
        except (ProcessError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            result.tally.problem(f"scenario aborted: {type(exc).__name__}: {exc}")
        finally:
            if own_launcher:
                launcher.close()
            if gw is not None:
                code, killed = await gw.stop(15)
                if killed or code != 0:
                    result.tally.problem(f"gateway exit status {code} after SIGTERM")
                for line in log_problems(gw):
                    result.tally.problem(line)
    result.seconds = time.monotonic() - began
    return result


async def _exercise(
    sc: Scenario,
    gw: GatewayProcess | None,
    mock: MockProcess,
    http: aiohttp.ClientSession,
    result: ScenarioResult,
    *,
    full: bool,
) -> None:
    """Warm-up, baseline, the runs, then the leak checks (see the module docstring)."""
    tally = result.tally
    baseline: Baseline | None = None
    if gw is not None:
        if sc.warmup:
            await warm_up(gw, tally)
        baseline = await take_baseline(gw, http)
    gate = asyncio.Semaphore(sc.concurrency)
    async with asyncio.TaskGroup() as group:
        for i in range(sc.run_count(full)):
            run = Run(sc.name, i, full, mock, http, gw, tally, result.workdir, baseline)
            group.create_task(_one_run(sc, run, gate), name=f"{sc.name} run {i}")
    issues, m = await settle(gw, mock, http, baseline)
    tally.leaks.extend(issues)
    if gw is None or m is None or baseline is None:
        return
    _check_counters(sc, tally, m, baseline, full)
    result.rss_growth_mib = (m.get("process_resident_memory_bytes") - baseline.rss) / MIB
    if result.rss_growth_mib > sc.rss_slack_mib:
        tally.leaks.append(f"RSS grew {result.rss_growth_mib:.1f} MiB (bound {sc.rss_slack_mib:g})")


def _check_counters(sc: Scenario, tally: Tally, m: Metrics, base: Baseline, full: bool) -> None:
    runs = sc.run_count(full)
    started = m.get(STARTED) - base.counters[STARTED]
    ended = m.get(ENDED) - base.counters[ENDED]
    if sc.gateway_side:
        # The client cut itself off: the gateway's own count is the terminal check.
        tally.streams += int(started)
        tally.terminal_ok += int(min(started, ended))
    if sc.retries_per_run is not None:
        retries = m.get(RETRIES) - base.counters[RETRIES]
        if retries != sc.retries_per_run * runs:
            tally.problem(
                f"{retries:g} upstream retries, expected {sc.retries_per_run * runs} "
                f"({sc.retries_per_run} per run)"
            )


# --------------------------------------------------------------------------------------------
# The suite and its table
# --------------------------------------------------------------------------------------------


async def run_suite(
    scenarios: Sequence[Scenario],
    mock: MockProcess,
    *,
    full: bool,
    workdir: Path,
    progress: Callable[[ScenarioResult], None] | None = None,
) -> list[ScenarioResult]:
    results: list[ScenarioResult] = []
    launcher = Launcher(mock, workdir)
    try:
        for i, sc in enumerate(scenarios):
            if not mock.alive():
                raise RuntimeError("the mock upstream died")
            launcher.prefetch(sc)
            launcher.prefetch(scenarios[i + 1] if i + 1 < len(scenarios) else None)
            result = await run_scenario(sc, mock, full=full, workdir=workdir, launcher=launcher)
            results.append(result)
            if progress is not None:
                progress(result)
    finally:
        launcher.close()
    return results


HEADERS = (
    "scenario",
    "runs",
    "faults injected",
    "terminal ok",
    "leaks",
    "hangs",
    "RSS Δ MiB",
    "time s",
    "result",
)


def table_rows(results: Sequence[ScenarioResult]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for r in results:
        t = r.tally
        dagger = "†" if r.scenario.gateway_side else ""
        rss = "—" if math.isnan(r.rss_growth_mib) else f"{r.rss_growth_mib:+.1f}"
        rows.append(
            (
                r.scenario.name,
                str(t.runs),
                str(t.faults),
                f"{t.terminal_ok}/{t.streams}{dagger}",
                str(len(t.leaks)),
                str(t.hangs),
                rss,
                f"{r.seconds:.1f}",
                "ok" if r.ok else "FAIL",
            )
        )
    return rows


def render_text(results: Sequence[ScenarioResult]) -> str:
    rows = [HEADERS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(results: Sequence[ScenarioResult]) -> str:
    lines = [
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|",
    ]
    for row in table_rows(results):
        lines.append("| " + " | ".join((f"`{row[0]}`", *row[1:])) + " |")
    return "\n".join(lines)
