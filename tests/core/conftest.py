"""The pure core's tests: marked `pure`, so that `make test-min` and `make test-python` (which
run the suite against the oldest dependency releases and on other Pythons) leave them out: the
core imports no dependency but orjson (import contracts in pyproject.toml), and they run once in
`make test`."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).parent == _HERE:
            item.add_marker(pytest.mark.pure)
