"""Measurement beyond a process's own CPU time and memory (procs.Server): host CPU steal,
percentiles, and user-space instruction counts under callgrind."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path

from bench.harness.procs import BENCH

#: Where callgrind writes its summary, which has the run's instruction total.
CALLGRIND_LOG = BENCH / "results" / ".valgrind.log"


def core_times() -> dict[str, tuple[int, int]]:
    """Per core ("cpu0", ...): (steal, total) clock ticks so far, from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                ticks = [int(v) for v in values[:8]]  # user .. steal
                out[name] = (ticks[7] if len(ticks) > 7 else 0, sum(ticks))
    return out


def steal_shares(before: dict[str, tuple[int, int]]) -> str:
    """The share of each core's time the hypervisor gave to other guests since `before`:
    on a VM, time a busy process waits without running, which inflates latency tails."""
    parts = []
    for name, (steal, total) in core_times().items():
        steal0, total0 = before.get(name, (0, 0))
        if total > total0:
            parts.append(f"core {name[3:]} {100 * (steal - steal0) / (total - total0):.0f}%")
    return ", ".join(parts) or "n/a"


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def callgrind_prefix(log: Path = CALLGRIND_LOG) -> list[str]:
    """The command prefix that runs a relay under callgrind, counting its user-space instructions
    (no per-function output: only the total, in `log`)."""
    prefix = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    prefix.append(f"--log-file={log}")
    return prefix


def callgrind_total(log: Path = CALLGRIND_LOG) -> int:
    """The instructions callgrind counted in the run that wrote `log`."""
    collected = re.search(r"Collected : (\d+)", log.read_text())
    if collected is None:
        raise RuntimeError(f"no callgrind total in {log}")
    return int(collected.group(1))
