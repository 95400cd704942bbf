"""The fault-injection suite (tests/faults) in its short form, one test per scenario.

Each test runs one scenario against real processes: the mock upstream (one per module) and a
fresh gateway (started one scenario ahead by the `Launcher`, so start-ups overlap). A failure
message lists what went wrong (wrong terminal frames, hangs, leaks) and where the logs are.
`make faults` runs the long form (1,000 abrupt closes and more) and writes the table into
docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.client import Expect, Frame, check_stream
from tests.faults.procs import Metrics, MockProcess
from tests.faults.runner import Launcher, run_scenario
from tests.faults.scenarios import SCENARIOS, Scenario

# --------------------------------------------------------------------------------------------
# The suite's own checks (pure): a checker that misses a broken stream proves nothing
# --------------------------------------------------------------------------------------------


def _stream(*texts: str, end: Frame | None = None) -> list[Frame]:
    frames: list[Frame] = [{"type": "started", "id": "s"}]
    frames += [
        {"type": "text_chunk", "id": "s", "seq": i, "text": t} for i, t in enumerate(texts, 1)
    ]
    if end is not None:
        frames.append(end)
    return frames


def _done(text: str, seq: int) -> Frame:
    return {"type": "done", "id": "s", "seq": seq, "text": text}


def test_check_stream_accepts_a_well_formed_stream() -> None:
    """started, contiguous chunks and a done with their text and seq: no problem."""
    frames = _stream("Hello ", "world", end=_done("Hello world", 2))
    assert check_stream(frames, Expect("done", text="exact"), "Hello world") == []


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        (_stream("a"), "0 terminal frames"),
        ([*_stream("a", end=_done("a", 1)), _done("a", 1)], "2 terminal frames"),
        (
            [*_stream("a", end=_done("a", 1)), {"type": "text_chunk", "id": "s", "seq": 2}],
            "follows the terminal",
        ),
        (
            [{"type": "started"}, {"type": "text_chunk", "seq": 2, "text": "a"}, _done("a", 1)],
            "seqs not contiguous",
        ),
        (_stream("a", "b", end=_done("ab", 1)), "terminal seq 1 != 2"),
        (_stream("a", end=_done("ab", 1)), "done.text differs"),
        (_stream("a", end=_done("a", 1))[1:], "not started"),
    ],
)
def test_check_stream_catches_every_protocol_violation(frames: list[Frame], needle: str) -> None:
    """Missing or doubled terminals, frames after it, seq gaps and text mismatches are caught."""
    assert any(needle in p for p in check_stream(frames, None, None))


def test_check_stream_judges_the_expected_ending() -> None:
    """The terminal kind, retryable, status, text rule and message are all checked."""
    error: Frame = {
        "type": "error",
        "id": "s",
        "seq": 1,
        "code": "upstream_error",
        "retryable": True,
        "status": 503,
        "message": "<html>bad gateway</html>",
    }
    frames = _stream("Hel", end=error)
    ok = Expect("upstream_error", retryable=True, status=503, text="prefix")
    assert check_stream(frames, ok, "Hello") == []
    assert check_stream(frames, Expect("done"), "Hello")[0].startswith("ended upstream_error")
    assert check_stream(frames, Expect("upstream_error", status=500), "Hello")
    assert check_stream(frames, Expect("upstream_error", retryable=False), "Hello")
    assert check_stream(frames, ok, "Goodbye")  # not a prefix of the answer
    assert check_stream(frames, Expect("upstream_error", message_excludes=("<",)), None)
    assert check_stream(_stream("Hel", end=_done("Hel", 1)), Expect("done"), "Hello")
    stray: Frame = {"type": "error", "id": "s", "code": "unknown_id", "message": "?"}
    assert check_stream([*_stream("a")[:2], stray, _done("a", 1)], None, None)


def test_metrics_parser_sums_series_and_knows_declared_families() -> None:
    """Labelled series are summed; a declared counter without samples yet reads 0, not NaN."""
    text = "\n".join(
        [
            "# TYPE gateway_streams_ended_total counter",
            'gateway_streams_ended_total{dialect="openai",outcome="done"} 3.0',
            'gateway_streams_ended_total{dialect="openai",outcome="cancelled"} 2.0',
            "# TYPE gateway_streams_started counter",
            "# TYPE gateway_open_sockets gauge",
            "gateway_open_sockets 1.0",
        ]
    )
    m = Metrics(text)
    assert m.get("gateway_streams_ended_total") == 5
    assert m.get("gateway_streams_ended_total", outcome="done") == 3
    assert m.get("gateway_streams_started_total") == 0
    assert m.has("gateway_streams_started_total")
    assert m.get("gateway_open_sockets") == 1
    assert m.get("nope") != m.get("nope")  # NaN: a missing metric never passes a check


def test_scenarios_have_unique_names_and_sane_run_counts() -> None:
    """Names are ids (pytest, --only); the full run is never shorter than the short one."""
    names = [s.name for s in SCENARIOS]
    assert len(names) == len(set(names))
    assert all(0 < s.runs[0] <= s.runs[1] for s in SCENARIOS)
    assert {s.group for s in SCENARIOS} == {"upstream", "client", "process"}


# --------------------------------------------------------------------------------------------
# The scenarios against real processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mock_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockProcess]:
    """`python -m gateway mock-upstream` for the whole module (its counters are global)."""
    mock = MockProcess.start(tmp_path_factory.mktemp("faults-mock"))
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def launcher(
    mock_upstream: MockProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    """Gateways for the scenarios, each spawned while the scenario before it runs."""
    gateways = Launcher(mock_upstream, tmp_path_factory.mktemp("faults"))
    yield gateways
    gateways.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
async def test_fault_scenario(
    scenario: Scenario, mock_upstream: MockProcess, launcher: Launcher
) -> None:
    """The scenario's streams end as required, nothing hangs, and nothing leaks afterwards."""
    index = SCENARIOS.index(scenario)
    launcher.prefetch(scenario)
    launcher.prefetch(SCENARIOS[index + 1] if index + 1 < len(SCENARIOS) else None)
    result = await run_scenario(
        scenario, mock_upstream, full=False, workdir=launcher.workdir, launcher=launcher
    )
    assert result.ok, result.report()
