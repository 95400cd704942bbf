"""The result table: one row per metric (median, min .. max spread, target, verdict), the
machine it ran on, written as Markdown to bench/results/."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness.load import Sizes
from bench.harness.procs import GATEWAY_CORES, LOAD_CORES, NODE, ROOT


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    samples: list[float] = field(default_factory=list)
    #: (comparison, bound, how the bound was derived) or None for informational rows.
    target: tuple[str, float, str] | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def verdict(self) -> str:
        if self.target is None or not self.samples:
            return ""
        op, bound, _ = self.target
        value = self.median
        ok = value >= bound if op == ">=" else value <= bound
        if ok:
            return "PASS"
        if op == ">=":
            return f"MISS by {(1 - value / bound) * 100:.0f}% ({value / bound:.2f}x of target)"
        return f"MISS by {(value / bound - 1) * 100:.0f}% ({value / bound:.2f}x the bound)"

    def cells(self) -> list[str]:
        if self.samples:
            lo, hi = min(self.samples), max(self.samples)
            spread = f"{fmt(lo)} .. {fmt(hi)}" if len(self.samples) > 1 else "(1 run)"
            median = fmt(self.median)
        else:
            median, spread = "n/a", ""
        target = ""
        if self.target is not None:
            op, bound, how = self.target
            target = f"{'≥' if op == '>=' else '≤'} {fmt(bound)}" + (f" ({how})" if how else "")
        return [
            self.scenario,
            self.metric,
            f"{median} {self.unit}".strip(),
            spread,
            target,
            self.verdict(),
            self.note,
        ]


def fmt(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def render(rows: list[Row], header: list[str], notes: list[str]) -> str:
    cols = ["scenario", "metric", "median", "min .. max", "target", "verdict", "note"]
    out = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |")
    if notes:
        out += ["", *[f"- {n}" for n in notes]]
    return "\n".join(out) + "\n"


def machine_header(sizes: Sizes, quick: bool, only: Sequence[str]) -> list[str]:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            # The run's own output files do not make the code it measured dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        rev, dirty = "?", ""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    node = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    return [
        f"# Benchmark {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
        + (" (BENCH_QUICK: smoke-test sizes, not comparable)" if quick else ""),
        "",
        f"- commit {rev}{' + local changes' if dirty else ''}; Python {platform.python_version()}, "
        f"Node {node}; {os.cpu_count()} cores ({cpu})",
        f"- gateway pinned to core {GATEWAY_CORES} (uvloop, one worker unless stated); mock "
        f"upstream (fast mode) and Node load generators pinned to core {LOAD_CORES}",
        f"- each row: median of {sizes.repeats} runs (memory: {sizes.mem_repeats}, 1 at "
        f"{sizes.mem_large:,} sockets) and the "
        "min .. max spread; every stream checked (seq contiguous, done.text == chunks, chunk "
        "count)",
        f"- scenarios: {', '.join(only)}",
    ]
