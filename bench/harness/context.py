"""What a scenario is, and the run it adds its rows to."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.harness.load import Sizes
from bench.harness.procs import Mock
from bench.harness.report import Row


class Bench:
    """One bench run: its sizes, its log (stderr), and the rows and notes of its table."""

    def __init__(self, sizes: Sizes, quick: bool, log: Callable[[str], None]) -> None:
        self.s = sizes
        self.quick = quick
        self.log = log
        self.rows: list[Row] = []
        self.notes: list[str] = []
        #: Set by the throughput scenario: the workers scenario divides by them.
        self.tp_median: float | None = None
        self.tp_per_cpu: float | None = None
        self.failed: list[str] = []

    def row(self, *args: Any, **kw: Any) -> Row:
        row = Row(*args, **kw)
        self.rows.append(row)
        return row


@dataclass(frozen=True)
class Scenario:
    """One scenario of `make bench` (bench/README.md), registered in bench/scenarios/__init__.py.

    `run` starts what it measures (a gateway per scenario; the mock upstream is shared and
    already running), adds its rows with `bench.row(...)` and anything worth saying to
    `bench.notes`; an exception fails this scenario only (the run goes on to the next one)."""

    #: The name `--only` takes.
    name: str
    #: What it measures, in one line.
    description: str
    run: Callable[[Bench, Mock], None]
