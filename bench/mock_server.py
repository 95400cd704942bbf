"""Run the mock upstream for the benchmark: `python bench/mock_server.py --port P`.

Like `python -m gateway mock-upstream`, but on uvloop (as the gateway runs), keeping more
records (the cancel scenario reads `ended_ns` of the cancelled streams); the benchmark's streams
use the fast mode (`[[mock fast=1 ...]]`, see `Knobs` in gateway/mock/knobs.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.mock import MockUpstream


async def main(port: int) -> None:
    mock = MockUpstream(default_delay_ms=0.0, max_records=50_000)
    url = await mock.start("127.0.0.1", port)
    print(f"mock upstream listening on {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await mock.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(main(args.port))
    except KeyboardInterrupt:
        sys.exit(0)
