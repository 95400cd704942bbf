"""8. workers: the throughput workload with `--workers 2` (both cores for the gateway, sharing
core 1 with the mock and the load generator), over the 1-worker median."""

from __future__ import annotations

from bench.harness.context import Bench, Scenario
from bench.harness.procs import LOAD_CORES, Mock
from bench.scenarios import throughput


def run(bench: Bench, mock: Mock) -> None:
    if bench.tp_median is None:  # not run (--only workers) or failed: its rows come too
        throughput.run(bench, mock)
    rate, per_cpu = throughput.measure(bench, mock, workers=2)
    ratio = [x / bench.tp_median for x in rate] if bench.tp_median else []
    bench.row(
        "8 workers",
        f"--workers 2 upstream chunks/s (both cores; load shares core {LOAD_CORES})",
        "chunks/s",
        rate,
    )
    bench.row(
        "8 workers",
        "--workers 2 / 1 worker",
        "x",
        ratio,
        (">=", 1.8, ""),
        note="gateway on cores 0,1 while the mock and load generator also use core 1",
    )
    # Whether a worker does the same work per chunk as a lone gateway: if so, what
    # limits the row above is the cores the workers get, not the workers' design.
    bench.row(
        "8 workers",
        "--workers 2 / 1 worker, upstream chunks per gateway CPU-second (all workers)",
        "x",
        [x / bench.tp_per_cpu for x in per_cpu] if bench.tp_per_cpu else [],
        note="near 1: two workers add little work per chunk (the row above lacks cores)",
    )


SCENARIO = Scenario(
    "workers",
    "throughput with --workers 2 (both cores) over one worker's, and chunks per CPU-second",
    run,
)
