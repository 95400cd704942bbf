"""1. throughput: 50 sockets x 2 streams x 2,000 chunks, unpaced, through one gateway worker on
one core; upstream chunks relayed per second (wall) and per gateway CPU-second."""

from __future__ import annotations

import statistics

from bench.harness.context import Bench, Scenario
from bench.harness.load import Load, check, throughput_cfg, warmup
from bench.harness.procs import GATEWAY_CORES, LOAD_CORES, Gateway, Mock, running


def measure(bench: Bench, mock: Mock, workers: int) -> tuple[list[float], list[float]]:
    """The throughput workload through a gateway of `workers` workers, `--repeats` times: the
    upstream chunks relayed per second and per gateway CPU-second of each run."""
    s = bench.s
    rate: list[float] = []
    per_cpu: list[float] = []
    cores = GATEWAY_CORES if workers == 1 else f"{GATEWAY_CORES},{LOAD_CORES}"
    gw = Gateway(mock.url, cores=cores, workers=workers)
    with running(gw):
        warmup(gw)
        for i in range(s.repeats):
            load = Load(throughput_cfg(s, "ws", gw.url))
            cpu0 = gw.cpu_seconds()
            r = load.run()
            cpu = gw.cpu_seconds() - cpu0
            check(r, "throughput")
            rate.append(r["upstream_chunks"] / r["elapsed_s"])
            per_cpu.append(r["upstream_chunks"] / cpu if cpu > 0 else float("nan"))
            bench.log(
                f"  throughput w{workers} #{i + 1}: {rate[-1]:,.0f} chunks/s, "
                f"{r['frames']} frames, gateway cpu {cpu:.2f}s, load cpu {r['cpu_s']:.2f}s"
            )
    return rate, per_cpu


def run(bench: Bench, mock: Mock) -> None:
    s = bench.s
    rate, per_cpu = measure(bench, mock, workers=1)
    shape = f"{s.tp_sockets}x{s.tp_streams} streams x {s.tp_chunks} chunks"
    bench.tp_median = statistics.median(rate)
    bench.tp_per_cpu = statistics.median(per_cpu)
    bench.row(
        "1 throughput",
        f"upstream chunks relayed/s, 1 worker on 1 core ({shape})",
        "chunks/s",
        rate,
        (">=", 150_000, "per core"),
    )
    bench.row(
        "1 throughput",
        "upstream chunks per gateway CPU-second",
        "chunks/cpu-s",
        per_cpu,
        note="wall rate / CPU used: shows whether the gateway core was saturated",
    )


SCENARIO = Scenario(
    "throughput",
    "unpaced streams through one worker on one core: chunks/s and chunks per CPU-second",
    run,
)
