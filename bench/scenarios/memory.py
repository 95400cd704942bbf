"""5. memory: gateway RSS (/proc/PID/statm) per idle socket, with and without permessage-deflate
offered by the client, and per active stream over the same sockets idle."""

from __future__ import annotations

import time

from bench.harness.context import Bench, Scenario
from bench.harness.load import Load, warmup
from bench.harness.procs import Gateway, Mock, running


def run(bench: Bench, mock: Mock) -> None:
    s = bench.s
    small, large = s.mem_small, s.mem_large
    variants = (
        ("client offers no compression", False, (), (small, large)),
        # Declined deflate costs what no deflate costs, and the large count takes long (the
        # gateway's CPU per handshake, docs/performance.md): the small count only.
        ("client offers permessage-deflate, gateway declines", True, (), (small,)),
        (
            "client offers permessage-deflate, gateway --compression",
            True,
            ("--compression",),
            (small, large),
        ),
    )
    for label, deflate, extra, counts in variants:
        for n in counts:
            per: list[float] = []
            accepted = 0
            for i in range(s.mem_repeats if n < 5000 else 1):
                gw = Gateway(mock.url, *extra)
                with running(gw):
                    warmup(gw)
                    time.sleep(0.3)
                    before = gw.rss_bytes()
                    # At most ~100 handshakes in flight (the gateway's listen backlog
                    # is 4096, but a burst of handshakes all time out together).
                    procs = 2 if n >= 2000 else 1
                    load = Load(
                        {
                            "mode": "idle",
                            "url": gw.url,
                            "sockets": n,
                            "deflate": deflate,
                            "connect_batch": 100 // procs,
                        },
                        procs=procs,
                    )
                    try:
                        opened = sum(r["sockets"] for r in load.ready)
                        accepted = sum(r.get("deflate_accepted", 0) for r in load.ready)
                        time.sleep(1.0)
                        after = gw.rss_bytes()
                    finally:
                        load.send("stop")
                        load.results()
                if opened < 0.99 * n:
                    raise RuntimeError(f"memory: opened only {opened} of {n} sockets")
                if opened != n:
                    bench.notes.append(
                        f"memory, {label}: {n - opened} of {n:,} handshakes failed twice "
                        f"(timeouts under the connect burst); per-socket RSS divides by the "
                        f"{opened:,} open ones"
                    )
                per.append((after - before) / opened / 1024)
                bench.log(
                    f"  memory {label}, {n} sockets #{i + 1}: {per[-1]:.1f} KiB/socket "
                    f"(rss {before / 2**20:.0f} -> {after / 2**20:.0f} MiB, deflate "
                    f"accepted on {accepted})"
                )
            target = ("<=", 12.0, "") if n == s.mem_large and not extra else None
            bench.row(
                "5 memory",
                f"RSS per idle socket, {n:,} sockets, {label}",
                "KiB",
                per,
                target,
                note=f"deflate negotiated on {accepted}/{n}" if deflate else "",
            )
    _active_memory(bench, mock)


def _active_memory(bench: Bench, mock: Mock) -> None:
    s = bench.s
    n = s.active_streams
    per: list[float] = []
    for i in range(s.mem_repeats):
        gw = Gateway(mock.url)
        with running(gw):
            warmup(gw)
            load = Load(
                {
                    "mode": "ws",
                    "url": gw.url,
                    "sockets": n // 5,
                    "streams": 5,
                    "hold": True,
                    "stagger_ms": 1000,
                    "prompt": "[[mock fast=1 chunks=1000 rate=2]] bench memory",
                }
            )
            try:
                time.sleep(0.5)
                idle = gw.rss_bytes()
                load.send("go")
                load.wait("active")
                time.sleep(1.5)
                active = gw.rss_bytes()
            finally:
                load.send("stop")
                load.results()
        per.append((active - idle) / n / 1024)
        bench.log(
            f"  memory active #{i + 1}: {per[-1]:.1f} KiB/stream "
            f"(rss {idle / 2**20:.0f} -> {active / 2**20:.0f} MiB)"
        )
    bench.row(
        "5 memory",
        f"RSS per active stream ({n} streams at 2 chunks/s on {n // 5} sockets, "
        "over the same sockets idle)",
        "KiB",
        per,
        note="includes the upstream HTTP connection and its aiohttp state",
    )


SCENARIO = Scenario(
    "memory",
    "gateway RSS per idle socket (with and without deflate) and per active stream",
    run,
)
