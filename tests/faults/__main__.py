"""`python -m tests.faults [--full] [--markdown PATH] [--only NAME ...]`: run the suite, print
the table, exit 1 if any scenario leaked, hung or ended a stream the wrong way."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.faults.procs import MockProcess
from tests.faults.runner import ScenarioResult, render_markdown, render_text, run_suite
from tests.faults.scenarios import SCENARIOS, by_name

BEGIN = "<!-- faults-table:begin -->"
END = "<!-- faults-table:end -->"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
        timeout=5,
    ).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def markdown_section(results: Sequence[ScenarioResult], full: bool, seconds: float) -> str:
    """The table with where and how it was produced, and any failure below it."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mode = "--full" if full else "short"
    lines = [
        f"Run {mode}, {when}, commit {_commit()}, Python {platform.python_version()} on "
        f"{platform.system()} with {os.cpu_count()} CPUs, {seconds:.0f} s in total.",
        "",
        render_markdown(results),
        "",
        "† the client cut itself off, so the gateway's own counts are checked: every stream it "
        "started ended (`gateway_streams_started_total` = `gateway_streams_ended_total`).",
    ]
    notes = [(r.scenario.name, n) for r in results for n in dict.fromkeys(r.tally.notes)]
    if notes:
        lines += ["", "Measurements:", ""]
        lines += [f"- `{name}`: {note}" for name, note in notes]
    lines += ["", "What each scenario injects, and what must happen:", ""]
    lines += ["| scenario | fault | required |", "|---|---|---|"]
    for r in results:
        lines.append(f"| `{r.scenario.name}` | {r.scenario.fault} | {r.scenario.expect} |")
    failed = [r for r in results if not r.ok]
    if failed:
        lines += ["", "Failures:", "", "```"]
        lines += [r.report() for r in failed]
        lines.append("```")
    return "\n".join(lines)


def write_markdown(path: Path, section: str) -> None:
    """Replace the part between the markers of an existing file, or write a new one."""
    block = f"{BEGIN}\n{section}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
            return
    path.write_text(f"# Fault-injection suite: last run\n\n{block}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--full", action="store_true", help="the long runs (make faults)")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help="write the table there (between the faults-table markers if the file has them)",
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run just this scenario"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs of a clean run")
    args = parser.parse_args(argv)
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:26} {sc.group:8} {sc.fault} -> {sc.expect}")
        return 0
    try:
        scenarios = by_name(args.only)
    except KeyError as exc:
        parser.error(f"no scenario {exc}; see --list")
    workdir = Path(tempfile.mkdtemp(prefix="faults-"))
    began = time.monotonic()

    def progress(result: ScenarioResult) -> None:
        t = result.tally
        print(
            f"{'ok  ' if result.ok else 'FAIL'} {result.scenario.name:26} "
            f"{t.runs:5} runs {result.seconds:6.1f} s",
            file=sys.stderr,
            flush=True,
        )
        if not result.ok:
            print(result.report(), file=sys.stderr, flush=True)

    mock = MockProcess.start(workdir)
    try:
        results = asyncio.run(
            run_suite(scenarios, mock, full=args.full, workdir=workdir, progress=progress)
        )
    finally:
        mock.stop()
    seconds = time.monotonic() - began
    print(render_text(results))
    ok = all(r.ok for r in results)
    print(f"\n{len(results)} scenarios, {sum(not r.ok for r in results)} failed, {seconds:.0f} s")
    if args.markdown is not None:
        write_markdown(args.markdown, markdown_section(results, args.full, seconds))
    if ok and not args.keep_logs:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
