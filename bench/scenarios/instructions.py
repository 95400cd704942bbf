"""10. instructions: user-space instructions per paced chunk under `valgrind --tool=callgrind`,
for the gateway and the reference bridge; skipped, with a note, where valgrind is missing."""

from __future__ import annotations

import shutil

from bench.harness.context import Bench, Scenario
from bench.harness.load import Load, check, paced_cfg, warmup
from bench.harness.measure import callgrind_prefix, callgrind_total
from bench.harness.procs import Gateway, Mock, Reference, Server, running


def run(bench: Bench, mock: Mock) -> None:
    """User-space instructions per paced chunk, counted by callgrind: unlike CPU time they
    do not drift with the VM's speed or a noisy neighbour, so they show a change of a few
    percent that the CPU rows cannot. Each relay runs twice under valgrind, with N and 2N
    chunks per stream; the difference over the extra chunks leaves start-up and stream
    setup out. Kernel time is not counted (its share: docs/performance.md)."""
    if shutil.which("valgrind") is None:
        bench.notes.append("valgrind not installed: no instruction counts")
        return
    s = bench.s
    counts: dict[str, list[float]] = {"gw": [], "ref": []}
    for key in ("gw", "ref"):
        totals: list[tuple[int, int]] = []
        for chunks in (s.ir_chunks, 2 * s.ir_chunks):
            prefix = callgrind_prefix()
            server: Server = (
                Gateway(mock.url, prefix=prefix, start_timeout=180)
                if key == "gw"
                else Reference(mock.url, prefix=prefix, start_timeout=180)
            )
            with running(server):
                warmup(server, 2, 5)
                cfg = dict(paced_cfg(s, server.url), sockets=s.ir_streams // 5)
                cfg["chunks"] = chunks
                cfg["prompt"] = f"[[mock fast=1 chunks={chunks} rate=20]] bench instructions"
                r = Load(cfg).run()
                check(r, f"instructions ({key})")
            totals.append((r["upstream_chunks"], callgrind_total()))
        (c1, i1), (c2, i2) = totals
        counts[key].append((i2 - i1) / (c2 - c1))
        bench.log(f"  instructions {key}: {counts[key][-1]:,.0f} per paced chunk")
    streams = s.ir_streams
    what = f"{streams} streams x 20 chunks/s, {s.ir_chunks} vs {2 * s.ir_chunks} chunks each"
    bench.row(
        "10 instructions",
        f"gateway: user-space instructions per paced chunk (callgrind; {what})",
        "instr",
        counts["gw"],
        note="steady from run to run: the yardstick for A/B of the Python path",
    )
    bench.row(
        "10 instructions",
        "reference bridge: user-space instructions per paced chunk (callgrind)",
        "instr",
        counts["ref"],
    )
    bench.row(
        "10 instructions",
        "gateway / reference bridge, user-space instructions per paced chunk",
        "x",
        [counts["gw"][0] / counts["ref"][0]],
        note="user space only: the kernel's part (each read, write and wake-up) is the same "
        "work for both",
    )


SCENARIO = Scenario(
    "instructions",
    "user-space instructions per paced chunk (callgrind), gateway and reference bridge",
    run,
)
