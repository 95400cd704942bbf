"""Smoke test of `make bench` (bench/run.py): one small scenario end to end, in quick mode.

It starts the real mock upstream (fast mode), a real gateway pinned to a core and the Node load
generator, and checks that the table row exists with positive numbers. It needs Node.js and the
bench's `ws` package (installed here with `npm ci` when missing); without Node it is skipped, except
in CI, where a missing Node is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _node_ready() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("node/npm missing in CI: the bench smoke test cannot run")
        pytest.skip("node/npm not installed")
    if not (BENCH / "node_modules" / "ws").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=BENCH,
            check=True,
            timeout=120,
        )


def _number(cell: str) -> float:
    match = re.match(r"\s*([0-9][0-9,]*(?:\.[0-9]+)?)", cell)
    assert match, f"no number in {cell!r}"
    return float(match.group(1).replace(",", ""))


@pytest.mark.timeout(90)
def test_quick_throughput_row(tmp_path: Path) -> None:
    _node_ready()
    out = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--quick",
            "--only",
            "throughput",
            "--repeats",
            "1",
            "--no-profile",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        env={**os.environ, "BENCH_QUICK": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = out.read_text()
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")
        for line in table.splitlines()
        if line.startswith("| 1 throughput")
    }
    rate = next(v for k, v in rows.items() if k[1].startswith("upstream chunks relayed/s"))
    per_cpu = next(v for k, v in rows.items() if k[1].startswith("upstream chunks per gateway"))
    assert _number(rate[2]) > 0
    assert _number(per_cpu[2]) > 0
    assert "150,000" in rate[4]  # the target is printed
    assert rate[5].strip().startswith(("PASS", "MISS"))  # and a verdict
    assert "chunks/s" in proc.stdout  # the table is printed too
