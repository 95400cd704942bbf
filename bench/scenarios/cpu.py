"""6. cpu: gateway CPU seconds (/proc/PID/stat utime+stime) per upstream chunk, 200 streams x 20
chunks/s (stream setup and teardown included)."""

from __future__ import annotations

from bench.harness.context import Bench, Scenario
from bench.harness.load import Load, check, paced_cfg, warmup
from bench.harness.procs import Gateway, Mock, running


def run(bench: Bench, mock: Mock) -> None:
    s = bench.s
    rate = 20
    chunks = int(rate * s.cpu_seconds)
    per: list[float] = []
    gw = Gateway(mock.url)
    with running(gw):
        warmup(gw, s.cpu_streams // 5, 5)
        for i in range(s.repeats):
            load = Load(paced_cfg(s, gw.url))
            cpu0 = gw.cpu_seconds()
            r = load.run()
            cpu = gw.cpu_seconds() - cpu0
            check(r, "cpu")
            per.append(cpu / r["upstream_chunks"] * 1e6)
            bench.log(
                f"  cpu #{i + 1}: {per[-1]:.1f} us/chunk ({cpu:.2f} s for "
                f"{r['upstream_chunks']} chunks, {r['frames']} frames)"
            )
    bench.row(
        "6 cpu",
        f"gateway CPU per paced chunk ({s.cpu_streams} streams x {rate} chunks/s, "
        f"{chunks} chunks each, stream setup included)",
        "us",
        per,
        ("<=", 25.0, ""),
    )


SCENARIO = Scenario(
    "cpu",
    "gateway CPU per paced chunk (20 chunks/s streams, setup included)",
    run,
)
