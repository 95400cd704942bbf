"""Deployment files (deploy/, docs/deploy.md): the Dockerfile, compose stack, nginx config,
Kubernetes manifests and Grafana dashboard are checked against the real gateway (its flags, its
health endpoints, the metrics it serves), and nginx is run in front of a gateway on loopback.

nginx comes from Debian (`apt-get install -y nginx`); without it these tests skip locally and
fail under CI=true.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from packaging.version import Version
from websockets.asyncio.client import connect

from gateway.config import Config, add_serve_arguments, config_from_args
from gateway.io.server import CLOSE_GRACE
from tests.conftest import Client, StackFactory, check_stream
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx.conf"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yaml"

GATEWAY_LABELS = {
    "app.kubernetes.io/name": "llm-ws-gateway",
    "app.kubernetes.io/component": "gateway",
}


# ---------------------------------------------------------------------------------------------
# helpers


def serve_flags() -> set[str]:
    """Every `serve` flag name without dashes (`drain-timeout`), from the real parser."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, {})
    return {
        option[2:]
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def env_to_flag(name: str) -> str:
    return name.removeprefix("GATEWAY_").lower().replace("_", "-")


def known_flag(flag: str) -> bool:
    return flag in serve_flags()


def parse_serve(environ: dict[str, str], argv: list[str]) -> Config:
    """The Config that `python -m gateway serve ARGV` builds in a process with `environ`."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, environ)
    return config_from_args(parser.parse_args(argv), environ)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = value
    return env


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def k8s_objects() -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        objects.extend(load_yaml_documents(path))
    return objects


def k8s_object(kind: str, name: str = "llm-ws-gateway") -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name} in deploy/k8s, found {len(found)}"
    return found[0]


def gateway_container() -> dict[str, Any]:
    containers = k8s_object("Deployment")["spec"]["template"]["spec"]["containers"]
    (container,) = (c for c in containers if c["name"] == "gateway")
    return container


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def compose() -> dict[str, Any]:
    (doc,) = load_yaml_documents(DEPLOY / "compose.yaml")
    return doc


def gateway_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services that run `gateway serve` from the project's image."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if "build" in svc and "entrypoint" not in svc
    }


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    pairs = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_nginx() -> str:
    binary = nginx_binary()
    if binary is None:
        message = "nginx is not installed (apt-get install -y nginx)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it in .ci/run")
        pytest.skip(message)
    return binary


def render_nginx_conf(listen_port: int, gateway_ports: list[int], tmp: Path) -> str:
    """deploy/nginx.conf with its template markers filled for loopback (see its header).

    Lines ending in `# @gateway` become one `server 127.0.0.1:PORT;` per gateway, the line
    ending in `# @listen` listens on 127.0.0.1:listen_port, and temp files go under `tmp`."""
    out: list[str] = []
    gateways_done = listen_done = False
    for line in NGINX_CONF.read_text(encoding="utf-8").splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        if line.rstrip().endswith("# @gateway"):
            if not gateways_done:
                out.extend(f"{indent}server 127.0.0.1:{port};" for port in gateway_ports)
                gateways_done = True
            continue
        if line.rstrip().endswith("# @listen"):
            out.append(f"{indent}listen 127.0.0.1:{listen_port};")
            listen_done = True
            continue
        out.append(line)
        if line.strip() == "http {":
            out.append(f"    client_body_temp_path {tmp / 'client_body'};")
            out.append(f"    proxy_temp_path {tmp / 'proxy'};")
    assert gateways_done, "deploy/nginx.conf lost its '# @gateway' markers"
    assert listen_done, "deploy/nginx.conf lost its '# @listen' marker"
    return "\n".join(out) + "\n"


def write_nginx_conf(tmp: Path, listen_port: int, gateway_ports: list[int]) -> Path:
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(render_nginx_conf(listen_port, gateway_ports, tmp), encoding="utf-8")
    return conf


def nginx_args(binary: str, tmp: Path, conf: Path) -> list[str]:
    return [
        binary,
        "-p",
        str(tmp),
        "-c",
        str(conf),
        "-e",
        str(tmp / "logs" / "error.log"),
        "-g",
        f"daemon off; pid {tmp / 'nginx.pid'};",
    ]


@contextlib.asynccontextmanager
async def running_nginx(binary: str, tmp: Path, gateway_ports: list[int]) -> AsyncIterator[int]:
    """Run nginx (foreground, own prefix) in front of `gateway_ports`; yield its port."""
    port = free_port()
    conf = write_nginx_conf(tmp, port, gateway_ports)
    with (tmp / "logs" / "stdout.log").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *nginx_args(binary, tmp, conf), stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    if proc.returncode is not None or time.monotonic() > deadline:
                        logs = [tmp / "logs" / "error.log", tmp / "logs" / "stdout.log"]
                        text = "".join(p.read_text(errors="replace") for p in logs if p.exists())
                        pytest.fail(f"nginx did not start: {text}")
                    await asyncio.sleep(0.05)
                else:
                    writer.close()
                    await writer.wait_closed()
                    break
            yield port
        finally:
            if proc.returncode is None:
                proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


PROMQL_WORDS = frozenset(
    {
        "sum",
        "by",
        "without",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "label_values",
        "max",
        "min",
        "avg",
        "count",
        "le",
        "job",
        "instance",
        "outcome",
        "reason",
        "status",
        "dialect",
        "generation",
        "deriv",
        "avg_over_time",
        "and",
        "on",
    }
)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, braces and ranges that
    are neither functions, keywords, label names nor Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)  # ranges
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", expr):
        word = match.group(1)
        if word not in PROMQL_WORDS:
            names.add(word)
    return names


def exported_names(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of this exposition yields (counters get _total, ...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "untyped": ("",),
        "unknown": ("",),
    }
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + suffix for suffix in suffixes[kind])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture
def nginx_tmp(tmp_path: Path) -> Path:
    """nginx's prefix directory (config, pid, logs, temp files) for one test."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    return prefix


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_manifests_declare_the_expected_kinds() -> None:
    """deploy/k8s holds a Deployment, Service, HPA (autoscaling/v2), PDB, a Secret example and a
    Redis, each with a current apiVersion, and kustomization.yaml lists every file but the
    Secret example."""
    kinds = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    assert kinds >= {
        ("apps/v1", "Deployment", "llm-ws-gateway"),
        ("v1", "Service", "llm-ws-gateway"),
        ("autoscaling/v2", "HorizontalPodAutoscaler", "llm-ws-gateway"),
        ("policy/v1", "PodDisruptionBudget", "llm-ws-gateway"),
        ("v1", "Secret", "llm-ws-gateway"),
        ("apps/v1", "Deployment", "llm-ws-gateway-redis"),
        ("v1", "Service", "llm-ws-gateway-redis"),
    }
    (kustomization,) = load_yaml_documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - {"secret.example.yaml"}


def test_probes_hit_health_endpoints_on_the_container_port() -> None:
    """Readiness probes /readyz and liveness /healthz on the port the gateway listens on."""
    container = gateway_container()
    (port,) = container["ports"]
    env = container_env(container)
    assert int(env["GATEWAY_PORT"]["value"]) == port["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    assert env["GATEWAY_HOST"]["value"] == "0.0.0.0"


def test_termination_grace_outlasts_prestop_and_drain() -> None:
    """terminationGracePeriodSeconds covers the preStop sleep, the gateway's drain timeout and
    its final socket-close grace, so SIGKILL never cuts a drain short."""
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    container = gateway_container()
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    sleep = float(command[1])
    assert 1 <= sleep <= 15
    env = container_env(container)
    drain = float(env["GATEWAY_DRAIN_TIMEOUT"]["value"]) if "GATEWAY_DRAIN_TIMEOUT" in env else 30
    assert Config().drain_timeout == 30  # the default this test falls back on
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + CLOSE_GRACE


def test_upstream_key_and_jwt_secret_come_from_the_secret() -> None:
    """The upstream key reaches the pod as PERPLEXITY_API_KEY via secretKeyRef, and every
    secretKeyRef names a key that the Secret example defines (with a fake value)."""
    secret = k8s_object("Secret")
    env = container_env(gateway_container())
    key_env = env.get("GATEWAY_API_KEY_ENV", {}).get("value", Config().api_key_env)
    assert key_env == "PERPLEXITY_API_KEY"
    ref = env[key_env]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    refs = [e["valueFrom"]["secretKeyRef"] for e in env.values() if "valueFrom" in e]
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    for value in secret["stringData"].values():
        assert "FAKE" in value
    # Auth is on: the JWT secret variable the gateway is told to read is the one provided.
    assert env["GATEWAY_JWT_SECRET_ENV"]["value"] in env
    for item in env.values():
        assert "value" in item or "valueFrom" in item


def test_pod_runs_non_root_with_read_only_root_and_resources() -> None:
    """The gateway pod runs as non-root with a read-only root filesystem, no privilege
    escalation, a writable /tmp, and CPU requests (the HPA's utilisation needs them)."""
    pod = k8s_object("Deployment")["spec"]["template"]["spec"]
    container = gateway_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]


def test_hpa_scales_the_gateway_deployment_on_cpu() -> None:
    """The HPA targets the gateway Deployment by apiVersion, kind and name, on CPU."""
    hpa = k8s_object("HorizontalPodAutoscaler")["spec"]
    deployment = k8s_object("Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]


def test_pdb_and_service_select_exactly_the_gateway_pods() -> None:
    """The PDB, the Service and the Deployment selector match the gateway pod labels and not
    the Redis pods."""
    deployment = k8s_object("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    redis_labels = k8s_object("Deployment", "llm-ws-gateway-redis")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert labels.items() >= GATEWAY_LABELS.items()
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        k8s_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        k8s_object("Service")["spec"]["selector"],
    ]
    for selector in selectors:
        assert labels.items() >= selector.items()
        assert not redis_labels.items() >= selector.items()
    pdb = k8s_object("PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < deployment["spec"]["replicas"]


def test_deploy_files_use_only_real_gateway_flags() -> None:
    """Every GATEWAY_* variable and --flag in the Dockerfile, compose and Kubernetes files is a
    real `gateway serve` flag."""
    used: dict[str, str] = {}
    for item in gateway_container()["env"]:
        used[item["name"]] = "deploy/k8s/deployment.yaml"
    for arg in gateway_container().get("args", []):
        if arg.startswith("--"):
            used[arg] = "deploy/k8s/deployment.yaml"
    for name, svc in gateway_services(compose()).items():
        for key in svc.get("environment", {}):
            used[key] = f"compose service {name}"
        for arg in svc.get("command", []):
            if arg.startswith("--"):
                used[arg] = f"compose service {name}"
    for name in dockerfile_env():
        used[name] = "deploy/Dockerfile"
    unknown = []
    for name, where in used.items():
        if name.startswith("--"):
            flag = name[2:].partition("=")[0]
        elif name.startswith("GATEWAY_"):
            flag = env_to_flag(name)
        else:
            continue  # PERPLEXITY_API_KEY, JWT_SECRET, PATH, PYTHON*: not flags
        if not known_flag(flag):
            unknown.append(f"{name} ({where})")
    assert not unknown, f"not gateway flags: {unknown}"
    assert not known_flag("no-such-flag")  # the check can fail


def test_container_configurations_start_the_gateway_as_intended() -> None:
    """The image's, compose's and the Deployment's settings parse into the intended Config: the
    bare image refuses to serve without an auth choice, compose runs open against the mock with
    Redis, and the Deployment runs with JWT auth and the upstream key from the Secret."""
    image_env = dockerfile_env()
    bare = parse_serve(image_env, [])
    assert bare.host == "0.0.0.0"
    assert not bare.auth_enabled
    assert not bare.insecure_no_auth  # Gateway.check_exposure refuses this combination

    for svc in gateway_services(compose()).values():
        config = parse_serve({**image_env, **svc["environment"]}, svc["command"])
        assert config.insecure_no_auth
        assert config.host == "0.0.0.0"
        assert config.port == 8080
        assert config.upstream_url == "http://mock:8081/perplexity"
        assert config.dialect == "perplexity"
        assert config.redis_url == "redis://redis:6379/0"

    secret = k8s_object("Secret")["stringData"]
    container = gateway_container()
    pod_env = dict(image_env)
    for item in container["env"]:
        if "value" in item:
            pod_env[item["name"]] = item["value"]
        else:
            pod_env[item["name"]] = secret[item["valueFrom"]["secretKeyRef"]["key"]]
    config = parse_serve(pod_env, container.get("args", []))
    assert config.auth_enabled
    assert config.jwt_secret == secret["jwt-secret"]
    assert config.api_key == secret["perplexity-api-key"]
    assert config.host == "0.0.0.0"
    assert config.port == container["ports"][0]["containerPort"]
    assert config.redis_url
    assert config.allowed_origins


# ---------------------------------------------------------------------------------------------
# compose, Dockerfile


def test_compose_runs_two_gateways_redis_nginx_and_the_mock() -> None:
    """Compose has two gateway replicas built from deploy/Dockerfile (upstream = the mock, Redis
    for resume), Redis, the mock upstream on 8081 and nginx publishing the gateways."""
    doc = compose()
    services = doc["services"]
    gateways = gateway_services(doc)
    assert len(gateways) == 2, sorted(gateways)
    assert {"redis", "nginx", "mock"} <= services.keys()
    for svc in gateways.values():
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert (context / "pyproject.toml").is_file()
        assert (context / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        args = svc["command"]
        assert args[args.index("--upstream-url") + 1] == "http://mock:8081/perplexity"
        assert args[args.index("--redis-url") + 1] == "redis://redis:6379/0"
        assert svc["environment"]["GATEWAY_INSECURE_NO_AUTH"] == "1"
        assert {"redis", "mock"} <= set(svc["depends_on"])
        grace = int(svc["stop_grace_period"].removesuffix("s"))
        drain = float(svc["environment"].get("GATEWAY_DRAIN_TIMEOUT", Config().drain_timeout))
        assert grace >= drain + CLOSE_GRACE
    mock = services["mock"]
    assert mock["entrypoint"] == ["python", "-m", "gateway", "mock-upstream"]
    assert mock["command"] == ["--host", "0.0.0.0", "--port", "8081"]
    assert services["redis"]["image"].startswith("redis:")
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert set(gateways) <= set(nginx["depends_on"])
    # nginx's upstream block names exactly the gateway services, on the port they listen on.
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+).*# @gateway$", NGINX_CONF.read_text(), re.M)
    assert {host for host, _ in servers} == set(gateways)
    assert {int(port) for _, port in servers} == {Config().port}
    # Only nginx is published, and only on loopback.
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"nginx"}
    assert all(p.startswith("127.0.0.1:") for p in nginx["ports"])


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    """The image builds on python:3.1x-slim, runs as a non-root user, exposes 8080, stops with
    SIGTERM, health-checks /healthz with Python and starts `python -m gateway serve` on
    0.0.0.0."""
    instructions = dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in instructions:
        by_keyword.setdefault(keyword, []).append(args)
    bases = [re.sub(r"\s+AS\s+\w+$", "", a, flags=re.I) for a in by_keyword["FROM"]]
    assert all(b in ("python:${PYTHON_VERSION}-slim",) for b in bases), bases
    assert any(re.fullmatch(r"PYTHON_VERSION=3\.1[1-9]", a) for a in by_keyword["ARG"])
    (user,) = by_keyword["USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["python", "-m", "gateway", "serve"]
    assert by_keyword["EXPOSE"] == ["8080"]
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    env = dockerfile_env()
    assert env["GATEWAY_HOST"] == "0.0.0.0"
    assert "GATEWAY_INSECURE_NO_AUTH" not in env  # the operator chooses auth or insecure
    (healthcheck,) = by_keyword["HEALTHCHECK"]
    command = json.loads(healthcheck.partition("CMD ")[2])
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    ast.parse(command[2])


async def test_dockerfile_healthcheck_passes_against_a_live_gateway(
    make_stack: StackFactory,
) -> None:
    """The HEALTHCHECK command exits 0 against a running gateway on GATEWAY_PORT and non-zero
    when nothing listens."""
    by_keyword = dict(dockerfile_instructions())
    code = json.loads(by_keyword["HEALTHCHECK"].partition("CMD ")[2])[2]
    stack = await make_stack()

    async def run(port: int) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env={**os.environ, "GATEWAY_PORT": str(port)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return await asyncio.wait_for(proc.wait(), 10)

    assert await run(stack.gateway.port) == 0
    assert await run(free_port()) != 0


def test_dockerignore_keeps_the_context_small_but_buildable() -> None:
    """.dockerignore drops the venv, VCS, node_modules, test artifacts and bench results, and
    keeps what the Dockerfile copies (pyproject.toml, README.md, gateway/)."""
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".venv", ".git", "test-artifacts", "bench/results"):
        assert excluded in patterns or excluded.split("/")[0] in patterns, excluded
    assert any("node_modules" in p for p in patterns)
    for kept in ("pyproject.toml", "README.md", "gateway"):
        assert kept not in patterns


# ---------------------------------------------------------------------------------------------
# Grafana


async def test_dashboard_queries_only_metrics_the_gateway_exports(make_stack: StackFactory) -> None:
    """Every metric the Grafana dashboard queries is in a live gateway's GET /metrics (counters
    as *_total, histograms as *_bucket), the dashboard covers every gateway metric family that
    operators need, and all panels use the datasource variable."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    stack = await make_stack()
    client = Client(await connect(stack.url))
    stack.clients.append(client)
    await client.recv()
    await client.start("s1", "metrics [[mock chunks=3]]")
    await client.finish("s1")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{stack.gateway.port}/metrics") as response,
    ):
        assert response.status == 200
        exposition = await response.text()
    exported = exported_names(exposition)
    exprs = dashboard_exprs(dashboard)
    queried = set().union(*(metric_names(e) for e in exprs))
    assert queried, exprs
    assert queried <= exported, sorted(queried - exported)
    required = {
        "gateway_open_sockets",
        "gateway_active_streams",
        "gateway_streams_started_total",
        "gateway_streams_ended_total",
        "gateway_upstream_chunks_total",
        "gateway_upstream_bytes_total",
        "gateway_upstream_responses_total",
        "gateway_upstream_retries_total",
        "gateway_time_to_first_chunk_seconds_bucket",
        "gateway_stream_duration_seconds_bucket",
        "gateway_cancel_latency_seconds_bucket",
        "gateway_coalesced_deltas_total",
        "gateway_slow_client_closes_total",
        "gateway_rejected_connections_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_gc_collections_total",
        "python_gc_objects_collected_total",
        "gateway_resume_retained_bytes",
        "gateway_resume_retained_streams",
        "gateway_gc_full_collection_seconds_bucket",
    }
    assert required <= queried, sorted(required - queried)
    # The alert rule examples query only exported metrics too, and each is a complete rule.
    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [rule for group in alerts["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in rules} >= {"GatewayMemoryGrowing", "GatewayUncollectableObjects"}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"warning", "critical"}
        names = metric_names(rule["expr"])
        assert "gateway_open_sockets" in names, rule["alert"]  # held to gateway targets
        assert names <= exported, sorted(names - exported)
    for histogram in ("time_to_first_chunk", "stream_duration", "cancel_latency"):
        assert any(
            "histogram_quantile(" in e and f"gateway_{histogram}_seconds_bucket" in e for e in exprs
        )
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    ids = []
    for panel in panels(dashboard["panels"]):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
    assert len(ids) == len(set(ids))


def test_metric_name_extraction_ignores_functions_labels_and_variables() -> None:
    """The PromQL scan used above finds metric names only (not functions, labels, strings,
    ranges or Grafana variables)."""
    expr = (
        'histogram_quantile(0.95, sum by (le, dialect) (rate(gateway_x_bucket{job=~"$job", '
        'outcome="done"}[$__rate_interval]))) / process_open_fds{instance=~"$instance"}'
    )
    assert metric_names(expr) == {"gateway_x_bucket", "process_open_fds"}
    assert metric_names('label_values(gateway_open_sockets{job=~"$job"}, instance)') == {
        "gateway_open_sockets"
    }


# ---------------------------------------------------------------------------------------------
# nginx


def test_nginx_config_templates_to_a_valid_config(nginx_tmp: Path) -> None:
    """deploy/nginx.conf, its markers filled with loopback ports, passes `nginx -t`; it
    upgrades /v1/ws over HTTP/1.1 unbuffered with hour-long timeouts."""
    lines = NGINX_CONF.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line.partition("#")[0] for line in lines)  # directives, not comments
    for directive in (
        "proxy_http_version 1.1;",
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_buffering off;",
        "proxy_read_timeout 3600s;",
        "proxy_send_timeout 3600s;",
        "location = /v1/ws",
        "location = /healthz",
        "client_max_body_size",
    ):
        assert directive in text, directive
    # No sticky sessions: resume works on any instance.
    assert "ip_hash" not in text
    assert "sticky" not in text
    binary = require_nginx()
    conf = write_nginx_conf(nginx_tmp, free_port(), [free_port(), free_port()])
    args = nginx_args(binary, nginx_tmp, conf)
    args.insert(1, "-t")
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


async def test_nginx_relays_websocket_streams_unbuffered(
    make_stack: StackFactory, nginx_tmp: Path
) -> None:
    """Through a real nginx on loopback the upgrade succeeds (101), an answer streams chunk by
    chunk (the first chunk arrives well before the stream ends), /healthz passes through and
    /metrics is not exposed."""
    binary = require_nginx()
    stack = await make_stack()
    async with running_nginx(binary, nginx_tmp, [stack.gateway.port]) as port:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/ws")
        client = Client(ws)
        stack.clients.append(client)
        assert ws.response is not None
        assert ws.response.status_code == 101
        welcome = await client.recv()
        assert welcome["type"] == "welcome"
        await client.start("s1", "Why is the sky blue? [[mock chunks=8 delay_ms=120]]")
        arrivals: list[tuple[float, str]] = []
        async with asyncio.timeout(20):
            while True:
                frame = await client.recv()
                arrivals.append((time.monotonic(), frame["type"]))
                if frame["type"] in ("done", "cancelled", "error"):
                    break
        text = check_stream(client.by_id["s1"])
        assert text
        chunk_times = [t for t, kind in arrivals if kind == "text_chunk"]
        assert len(chunk_times) >= 4
        # Unbuffered: chunks are spread over the answer's ~1 s, not delivered in one burst.
        assert arrivals[-1][0] - chunk_times[0] > 0.4
        assert chunk_times[-1] - chunk_times[0] > 0.3
        await ws.close()
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
                assert (await response.text()).strip() == "ok"
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 404
    await stack.assert_no_leaks()


def test_min_versions_are_pyprojects_floors() -> None:
    """tests/min-versions.txt, which `make test-min` (and CI) runs the suite against, pins
    exactly the `>=` floor of every runtime dependency in pyproject.toml, uvloop included: a
    range that is declared is a range that is tested."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors: dict[str, Version] = {}
    for spec in [*project["dependencies"], *project["optional-dependencies"]["fast"]]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([^,]+),<.+", spec)
        assert match, f"{spec}: every dependency has a floor and a ceiling"
        floors[match[1].lower()] = Version(match[2])
    pins: dict[str, Version] = {}
    for line in (ROOT / "tests" / "min-versions.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version)
    assert pins == floors
