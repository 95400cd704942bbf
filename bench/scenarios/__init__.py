"""The scenarios of `make bench`, one module each (bench/README.md has what each measures).

A scenario module defines `run(bench, mock)` and `SCENARIO = Scenario(name, description, run)`
(bench/harness/context.py); adding one is adding its module and its entry below. Scenarios
import the harness; the harness imports nothing from here but this registry (in its CLI).
"""

from __future__ import annotations

from bench.harness.context import Scenario
from bench.scenarios import (
    cancel,
    ceiling,
    cpu,
    instructions,
    latency,
    memory,
    reference,
    throughput,
    ttfc,
    workers,
)

#: By name, in run order. Memory goes last: churning 40,000 sockets leaves the kernel busy for a
#: while (TIME_WAIT, freed buffers), which showed up as noise in the CPU scenario run right after
#: it.
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        throughput.SCENARIO,
        ceiling.SCENARIO,
        latency.SCENARIO,
        ttfc.SCENARIO,
        cancel.SCENARIO,
        cpu.SCENARIO,
        reference.SCENARIO,
        instructions.SCENARIO,
        workers.SCENARIO,
        memory.SCENARIO,
    )
}
