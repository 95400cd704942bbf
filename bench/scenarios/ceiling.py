"""7. ceiling: the load generator reading the mock directly (the throughput workload), no
gateway: what mock and load generator can do together, which no gateway row can exceed."""

from __future__ import annotations

from bench.harness.context import Bench, Scenario
from bench.harness.load import Load, check, throughput_cfg
from bench.harness.procs import LOAD_CORES, Mock


def run(bench: Bench, mock: Mock) -> None:
    s = bench.s
    rate = []
    for i in range(s.repeats):
        load = Load(throughput_cfg(s, "sse", mock.url + "/openai"))
        r = load.run()
        check(r, "ceiling")
        rate.append(r["upstream_chunks"] / r["elapsed_s"])
        bench.log(
            f"  ceiling #{i + 1}: {rate[-1]:,.0f} chunks/s, load cpu {r['cpu_s']:.2f}s "
            f"of {r['elapsed_s']:.2f}s"
        )
    bench.row(
        "7 ceiling",
        "load generator reading the mock directly (SSE), no gateway, all on core " + LOAD_CORES,
        "chunks/s",
        rate,
        note="what mock + load generator can do; the gateway rows cannot exceed it",
    )


SCENARIO = Scenario(
    "ceiling",
    "the throughput workload read from the mock directly, no gateway: the ceiling of rows 1 and 8",
    run,
)
