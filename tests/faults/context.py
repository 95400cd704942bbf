"""What a scenario run gets to work with (`Run`) and what it counts (`Tally`)."""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.mock import choose_answer, parse_directive, text_chunks
from tests.faults.client import Expect, Frame, WsClient, check_stream
from tests.faults.procs import GatewayProcess, MockProcess

#: The question every scenario asks: its canned answer (about Mars) ends in non-ASCII text
#: (minus sixty degrees, with U+2212 and U+00B0), so byte-by-byte delivery splits UTF-8.
QUESTION = "Tell me about the planet Mars"
_tags = itertools.count(1)


def answer(directive: str, question: str = QUESTION, delivered: int | None = None) -> str:
    """The text the mock streams for `question` under `directive` (it is deterministic): all
    its pieces, or the first `delivered` of them."""
    _, knobs = parse_directive(f"[[mock {directive}]]")
    pieces = text_chunks(choose_answer(question).text, knobs.chunks)
    return "".join(pieces if delivered is None else pieces[:delivered])


@dataclass(frozen=True, slots=True)
class Baseline:
    """A gateway's resource use at rest, after a warm-up stream: what "no leak" returns to."""

    tasks: float
    #: Open fds minus idle pooled upstream connections (those may come and go legitimately).
    fds: float
    rss: float
    #: Counter values at the baseline, for deltas over the scenario.
    counters: dict[str, float]


@dataclass
class Tally:
    """One scenario's counts across its runs, and what went wrong (first few of each kind)."""

    runs: int = 0
    faults: int = 0
    #: Streams whose ending was checked; `terminal_ok` of them ended exactly as required.
    streams: int = 0
    terminal_ok: int = 0
    hangs: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    leaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problem(self, message: str) -> None:
        self.problems[message] += 1

    def stream_result(self, problems: Sequence[str], *, hung: bool = False) -> None:
        self.streams += 1
        if hung:
            self.hangs += 1
        if problems:
            for p in problems:
                self.problem(p)
        else:
            self.terminal_ok += 1


@dataclass
class Run:
    """One run of a scenario: the processes, an HTTP client, and the clients it opened."""

    scenario: str
    index: int
    full: bool
    mock: MockProcess
    http: aiohttp.ClientSession
    gateway: GatewayProcess | None
    tally: Tally
    workdir: Path
    #: The gateway's resource use before the runs (None for scenarios with their own).
    baseline: Baseline | None = None
    clients: list[WsClient] = field(default_factory=list)
    spawned: list[GatewayProcess] = field(default_factory=list)

    @property
    def gw(self) -> GatewayProcess:
        assert self.gateway is not None, "this scenario starts its own gateways"
        return self.gateway

    def tag(self, label: str = "") -> str:
        """A tag unique in the whole suite (mock records and `times=` counters are per tag)."""
        return f"{self.scenario}.{self.index}.{label}{next(_tags)}"

    async def connect(self, gateway: GatewayProcess | None = None, **kwargs: Any) -> WsClient:
        client = await WsClient.connect((gateway or self.gw).ws_url, **kwargs)
        self.clients.append(client)
        return client

    async def spawn_gateway(self, route: str, flags: Sequence[str]) -> GatewayProcess:
        """A gateway of this run's own (for scenarios that end the process)."""
        gateway = await GatewayProcess.start(
            f"gw-{self.scenario}-{self.index}-{len(self.spawned)}",
            self.mock.url(route),
            flags,
            self.workdir,
        )
        self.spawned.append(gateway)
        return gateway

    async def stream(
        self,
        client: WsClient,
        sid: str,
        directive: str,
        expect: Expect,
        *,
        question: str = QUESTION,
        wait: bool = True,
    ) -> list[Frame] | None:
        """Start one stream and (with `wait`) check how it ends; None if it hung."""
        prompt = f"{question} [[mock {directive}]]"
        await client.start(sid, prompt)
        if not wait:
            return None
        return await self.finish(client, sid, directive, expect, question=question)

    async def finish(
        self,
        client: WsClient,
        sid: str,
        directive: str,
        expect: Expect,
        *,
        question: str = QUESTION,
        started: float | None = None,
        since: int = 0,
        delivered: int | None = None,
    ) -> list[Frame] | None:
        """Wait for `sid`'s terminal (until `expect.within` after `started`) and tally the
        checks. `since`: index of this stream's first frame (ids can be reused on a socket);
        `delivered`: the answer is only its first that many pieces (e.g. a clean EOF)."""
        begun = time.monotonic() if started is None else started
        remaining = expect.within - (time.monotonic() - begun)
        hung = await client.wait_terminals([sid], remaining, {sid: since})
        frames = client.frames.get(sid, [])[since:]
        if hung:
            self.tally.stream_result(
                [f"no terminal within {expect.within:g} s ({len(frames)} frames)"], hung=True
            )
            return None
        self.tally.stream_result(
            check_stream(frames, expect, answer(directive, question, delivered))
        )
        return frames

    async def close_clients(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients.clear()
