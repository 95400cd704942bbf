"""`make bench`: the entry point. The harness is in bench/harness/ (its CLI: harness/cli.py), one
module per scenario in bench/scenarios/; bench/README.md says what each scenario measures.

    .venv/bin/python bench/run.py --help
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts bench/ on the path, not the repository root, where `bench` is
# a package (a namespace package: it is no part of the gateway's distribution).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
