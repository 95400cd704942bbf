"""The bench harness: everything but the scenarios themselves (bench/scenarios/).

- procs: the processes (mock upstream, gateway, reference bridge), cores, CPU time and RSS
- load: workload sizes, the Node load generators, the shared workloads and the warm-up
- measure: host CPU steal, percentiles, callgrind instruction counts
- report: table rows, verdicts, the machine header, the Markdown table
- context: the `Bench` a scenario adds its rows to, and the `Scenario` interface
- profile: py-spy of the gateway on the throughput and paced workloads
- cli: the command line (bench/run.py), which runs the registered scenarios in order

This package imports nothing from bench.scenarios except the registry, in cli: keep it so
(no import cycle; tests/test_bench_smoke.py checks).
"""
