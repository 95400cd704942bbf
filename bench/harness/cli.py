"""`make bench`: measure the gateway against its performance targets (issue 4).

    .venv/bin/python bench/run.py                      # every scenario, full size
    BENCH_QUICK=1 .venv/bin/python bench/run.py        # every scenario, briefly (smoke test)
    .venv/bin/python bench/run.py --only throughput,cancel --repeats 3

Layout on a 2-core machine: the gateway is pinned to core 0 (`taskset -c 0`), the mock upstream
(fast mode, `[[mock fast=1 ...]]`) and the Node load generators (bench/loadgen.js) to core 1.
The `--workers 2` row gives the gateway both cores (the load shares core 1 with it then).

Every scenario runs `--repeats` times; the table shows the median and the min..max spread, the
target and a verdict (by how much a missed target is missed). It is printed and written to
bench/results/<YYYY-MM-DD>.md (BENCH_QUICK runs write <date>-quick.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from bench.harness.context import Bench
from bench.harness.load import FULL, QUICK, Sizes
from bench.harness.measure import core_times, steal_shares
from bench.harness.procs import BENCH, NODE, ROOT, Mock, raise_fd_limit, running
from bench.harness.profile import profile as pyspy_profile
from bench.harness.report import machine_header, render
from bench.scenarios import SCENARIOS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--repeats", type=int, help="runs per scenario (default 5, quick 1)")
    parser.add_argument(
        "--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1"
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="py-spy the throughput and the paced (cpu) workloads (default: on in full runs)",
    )
    parser.add_argument("--output", type=Path, help="table file (default bench/results/<date>.md)")
    return parser


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, Sizes, list[str]]:
    """The arguments, the sizes they select and the scenarios to run (in the order given);
    exits (status 2) on an unknown scenario."""
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = Sizes(**{**sizes.__dict__, "repeats": args.repeats})
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args, sizes, only


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, sizes, only = parse(parser, argv)
    if shutil.which(NODE) is None:
        parser.error("node is not installed")
    if not (BENCH / "node_modules" / "ws").exists():
        parser.error("run `npm ci` in bench/ first (make bench does)")
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / ".gateway.log").write_text("")
    fds = raise_fd_limit()
    profile = (
        (not args.quick and len(only) == len(SCENARIOS)) if args.profile is None else args.profile
    )
    date = f"{dt.datetime.now(dt.UTC):%Y-%m-%d}"
    out = args.output or BENCH / "results" / (f"{date}-quick.md" if args.quick else f"{date}.md")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    bench = Bench(sizes, args.quick, log)
    if fds < 2 * sizes.mem_large + 1000 and "memory" in only:
        bench.notes.append(
            f"open-file limit is only {fds} (the hard limit; raising it needs CAP_SYS_RESOURCE): "
            "at that many sockets a few handshakes may fail with EMFILE"
        )
    started = time.monotonic()
    steal: dict[str, str] = {}
    mock = Mock()
    with running(mock):
        for name, scenario in SCENARIOS.items():
            if name not in only:
                continue
            log(f"== {name}")
            t0, ticks0 = time.monotonic(), core_times()
            try:
                scenario.run(bench, mock)
            except Exception as exc:  # one broken scenario must not lose the others' rows
                log(traceback.format_exc())
                bench.failed.append(name)
                bench.notes.append(f"scenario {name} FAILED: {exc}")
            steal[name] = steal_shares(ticks0)
            log(f"   ({time.monotonic() - t0:.0f} s; host steal: {steal[name]})")
        if profile:
            for workload in ("throughput", "paced"):
                log(f"== py-spy profile ({workload})")
                pyspy_profile(bench, mock, out, workload)
    bench.notes.append(
        "host CPU steal during each scenario (time the hypervisor ran other guests on this "
        "VM's cores; high values inflate latency tails and the CPU figures): "
        + "; ".join(f"{name}: {shares}" for name, shares in steal.items())
    )
    bench.notes.append(f"total bench time {time.monotonic() - started:.0f} s")
    table = render(bench.rows, machine_header(sizes, args.quick, only), bench.notes)
    out.write_text(table)
    print(table)
    print(f"(written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
    return 1 if bench.failed else 0
