"""The fault-injection suite: real gateway processes against the mock upstream's fault knobs and
misbehaving clients, checking after every scenario that nothing leaked or hung.

    .venv/bin/python -m tests.faults            # the short suite (also run by `make test`)
    .venv/bin/python -m tests.faults --full     # `make faults`: 1,000 abrupt closes and more

Layout: `procs` starts and observes the processes, `client` is the protocol client and the
per-stream invariant check, `context` is what a run works with, `scenarios` is the list of
scenarios (data), `runner` runs them and checks for leaks. docs/reliability.md has the policies
and the table of the last full run.
"""
