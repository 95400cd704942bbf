"""The architecture is checked by tools, not kept by convention (docs/architecture.md): import
contracts (pyproject.toml, import-linter) and, since import-linter cannot name an external
package's submodules, an AST scan for reaches into dependencies' internals outside
gateway/io/seams/."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"
SEAMS = GATEWAY / "io" / "seams"

#: Private modules of our dependencies.
PRIVATE_MODULES = (
    "aiohttp.streams",
    "aiohttp.client_proto",
    "aiohttp.base_protocol",
    "aiohttp.http_parser",
    "aiohttp._http_parser",
    "websockets.streams",
    "websockets.legacy",
)
#: Attributes of dependencies' objects that are private layout (what the seams use).
PRIVATE_ATTRIBUTES = {"_conns", "gi_yieldfrom", "gi_code", "parser_exc", "_reading_paused"}


def reaches(path: Path) -> list[str]:
    """The reaches into dependencies' internals in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [f"imports {n}" for n in names if n.startswith(PRIVATE_MODULES)]
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"reads .{node.attr}")
        if isinstance(node, ast.Constant) and node.value in PRIVATE_ATTRIBUTES:
            found.append(f"names {node.value!r}")  # getattr(x, "_conns")
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in targets):
                found.append("assigns __class__")
    return [f"{path.relative_to(GATEWAY.parent)}: {what}" for what in found]


def test_only_the_seams_reach_into_dependencies_internals() -> None:
    """Outside gateway/io/seams/ no module imports a dependency's private module, reads its
    private layout or swaps an object's class; the seams do (the scan finds them there)."""
    outside = [
        reach
        for path in sorted(GATEWAY.rglob("*.py"))
        if SEAMS not in path.parents
        for reach in reaches(path)
    ]
    assert not outside, outside
    inside = [reach for path in sorted(SEAMS.rglob("*.py")) for reach in reaches(path)]
    assert any("__class__" in r for r in inside), inside  # the scan does see them
    assert any("websockets.streams" in r for r in inside), inside


def test_the_import_contracts_hold() -> None:
    """lint-imports keeps every contract in pyproject.toml: a pure core, no dependency on the
    mock, no import cycles (type-only imports included)."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is not installed (pip install -e '.[test]')"
    result = subprocess.run(
        [lint, "--no-cache"],
        cwd=GATEWAY.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
