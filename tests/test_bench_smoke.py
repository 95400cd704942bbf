"""Tests of `make bench` (bench/run.py): one small scenario end to end, and every scenario dry.

The end-to-end test starts the real mock upstream (fast mode), a real gateway pinned to a core
and the Node load generator, and checks that the table row exists with positive numbers. It needs
Node.js and the bench's `ws` package (installed here with `npm ci` when missing); without Node it
is skipped, except in CI, where a missing Node is a failure.

The other tests need no processes: the scenario registry matches bench/scenarios/, the command line
accepts each scenario, the harness does not import the scenarios (but the registry, in its CLI),
and each scenario's code runs against fake relays and a fake load generator and adds its rows.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import bench.harness.load
import bench.scenarios
from bench.harness.cli import build_parser, parse
from bench.harness.context import Bench
from bench.harness.load import FULL, QUICK
from bench.scenarios import SCENARIOS

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

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


#: The run order bench/README.md documents (memory last: its socket churn disturbs what follows).
RUN_ORDER = [
    "throughput",
    "ceiling",
    "latency",
    "ttfc",
    "cancel",
    "cpu",
    "reference",
    "instructions",
    "workers",
    "memory",
]


def _scenario_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(bench.scenarios.__path__)]


def test_registry_lists_every_scenario_module_in_run_order() -> None:
    """Each module of bench/scenarios/ is registered under its own name, in the documented order."""
    assert sorted(_scenario_modules()) == sorted(SCENARIOS)
    assert list(SCENARIOS) == RUN_ORDER
    for name, scenario in SCENARIOS.items():
        module = importlib.import_module(f"bench.scenarios.{name}")
        assert module.SCENARIO is scenario
        assert scenario.name == name
        assert scenario.description
        assert callable(scenario.run)


@pytest.mark.parametrize("name", RUN_ORDER)
def test_cli_accepts_each_scenario(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--only NAME` selects that scenario alone, with the quick or full sizes and --repeats."""
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    args, sizes, only = parse(build_parser(), ["--only", name])
    assert only == [name]
    assert sizes == FULL
    assert args.profile is None
    args, sizes, only = parse(build_parser(), ["--only", f" {name},", "--quick", "--repeats", "3"])
    assert only == [name]
    assert sizes.repeats == 3
    assert sizes.tp_chunks == QUICK.tp_chunks


def test_cli_defaults_to_every_scenario_and_rejects_unknown_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --only every scenario runs in order; BENCH_QUICK=1 picks the quick sizes; an
    unknown name is a usage error that lists the known ones."""
    monkeypatch.setenv("BENCH_QUICK", "1")
    args, sizes, only = parse(build_parser(), [])
    assert only == RUN_ORDER
    assert args.quick
    assert sizes == QUICK
    with pytest.raises(SystemExit) as exc:
        parse(build_parser(), ["--only", "throughput,nosuch"])
    assert exc.value.code == 2
    assert (
        "unknown scenarios ['nosuch']; choose from throughput, ceiling" in capsys.readouterr().err
    )


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_harness_imports_only_the_scenario_registry() -> None:
    """No import cycle: harness modules import nothing from bench.scenarios but the registry,
    and only the CLI does; scenarios never import the CLI."""
    for path in sorted((BENCH / "harness").glob("*.py")):
        from_scenarios = [n for n in _imports(path) if n.startswith("bench.scenarios")]
        allowed = ["bench.scenarios.SCENARIOS"] if path.name == "cli.py" else []
        assert from_scenarios == allowed, path.name
    for path in sorted((BENCH / "scenarios").glob("*.py")):
        assert not [n for n in _imports(path) if n.startswith("bench.harness.cli")], path.name


# ------------------------------------------------------------------ every scenario, dry


class _FakeRelay:
    """A gateway or reference bridge that starts nothing and reports growing CPU, RSS and
    /metrics figures."""

    def __init__(self, upstream: str, *extra: str, **kw: Any) -> None:
        self.url = "ws://127.0.0.1:9/v1/ws"
        self.pid = 0
        self.n = 0

    def _tick(self) -> int:
        self.n += 1
        return self.n

    def cpu_seconds(self) -> float:
        return 0.5 * self._tick()

    def rss_bytes(self) -> int:
        return 2**20 * self._tick()

    def metrics(self, name: str) -> dict[str, float]:
        n = self._tick()
        return {"_count": 10.0 * n, "_sum": 0.01 * n, '_bucket{le="0.002"}': 8.0 * n}

    def stop(self) -> None:
        pass


class _FakeLoad:
    """bench/loadgen.js's replies, as the harness merges them (Load.results), for any config."""

    sent_ns: dict[str, int] = {}

    def __init__(self, cfg: dict[str, Any], procs: int = 1) -> None:
        self.cfg = cfg
        self.ready = [{"sockets": cfg["sockets"], "deflate_accepted": 1}]

    def send(self, word: str) -> None:
        pass

    def wait(self, event: str) -> None:
        pass

    def results(self) -> dict[str, Any]:
        cfg = self.cfg
        sent = {f"t{i}": 1_000 * i for i in range(3)} if cfg.get("cancel") else {}
        _FakeLoad.sent_ns.update(sent)
        return {
            "streams_ok": 0 if cfg.get("hold") else 1,
            "streams_failed": 0,
            "open_failed": 0,
            "errors": [],
            "upstream_chunks": cfg.get("chunks", 1) * cfg["sockets"] * cfg.get("streams", 1),
            "elapsed_s": 0.5,
            "frames": 10,
            "cpu_s": 0.1,
            "latency_us": [100.0, 200.0, 300.0],
            "ttfc_us": [300.0, 400.0],
            "cancel_us": [500.0, 600.0],
            "cancel_sent_ns": sent,
        }

    def run(self) -> dict[str, Any]:
        return self.results()


class _FakeMock:
    url = "http://127.0.0.1:9"

    def stats(self) -> dict[str, Any]:
        records = [
            {"tag": tag, "closed_ns": ns + 400_000, "ended_ns": ns + 900_000}
            for tag, ns in _FakeLoad.sent_ns.items()
        ]
        return {"records": records}

    def reset(self) -> None:
        pass


@pytest.mark.parametrize("name", RUN_ORDER)
def test_each_scenario_runs_against_fakes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scenario's code runs through with fake processes and adds rows under its own label,
    with a finite figure in each: a broken scenario shows here without a real bench run."""
    modules = [bench.harness.load] + [
        importlib.import_module(f"bench.scenarios.{m}") for m in _scenario_modules()
    ]
    for module in modules:
        for attr, fake in (("Gateway", _FakeRelay), ("Reference", _FakeRelay), ("Load", _FakeLoad)):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, fake)
    instructions = importlib.import_module("bench.scenarios.instructions")
    totals = iter(range(1_000_000, 100_000_000, 1_000_000))
    monkeypatch.setattr(instructions, "shutil", SimpleNamespace(which=lambda cmd: "/bin/" + cmd))
    monkeypatch.setattr(instructions, "callgrind_total", lambda: next(totals))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr(_FakeLoad, "sent_ns", {})

    run = Bench(QUICK, quick=True, log=lambda msg: None)
    SCENARIOS[name].run(run, _FakeMock())  # type: ignore[arg-type]

    own = [row for row in run.rows if row.scenario.split(" ", 1)[1] == name]
    assert own, [row.scenario for row in run.rows]
    for row in own:
        assert row.samples, row.metric
        assert all(math.isfinite(x) for x in row.samples), (row.metric, row.samples)
        assert row.cells()[0] == row.scenario
