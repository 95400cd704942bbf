"""py-spy: where the gateway spends its Python time, during the throughput or the paced workload
(full runs only, by default; `--profile` / `--no-profile`)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench.harness.context import Bench
from bench.harness.load import Load, check, paced_cfg, throughput_cfg, warmup
from bench.harness.procs import LOAD_CORES, PYTHON, Gateway, Mock, running, taskset


def profile(bench: Bench, mock: Mock, out: Path, workload: str) -> None:
    """Record the gateway with py-spy during repeated runs of one workload (`throughput`:
    unpaced, or `paced`: the cpu scenario's tokens one read at a time); keep the raw
    (collapsed) stacks and print the hottest frames."""
    pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    if not Path(pyspy).exists():
        bench.notes.append("py-spy not installed: no profile (pip install py-spy)")
        return
    gw = Gateway(mock.url)
    with running(gw):
        warmup(gw)
        stem = out.with_suffix("") if workload == "throughput" else out.with_suffix(".paced")
        raw = stem.with_suffix(stem.suffix + ".pyspy.txt")
        top = stem.with_suffix(stem.suffix + ".pyspy-top.txt")
        spy = subprocess.Popen(
            taskset(
                LOAD_CORES,
                [
                    pyspy,
                    "record",
                    "--pid",
                    str(gw.pid),
                    "--rate",
                    "250",
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                    "--nonblocking",
                    "--duration",
                    "600",
                ],
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        for _ in range(max(2, bench.s.repeats)):
            cfg = (
                throughput_cfg(bench.s, "ws", gw.url)
                if workload == "throughput"
                else paced_cfg(bench.s, gw.url)
            )
            check(Load(cfg).run(), "profile")
        spy.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(20)
        if spy.poll() is None:
            spy.kill()
    if raw.exists():
        report = top_frames(raw.read_text(), workload)
        top.write_text(report)
        bench.notes.append(
            f"py-spy profile of the {workload} workload: {raw.name}, top frames in {top.name}"
        )
        bench.log(report)


def top_frames(collapsed: str, workload: str, limit: int = 25) -> str:
    """Self and inclusive sample shares from py-spy's collapsed stacks: per function (line
    numbers dropped) and per line for the self time."""
    by_func_self: dict[str, int] = {}
    by_func_incl: dict[str, int] = {}
    by_line_self: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = frames[-1]
        by_line_self[leaf] = by_line_self.get(leaf, 0) + n
        funcs = [_function(f) for f in frames]
        by_func_self[funcs[-1]] = by_func_self.get(funcs[-1], 0) + n
        for f in set(funcs):
            by_func_incl[f] = by_func_incl.get(f, 0) + n
    if not total:
        return "py-spy: no samples\n"

    def table(title: str, counts: dict[str, int]) -> list[str]:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return ["", title, *(f"{100 * n / total:6.1f}%  {f}" for f, n in rows)]

    lines = [f"py-spy: {total} samples of the gateway process during {workload} runs"]
    lines += table("self time by function", by_func_self)
    lines += table("inclusive time by function", by_func_incl)
    lines += table("self time by line", by_line_self)
    return "\n".join(lines) + "\n"


def _function(frame: str) -> str:
    """'f (path/file.py:12)' -> 'f (path/file.py)'."""
    name, sep, where = frame.partition(" (")
    return name + sep + where.rsplit(":", 1)[0] + ")" if sep else frame
