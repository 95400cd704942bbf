"""Deployment files (deploy/, docs/deploy.md): the Dockerfile and its lock files, the build
context, the compose stack, nginx config, Kubernetes manifests and Grafana dashboard are checked
against the real gateway (its flags, its health endpoints, the metrics it serves, the page it
serves from its package), nginx is run in front of a gateway on loopback (plain and with the TLS
settings, on a certificate made here) and Redis is run with the manifests' own access rules.

nginx and redis-server come from Debian (`apt-get install -y nginx redis-server`); without them
these tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
import trustme
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from redis.exceptions import AuthenticationError, NoPermissionError
from websockets.asyncio.client import connect

from gateway.config import Config, add_serve_arguments, config_from_args
from gateway.core.sse import SSEDecoder
from gateway.io.server import CLOSE_GRACE, Gateway
from gateway.mock import MockUpstream
from tests.conftest import Client, StackFactory, check_stream
from tests.e2e.test_cli import Process
from tests.support import drop, free_port, resume_frame

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx.conf"
NGINX_TLS = DEPLOY / "nginx-tls.conf"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yaml"
RUNTIME_LOCK = DEPLOY / "requirements.lock"
BUILD_LOCK = DEPLOY / "build-requirements.lock"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
#: Manifests in deploy/k8s that `kubectl apply -k` leaves out, and why.
NOT_IN_KUSTOMIZATION = {
    "secret.example.yaml": "fake values; the real Secret is made out of band",
    "podmonitor.yaml": "needs the Prometheus Operator's CRDs",
}
#: The password the tests give compose (it reads REDIS_PASSWORD from the environment).
COMPOSE_REDIS_PASSWORD = "compose-test-0123456789abcdef"
#: Where the image runs: Linux, CPython (markers in the lock files are evaluated for it).
IMAGE_ENVIRONMENT = {
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
}

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


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def redis_container() -> dict[str, Any]:
    pod = k8s_object("Deployment", "llm-ws-gateway-redis")["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == "redis")
    found: dict[str, Any] = container
    return found


def k8s_expand(text: str, defined: dict[str, str]) -> str:
    """`$(NAME)` in an env value or an arg, as Kubernetes expands it: from the variables the
    container's env defines (before it, for env values); `$$` is a literal `$`; an unknown
    name is left as it is."""

    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        return defined.get(match[1], match[0])

    return re.sub(r"\$\$|\$\((\w+)\)", one, text)


def resolved_env(container: dict[str, Any]) -> dict[str, str]:
    """A container's env as its process sees it: values expanded, secretKeyRefs read from the
    Secret example."""
    secret = k8s_object("Secret")
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = k8s_expand(item["value"], env)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def pod_config() -> Config:
    """The Config the gateway container starts with (image env, then the pod's env)."""
    container = gateway_container()
    env = {**dockerfile_env(), **resolved_env(container)}
    return parse_serve(env, [k8s_expand(a, env) for a in container.get("args", [])])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector selects an object with `labels` ({} selects all)."""
    if not labels.items() >= selector.get("matchLabels", {}).items():
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_labels(deployment: str) -> dict[str, str]:
    labels: dict[str, str] = k8s_object("Deployment", deployment)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def network_policies_for(labels: dict[str, str]) -> list[dict[str, Any]]:
    """The specs of the NetworkPolicies (of this namespace) whose podSelector picks `labels`."""
    return [
        o["spec"]
        for o in k8s_objects()
        if o["kind"] == "NetworkPolicy" and selects(o["spec"]["podSelector"], labels)
    ]


def interpolate_compose(value: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation of one string: `$$` is a literal `$`; `${VAR}` and
    `$VAR`; `${VAR:-default}` / `${VAR-default}`; `${VAR:?error}` / `${VAR?error}` fail when
    VAR is unset (or empty, with the colon)."""

    def one(match: re.Match[str]) -> str:
        if match[1]:
            return "$"
        name = match[2] or match[5]
        op, arg = match[3], match[4]
        value = env.get(name)
        if op is None:
            return value or ""
        unset = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset else str(value)
        if unset:
            raise ValueError(f"compose needs ${name}: {arg}")
        return str(value)

    pattern = r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|([A-Za-z_]\w*))"
    return re.sub(pattern, one, value)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_compose(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """deploy/compose.yaml as compose sees it with `env` (by default, REDIS_PASSWORD set)."""
    (doc,) = load_yaml_documents(DEPLOY / "compose.yaml")
    seen: dict[str, Any] = interpolated(
        doc, {"REDIS_PASSWORD": COMPOSE_REDIS_PASSWORD} if env is None else env
    )
    return seen


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
    ending in `# @listen` listens on 127.0.0.1:listen_port, the `# @tls` include reads
    `tmp/tls.d/*.conf` (none unless a test writes one), and temp files go under `tmp`."""
    out: list[str] = []
    gateways_done = listen_done = tls_done = False
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
        if line.rstrip().endswith("# @tls"):
            out.append(f"{indent}include {tmp / 'tls.d'}/*.conf;")
            tls_done = True
            continue
        out.append(line)
        if line.strip() == "http {":
            out.append(f"    client_body_temp_path {tmp / 'client_body'};")
            out.append(f"    proxy_temp_path {tmp / 'proxy'};")
    assert gateways_done, "deploy/nginx.conf lost its '# @gateway' markers"
    assert listen_done, "deploy/nginx.conf lost its '# @listen' marker"
    assert tls_done, "deploy/nginx.conf lost its '# @tls' marker"
    return "\n".join(out) + "\n"


def render_nginx_tls(port: int, cert: Path, key: Path) -> str:
    """deploy/nginx-tls.conf with its markers filled: TLS on 127.0.0.1:port with cert/key."""
    replacements = {
        "# @listen-tls": f"listen 127.0.0.1:{port} ssl;",
        "# @cert": f"ssl_certificate {cert};",
        "# @key": f"ssl_certificate_key {key};",
    }
    out: list[str] = []
    done: set[str] = set()
    for line in NGINX_TLS.read_text(encoding="utf-8").splitlines():
        marker = next((m for m in replacements if line.rstrip().endswith(m)), None)
        if marker:
            out.append(replacements[marker])
            done.add(marker)
        else:
            out.append(line)
    assert done == set(replacements), (
        f"deploy/nginx-tls.conf lost markers: {replacements.keys() - done}"
    )
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
async def running_nginx(
    binary: str, tmp: Path, gateway_ports: list[int], tls: str | None = None
) -> AsyncIterator[int]:
    """Run nginx (foreground, own prefix) in front of `gateway_ports`, with the TLS settings
    `tls` (a rendered deploy/nginx-tls.conf) if given; yield its plain port."""
    port = free_port()
    conf = write_nginx_conf(tmp, port, gateway_ports)
    if tls is not None:
        (tmp / "tls.d").mkdir(exist_ok=True)
        (tmp / "tls.d" / "tls.conf").write_text(tls, encoding="utf-8")
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
        "upstream",
        "code",
        "transport",
        "route",
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


def dockerfile_copies() -> list[str]:
    """The build-context paths that the Dockerfile's COPY instructions read (not --from)."""
    sources: list[str] = []
    for keyword, args in dockerfile_instructions():
        if keyword != "COPY":
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        sources.extend(w for w in words[:-1] if not w.startswith("--"))
    return sources


def docker_glob_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: Go's filepath.Match (`*` and `?` stop at `/`,
    `[...]` classes) plus `**`, any number of directories."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            out.append(pattern[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) for each line of .dockerignore, in order."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((not keep, re.compile(docker_glob_regex(pattern))))
    return rules


def docker_excludes(path: str) -> bool:
    """Whether Docker leaves `path` (relative to the context, with `/`) out of the build
    context: the last rule that matches the path or one of its parent directories decides
    (moby's patternmatcher, MatchesOrParentMatches)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for excludes, regex in dockerignore_rules():
        if any(regex.fullmatch(c) for c in candidates):
            excluded = excludes
    return excluded


def is_build_junk(path: Path) -> bool:
    """Files a checkout may hold that no build needs (bytecode, egg-info)."""
    return any(
        part == "__pycache__" or part.endswith(".egg-info") for part in path.parts
    ) or path.suffix in (".pyc", ".pyo")


def context_files(source: str) -> list[str]:
    """The files (relative, with `/`) that a COPY of `source` reads, build junk left out."""
    path = ROOT / source
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sorted(
        p.relative_to(ROOT).as_posix() for p in files if not is_build_junk(p.relative_to(ROOT))
    )


def lock_pins(path: Path) -> dict[str, tuple[Requirement, list[str]]]:
    """Each requirement of a pip lock file (`name==version ; marker`) with its sha256 hashes,
    by normalised name."""
    text = re.sub(r"\\\s*\n\s*", " ", path.read_text(encoding="utf-8"))
    pins: dict[str, tuple[Requirement, list[str]]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", line)
        requirement = Requirement(re.sub(r"\s--hash=\S+", "", line).strip())
        pins[canonicalize_name(requirement.name)] = (requirement, hashes)
    return pins


def lock_command(path: Path) -> str:
    """The command that made a lock file, from its header."""
    lines = path.read_text(encoding="utf-8").splitlines()
    (index,) = (i for i, line in enumerate(lines) if "autogenerated by uv" in line)
    return lines[index + 1].lstrip("# ").strip()


def image_python() -> str:
    """The Python version (3.x) of the image's base, from its ARG."""
    match = re.fullmatch(
        r"python:(3\.\d+)-slim@sha256:[0-9a-f]{64}", dockerfile_args()["PYTHON_IMAGE"]
    )
    assert match, dockerfile_args()["PYTHON_IMAGE"]
    return match[1]


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def require_binary(name: str, package: str) -> str:
    binary = shutil.which(name) or f"/usr/bin/{name}"
    if not os.access(binary, os.X_OK):
        message = f"{name} is not installed (apt-get install -y {package})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must install it in .ci/run")
        pytest.skip(message)
    return binary


@contextlib.asynccontextmanager
async def running_redis(args: list[str], tmp: Path) -> AsyncIterator[int]:
    """A real redis-server with the given arguments (a manifest's), on a free loopback port;
    yield the port."""
    binary = require_binary("redis-server", "redis-server")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "redis.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary,
            *args,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    if proc.returncode is not None or time.monotonic() > deadline:
                        pytest.fail(
                            f"redis-server did not start: {log.read_text(errors='replace')}"
                        )
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


def on_port(url: str, port: int) -> str:
    """A redis:// URL with its host and port replaced by 127.0.0.1:port (credentials kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def redis_answer(url: str, *command: str) -> Any:
    """One command's reply on a fresh connection (an error reply is raised)."""
    client = aioredis.Redis.from_url(url)
    try:
        return await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def exit_status(argv: list[str], env: dict[str, str]) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return await asyncio.wait_for(proc.wait(), 10)


@pytest.fixture
def nginx_tmp(tmp_path: Path) -> Path:
    """nginx's prefix directory (config, pid, logs, temp files) for one test."""
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    return prefix


# ---------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_manifests_declare_the_expected_kinds() -> None:
    """deploy/k8s holds a Deployment, Service, HPA (autoscaling/v2), PDB, a Secret example, a
    Redis, the NetworkPolicies, a TLS Ingress and a PodMonitor, each with a current apiVersion,
    and kustomization.yaml lists every file but the Secret example and the PodMonitor (whose
    kind exists only with the Prometheus Operator)."""
    kinds = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in k8s_objects()}
    assert kinds >= {
        ("apps/v1", "Deployment", "llm-ws-gateway"),
        ("v1", "Service", "llm-ws-gateway"),
        ("autoscaling/v2", "HorizontalPodAutoscaler", "llm-ws-gateway"),
        ("policy/v1", "PodDisruptionBudget", "llm-ws-gateway"),
        ("v1", "Secret", "llm-ws-gateway"),
        ("apps/v1", "Deployment", "llm-ws-gateway-redis"),
        ("v1", "Service", "llm-ws-gateway-redis"),
        ("networking.k8s.io/v1", "NetworkPolicy", "llm-ws-gateway"),
        ("networking.k8s.io/v1", "NetworkPolicy", "llm-ws-gateway-redis"),
        ("networking.k8s.io/v1", "Ingress", "llm-ws-gateway"),
        ("monitoring.coreos.com/v1", "PodMonitor", "llm-ws-gateway"),
    }
    (kustomization,) = load_yaml_documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - set(NOT_IN_KUSTOMIZATION)
    assert set(NOT_IN_KUSTOMIZATION) <= files


def test_probes_hit_health_endpoints_on_the_container_port() -> None:
    """Readiness probes /readyz and liveness /healthz on the port the gateway listens on."""
    container = gateway_container()
    ports = container_ports(container)
    env = container_env(container)
    assert int(env["GATEWAY_PORT"]["value"]) == ports["http"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if probe in container:
            assert container[probe]["httpGet"]["port"] in ("http", ports["http"])
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


def test_secrets_come_from_the_secret() -> None:
    """The upstream key reaches the pod as PERPLEXITY_API_KEY via secretKeyRef, and every
    secretKeyRef (gateway and Redis) names a key that the Secret example defines (with a fake
    value)."""
    secret = k8s_object("Secret")
    env = container_env(gateway_container())
    key_env = env.get("GATEWAY_API_KEY_ENV", {}).get("value", Config().api_key_env)
    assert key_env == "PERPLEXITY_API_KEY"
    ref = env[key_env]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    items = [*env.values(), *container_env(redis_container()).values()]
    refs = [e["valueFrom"]["secretKeyRef"] for e in items if "valueFrom" in e]
    assert {r["key"] for r in refs} >= {"perplexity-api-key", "jwt-secret", "redis-password"}
    for ref in refs:
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    for value in secret["stringData"].values():
        assert "FAKE" in value
    # Auth is on: the JWT secret variable the gateway is told to read is the one provided.
    assert env["GATEWAY_JWT_SECRET_ENV"]["value"] in env
    for item in items:
        assert "value" in item or "valueFrom" in item
    # The Redis password is never written into a manifest: only referenced.
    for item in items:
        assert secret["stringData"]["redis-password"] not in item.get("value", "")


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


def test_network_policies_let_only_gateways_reach_redis() -> None:
    """Redis (answer text, cancel channels) accepts connections only from gateway pods of its
    own namespace, on its port, and opens none itself."""
    redis = pod_labels("llm-ws-gateway-redis")
    gateway = pod_labels("llm-ws-gateway")
    policies = network_policies_for(redis)
    assert policies, "no NetworkPolicy selects the Redis pods"
    assert any("Ingress" in p["policyTypes"] for p in policies)
    assert any("Egress" in p["policyTypes"] for p in policies)
    redis_ports = {"redis", *container_ports(redis_container()).values()}
    for policy in policies:
        assert not policy.get("egress"), "Redis needs no outgoing connections"
        for rule in policy.get("ingress", []):
            assert rule.get("from"), "a rule without `from` admits everyone"
            assert rule.get("ports"), "a rule without `ports` admits every port"
            assert {p["port"] for p in rule["ports"]} <= redis_ports
            for peer in rule["from"]:
                # Same namespace (no namespaceSelector), no address ranges, gateways only.
                assert set(peer) == {"podSelector"}, peer
                assert selects(peer["podSelector"], gateway)
                assert not selects(peer["podSelector"], redis)
                assert not selects(peer["podSelector"], {"app": "anything-else"})


def test_network_policies_let_only_the_ingress_controller_reach_the_gateways() -> None:
    """Gateway pods accept their WebSocket port only from the ingress controller's pods and
    their metrics port only from Prometheus's, each a pod selector within a named namespace;
    no rule admits every source, every namespace or an address range."""
    gateway = pod_labels("llm-ws-gateway")
    policies = network_policies_for(gateway)
    assert policies, "no NetworkPolicy selects the gateway pods"
    assert any("Ingress" in p["policyTypes"] for p in policies)
    ports = container_ports(gateway_container())
    sources: dict[str, list[dict[str, Any]]] = {}
    for policy in policies:
        for rule in policy.get("ingress", []):
            assert rule.get("from"), "a rule without `from` admits everyone"
            assert rule.get("ports"), "a rule without `ports` admits every port"
            for port in rule["ports"]:
                name = port["port"]
                if isinstance(name, int):
                    (name,) = (n for n, number in ports.items() if number == name)
                assert name in ports, port
                sources.setdefault(name, []).extend(rule["from"])
    assert set(sources) == {"http", "metrics"}, sources
    for peers in sources.values():
        for peer in peers:
            assert set(peer) == {"namespaceSelector", "podSelector"}, peer
            assert peer["namespaceSelector"].get("matchLabels"), peer
            assert peer["podSelector"].get("matchLabels"), peer
    namespaces = {
        name: {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in peers}
        for name, peers in sources.items()
    }
    assert namespaces == {"http": {"ingress-nginx"}, "metrics": {"monitoring"}}


def test_metrics_port_is_scraped_per_pod_and_never_exposed() -> None:
    """/metrics has a named container port of its own (GATEWAY_METRICS_PORT); the Prometheus
    annotation and the PodMonitor point at it; the Service and the Ingress carry only the main
    port, compose publishes neither, and nginx refuses /metrics."""
    container = gateway_container()
    ports = container_ports(container)
    assert set(ports) == {"http", "metrics"}
    assert ports["metrics"] != ports["http"]
    env = container_env(container)
    assert int(env["GATEWAY_METRICS_PORT"]["value"]) == ports["metrics"]
    annotations = k8s_object("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = k8s_object("PodMonitor")["spec"]
    assert selects(monitor["selector"], pod_labels("llm-ws-gateway"))
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("metrics", "/metrics")
    service = k8s_object("Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    service_ports = {p["name"] for p in service["spec"]["ports"]} | {
        p["port"] for p in service["spec"]["ports"]
    }
    for rule in k8s_object("Ingress")["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert set(backend["port"].values()) <= service_ports
    for name, svc in gateway_services(compose()).items():
        port = svc["environment"]["GATEWAY_METRICS_PORT"]
        assert port in svc["expose"], name
        assert not svc.get("ports"), name
    lines = NGINX_CONF.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line.partition("#")[0] for line in lines)
    assert re.search(r"location = /metrics \{\s*return 404;", text)


def test_metrics_port_settings_parse_into_the_gateways_config() -> None:
    """The Deployment's and compose's GATEWAY_METRICS_PORT is the real --metrics-port flag and
    parses into the metrics port the manifests expose."""
    assert known_flag("metrics-port"), "the gateway has no --metrics-port flag"
    metrics_port = container_ports(gateway_container())["metrics"]
    assert pod_config().metrics_port == metrics_port
    for svc in gateway_services(compose()).values():
        config = parse_serve({**dockerfile_env(), **svc["environment"]}, svc["command"])
        assert config.metrics_port == int(svc["environment"]["GATEWAY_METRICS_PORT"])


def test_tls_ingress_routes_websockets_with_long_timeouts() -> None:
    """The Ingress terminates TLS for every host it routes, sends only /v1/ws and the HTTP
    streams (/v1/streams, /v1/ai-sdk) to the Service's main port, and sets ingress-nginx's
    timeouts to the hour nginx.conf uses, unbuffered."""
    ingress = k8s_object("Ingress")
    spec = ingress["spec"]
    assert spec["ingressClassName"]
    hosts = {rule["host"] for rule in spec["rules"]}
    (tls,) = spec["tls"]
    assert set(tls["hosts"]) == hosts
    assert tls["secretName"]
    paths = [(p["path"], p["pathType"]) for r in spec["rules"] for p in r["http"]["paths"]]
    assert paths == [("/v1/ws", "Exact"), ("/v1/streams", "Prefix"), ("/v1/ai-sdk", "Prefix")]
    annotations = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    nginx_text = NGINX_CONF.read_text(encoding="utf-8")
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        seconds = int(annotations[prefix + name])
        directive = name.replace("-", "_")
        assert f"{directive} {seconds}s;" in nginx_text, name
        assert seconds >= 3600
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert annotations[prefix + "force-ssl-redirect"] == "true"
    assert "http_503" in annotations[prefix + "proxy-next-upstream"]


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
    a password-protected Redis, and the Deployment runs with JWT auth, the upstream key from the
    Secret and Redis as its ACL user with the Secret's password."""
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
        assert config.redis_url == f"redis://gateway:{COMPOSE_REDIS_PASSWORD}@redis:6379/0"
        # Secrets stay off the command line, which every local user can read with ps.
        assert not any(COMPOSE_REDIS_PASSWORD in arg for arg in svc["command"])

    secret = k8s_object("Secret")["stringData"]
    container = gateway_container()
    config = pod_config()
    assert config.auth_enabled
    assert config.jwt_secret == secret["jwt-secret"]
    assert config.api_key == secret["perplexity-api-key"]
    assert config.host == "0.0.0.0"
    assert config.port == container_ports(container)["http"]
    redis_service = k8s_object("Service", "llm-ws-gateway-redis")
    (redis_port,) = redis_service["spec"]["ports"]
    assert config.redis_url == (
        f"redis://gateway:{secret['redis-password']}@{redis_service['metadata']['name']}:"
        f"{redis_port['port']}/0"
    )
    assert config.allowed_origins
    assert k8s_expand("a$(X)b$$(X)$(Y)", {"X": "1"}) == "a1b$(X)$(Y)"  # the expansion above


# ---------------------------------------------------------------------------------------------
# compose, Dockerfile


def test_compose_runs_two_gateways_redis_nginx_and_the_mock() -> None:
    """Compose has two gateway replicas built from deploy/Dockerfile (upstream = the mock, Redis
    for resume), Redis, the mock upstream on 8081 and nginx publishing the gateways; nginx is
    new enough to re-resolve the gateways' names."""
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
    # `resolve` in an upstream block needs nginx 1.27.3 or later.
    tag = nginx["image"].removeprefix("nginx:").removesuffix("-alpine")
    assert Version(tag) >= Version("1.27.3"), nginx["image"]
    # nginx's upstream block names exactly the gateway services, on the port they listen on.
    servers = re.findall(r"^\s*server\s+([\w.-]+):(\d+).*# @gateway$", NGINX_CONF.read_text(), re.M)
    assert {host for host, _ in servers} == set(gateways)
    assert {int(port) for _, port in servers} == {Config().port}
    # Only nginx is published, and only on loopback.
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"nginx"}
    assert all(p.startswith("127.0.0.1:") for p in nginx["ports"])


def test_compose_keeps_redis_on_an_internal_network_with_a_password() -> None:
    """In compose only the gateways share a network with Redis (internal: no way out), and the
    stack does not start without REDIS_PASSWORD: there is no default password."""
    doc = compose()
    services = doc["services"]
    gateways = set(gateway_services(doc))
    redis_networks = set(services["redis"]["networks"])
    assert redis_networks
    for network in redis_networks:
        assert doc["networks"][network]["internal"] is True
        sharing = {n for n, svc in services.items() if network in svc.get("networks", [])}
        assert sharing <= gateways | {"redis", "mock"}, sharing
    assert not redis_networks & set(services["nginx"]["networks"])
    for name, svc in services.items():
        assert svc.get("networks"), f"{name} is on the default network, which all share"
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose({})
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        compose({"REDIS_PASSWORD": ""})
    assert interpolate_compose("a$$b ${X:-d} ${Y-e} $X", {"X": "1"}) == "a$b 1 e 1"


def redis_setups(tmp: Path) -> list[tuple[str, list[str], dict[str, str], str, list[str]]]:
    """(where, redis-server args, Redis's env, the gateway's redis URL, the health check) as
    Kubernetes and compose run them; compose with a password of the test's."""
    container = redis_container()
    env = resolved_env(container)
    args = [k8s_expand(arg, env) for arg in container["args"]]
    probe = container["readinessProbe"]["exec"]["command"]
    setups = [("deploy/k8s", args, env, str(pod_config().redis_url), probe)]
    services = compose()["services"]
    command = services["redis"]["command"]
    assert command[0] == "redis-server"
    test = services["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    for svc in gateway_services(compose()).values():
        url = parse_serve({**dockerfile_env(), **svc["environment"]}, svc["command"]).redis_url
        setups.append(
            (
                "compose",
                command[1:],
                services["redis"]["environment"],
                str(url),
                ["sh", "-c", test[1]],
            )
        )
    return setups


async def test_redis_admits_only_the_gateway_user_with_its_password(tmp_path: Path) -> None:
    """redis-server run with the manifests' own arguments refuses anonymous clients and wrong
    passwords, admits the gateway's URL, holds that user to the gw:* keys and the gw:ctl:* and
    gw:usage channels without @dangerous commands, lets it run the usage script; the health
    check passes only with the password."""
    sh = require_binary("sh", "dash")
    require_binary("redis-cli", "redis-tools")
    for index, (where, args, env, url, check) in enumerate(redis_setups(tmp_path)):
        async with running_redis(args, tmp_path / str(index)) as port:
            url = on_port(url, port)
            password = urlsplit(url).password
            assert password, url
            assert await redis_answer(url, "PING") is True, where
            anonymous = f"redis://127.0.0.1:{port}/0"
            with pytest.raises(AuthenticationError):
                await redis_answer(anonymous, "PING")
            with pytest.raises(AuthenticationError):
                await redis_answer(url.replace(f":{password}@", ":wrong@"), "PING")
            assert await redis_answer(url, "SET", "gw:s:probe", "1") is True
            for command in (
                ("GET", "other-app:key"),
                ("KEYS", "*"),
                ("FLUSHALL",),
                ("CONFIG", "GET", "requirepass"),
                ("PUBLISH", "other-channel", "x"),
                ("ACL", "LIST"),
            ):
                with pytest.raises(NoPermissionError):
                    await redis_answer(url, *command)
            assert await redis_answer(url, "PUBLISH", "gw:ctl:probe", "x") == 0
            assert await redis_answer(url, "PUBLISH", "gw:usage", "[]") == 0
            # The usage batches run as a script on the gw:* keys (gateway/io/redis_store.py).
            assert (
                await redis_answer(
                    url, "EVAL", "return redis.call('SET', KEYS[1], '1')", "1", "gw:u:probe"
                )
                == b"OK"
            )
            # The health check, pointed at this port: it passes with the password only.
            argv = [sh if check[0] == "sh" else check[0], *check[1:]]
            argv[-1] = argv[-1].replace("redis-cli", f"redis-cli -p {port}")
            base = {"PATH": os.environ["PATH"]}
            assert await exit_status(argv, {**base, **env}) == 0, where
            assert await exit_status(argv, {**base, "REDISCLI_AUTH": "wrong"}) != 0, where
            assert await exit_status(argv, base) != 0, where
        assert (tmp_path / str(index) / "dump.rdb").exists() is False  # no persistence


async def test_gateways_resume_and_cancel_through_the_redis_acl_user(tmp_path: Path) -> None:
    """Two gateways on a Redis run with deploy/k8s's arguments, logged in as its ACL user: a
    stream started on one and dropped is resumed on the other (replay and live follow), and a
    cancel sent there reaches the owner, which closes the upstream request; neither gateway's
    store ever fails a write for lack of permission."""
    container = redis_container()
    env = resolved_env(container)
    args = [k8s_expand(arg, env) for arg in container["args"]]
    async with running_redis(args, tmp_path) as port:
        url = on_port(str(pod_config().redis_url), port)
        mock = MockUpstream(default_delay_ms=0)
        base = await mock.start()
        gateways: list[Gateway] = []
        clients: list[Client] = []
        try:
            for _ in range(2):
                gateway = Gateway(
                    Config(port=0, redis_url=url, resume_retention=30), f"{base}/perplexity"
                )
                await gateway.start()
                gateways.append(gateway)
            owner, other = gateways
            first = Client(await connect(f"ws://127.0.0.1:{owner.port}/v1/ws"))
            clients.append(first)
            await first.recv()
            await first.start("s", "acl [[mock chunks=400 delay_ms=10 tag=acl]]")
            started = await first.recv_until(lambda f: f["type"] == "started")
            seen = await first.recv_until(lambda f: f["type"] == "text_chunk")
            await drop(first)
            follower = Client(await connect(f"ws://127.0.0.1:{other.port}/v1/ws"))
            clients.append(follower)
            await follower.recv()
            await follower.send(resume_frame("s", started["resume_token"], seen["seq"]))
            resumed = await follower.recv_until(lambda f: f.get("id") == "s")
            assert resumed["type"] == "resumed", resumed
            await follower.recv_until(lambda f: f["type"] == "text_chunk")
            await follower.cancel("s")
            frames = (await follower.finish("s", timeout=20))["s"]
            assert frames[-1]["type"] == "cancelled", frames[-1]
            async with asyncio.timeout(10):
                while mock.record("acl").outcome == "open":  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            assert mock.record("acl").outcome == "client_closed"
            for gateway in gateways:
                assert gateway.store is not None
                assert gateway.store.healthy
        finally:
            for client in clients:
                await client.ws.close()
            for gateway in gateways:
                await gateway.stop()
            await mock.stop()


def test_dockerfile_is_slim_non_root_with_healthcheck() -> None:
    """The image builds on python:3.1x-slim pinned by digest, runs as a non-root user, exposes
    8080, stops with SIGTERM, health-checks /healthz with Python and starts `python -m gateway
    serve` on 0.0.0.0."""
    instructions = dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in instructions:
        by_keyword.setdefault(keyword, []).append(args)
    bases = [re.sub(r"\s+AS\s+\w+$", "", a, flags=re.I) for a in by_keyword["FROM"]]
    assert bases == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"], bases
    # A tag for humans and a digest for the builder (well-formed; the value is checked by the
    # registry at build time: see the TO DO beside it in the Dockerfile).
    image = dockerfile_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.1[1-9]-slim@sha256:[0-9a-f]{64}", image), image
    assert image_python() == "3.11"
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


def test_dockerfile_installs_only_locked_hashed_packages() -> None:
    """The image's Python packages all come from the lock files, with hashes checked and wheels
    only; the project's own wheel is built and installed without the index, then `pip check`
    confirms the venv is consistent."""
    copied = dockerfile_copies()
    runs = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "RUN")
    for lock in (RUNTIME_LOCK, BUILD_LOCK):
        assert lock.relative_to(ROOT).as_posix() in copied, lock.name
        install = re.search(
            r"pip install --require-hashes\s+--only-binary=:all:\s+-r\s+\S*/"
            + re.escape(lock.name),
            runs,
        )
        assert install, f"{lock.name} is not installed with --require-hashes and wheels only"
    for command in re.split(r"&&|;", runs):
        if re.search(r"\bpip (install|wheel)\b", command) and "--require-hashes" not in command:
            assert "--no-index" in command, f"unlocked download: {command.strip()}"
    assert "pip check" in runs


def test_lock_files_pin_pyprojects_dependencies_with_hashes() -> None:
    """deploy/requirements.lock pins every runtime dependency of pyproject.toml (the [fast]
    extra and the extras they ask for included) at a version within its declared range, each
    with sha256 hashes, for the image's Python; deploy/build-requirements.lock does the same for
    the build backend. Regenerate both with the commands in their headers after changing
    pyproject.toml."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    python = image_python()
    environment = {
        **IMAGE_ENVIRONMENT,
        "python_version": python,
        "python_full_version": python + ".0",
    }
    for lock, declared in (
        (RUNTIME_LOCK, [*project["dependencies"], *project["optional-dependencies"]["fast"]]),
        (BUILD_LOCK, pyproject["build-system"]["requires"]),
    ):
        pins = lock_pins(lock)
        assert pins, lock.name
        for name, (pin, hashes) in pins.items():
            assert hashes, f"{lock.name}: {name} has no hash"
            (spec,) = pin.specifier
            assert spec.operator == "==", f"{lock.name}: {pin} is not an exact pin"
        wanted = [Requirement(spec) for spec in declared]
        for requirement in wanted:
            for extra in sorted(requirement.extras):
                # What `name[extra]` adds, from the installed distribution's metadata.
                for dep in importlib.metadata.requires(requirement.name) or []:
                    extra_req = Requirement(dep)
                    marker = extra_req.marker
                    if (
                        marker
                        and marker.evaluate({**environment, "extra": extra})
                        and not marker.evaluate({**environment, "extra": ""})
                    ):
                        wanted.append(extra_req)
        for requirement in wanted:
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock.name} does not pin {requirement}"
            pin, _ = pins[name]
            (spec,) = pin.specifier
            assert requirement.specifier.contains(spec.version, prereleases=True), (
                f"{lock.name}: {pin} is outside pyproject.toml's {requirement}"
            )
            assert pin.marker is None or pin.marker.evaluate(environment), pin
        command = lock_command(lock)
        assert command.startswith("uv pip compile") or "| uv pip compile" in command
        assert "--generate-hashes" in command
        assert f"--python-version {python}" in command, "locked for another Python than the image's"
        assert f"-o {lock.relative_to(ROOT).as_posix()}" in command
    assert "--extra fast" in lock_command(RUNTIME_LOCK)
    # The check can fail: a marker for another platform is told apart.
    assert not Marker("sys_platform == 'win32'").evaluate(environment)


def test_dockerignore_keeps_the_context_small_but_buildable() -> None:
    """.dockerignore drops the venvs, VCS, node_modules, bytecode, test artifacts, bench results
    and the rest of deploy/, and excludes no file that the Dockerfile copies: pyproject.toml,
    README.md, the two lock files and gateway/ with all its package data."""
    for excluded in (
        ".venv/bin/python",
        ".venv-python3.12/bin/python",
        ".git/config",
        "test-artifacts/x.log",
        "bench/results/run.json",
        "clients/js/node_modules/ws/index.js",
        "gateway/web/node_modules/x.js",
        "gateway/io/__pycache__/server.cpython-311.pyc",
        "deploy/compose.yaml",
        "tests/e2e/test_deploy.py",
        ".env",
    ):
        assert docker_excludes(excluded), excluded
    for kept in ("pyproject.toml", "README.md", "gateway/web/index.html", "gateway/web/x/y.md"):
        assert not docker_excludes(kept), kept
    needed = [path for source in dockerfile_copies() for path in context_files(source)]
    assert "gateway/__init__.py" in needed
    assert "deploy/requirements.lock" in needed
    dropped = [path for path in needed if docker_excludes(path)]
    assert not dropped, f".dockerignore drops files the image copies: {dropped}"


def test_package_data_covers_every_file_of_the_package() -> None:
    """Every file in gateway/ that is not Python source (the page, its scripts, vendored
    libraries and their licences) is matched by pyproject.toml's package-data, so the wheel the
    image installs carries it, and lies in a directory the Dockerfile copies."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    packages = [p.parent for p in (ROOT / "gateway").rglob("__init__.py")]
    covered: set[Path] = set()
    for key, patterns in package_data.items():
        dirs = packages if key == "*" else [ROOT / key.replace(".", "/")]
        for directory in dirs:
            for pattern in patterns:
                covered.update(p for p in directory.glob(pattern) if p.is_file())
    data = [
        p
        for p in (ROOT / "gateway").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyi") and not is_build_junk(p)
    ]
    assert data, "the package has no data files (gateway/web/ holds the demo page)"
    missing = sorted(p.relative_to(ROOT).as_posix() for p in data if p not in covered)
    assert not missing, f"not in pyproject.toml's package-data, so not in the wheel: {missing}"
    copied = dockerfile_copies()
    assert all(
        any(p.relative_to(ROOT).as_posix().startswith(c + "/") for c in copied) for p in data
    )


def build_context(tmp: Path) -> Path:
    """A copy of what the Dockerfile copies from the build context, .dockerignore applied."""
    context = tmp / "context"
    for source in dockerfile_copies():
        for path in (ROOT / source).rglob("*") if (ROOT / source).is_dir() else [ROOT / source]:
            relative = path.relative_to(ROOT).as_posix()
            if path.is_file() and not docker_excludes(relative):
                target = context / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return context


def page_references(base: str, content_type: str, body: str) -> set[str]:
    """Same-origin paths a page or a script loads: src/href attributes, ES module imports."""
    if "html" in content_type:
        found = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"'#?]+)""", body)
    elif "javascript" in content_type:
        found = re.findall(r"""(?:\bfrom\s*|\bimport\s*\(?\s*)["']([^"'#?]+)["']""", body)
    else:
        return set()
    paths = set()
    for reference in found:
        url = urlsplit(urljoin(base, reference))
        if url.netloc == urlsplit(base).netloc and url.scheme in ("http", "https"):
            paths.add(url.path)
    return paths


async def test_the_image_serves_the_page_and_everything_it_loads(tmp_path: Path) -> None:
    """A gateway run from a copy of the image's build context (what the Dockerfile copies, less
    .dockerignore) serves the demo page, and every script, style sheet and module it loads,
    transitively, answers 200: nothing the page needs lives outside the package."""
    context = build_context(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON"))}
    env.pop("PERPLEXITY_API_KEY", None)
    # The copy is what runs, not the checkout (nor its editable install).
    where = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import gateway; print(gateway.__file__)",
        cwd=context,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(where.communicate(), 30)
    assert Path(out.decode().strip()).is_relative_to(context), out
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--port",
        "0",
        "--log-format",
        "json",
        cwd=context,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    process = Process(proc)
    try:
        listening = await process.wait_for("gateway.listening")
        origin = "http://" + urlsplit(listening["url"]).netloc
        seen: dict[str, int] = {}
        queue = ["/"]
        async with aiohttp.ClientSession() as session:
            while queue:
                path = queue.pop()
                if path in seen:
                    continue
                async with session.get(origin + path) as response:
                    seen[path] = response.status
                    body = await response.text(errors="replace")
                    queue.extend(
                        page_references(
                            origin + path, response.headers.get("Content-Type", ""), body
                        )
                    )
        assert len(seen) > 1, "the page loads nothing from the gateway?"
        missing = {path: status for path, status in seen.items() if status != 200}
        assert not missing, f"the image would not serve: {missing}"
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


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
        "gateway_upstream_requests_total",
        "gateway_upstream_failures_total",
        "gateway_upstream_fallbacks_total",
        "gateway_upstream_breaker_state",
        "gateway_upstream_ttft_seconds_bucket",
        "gateway_transport_streams_total",
        "gateway_http_requests_total",
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
    upgrades /v1/ws over HTTP/1.1 unbuffered with hour-long timeouts, and re-resolves the
    gateways' names while it runs (Docker's DNS, `resolve` in a zone-backed upstream)."""
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
    # A restarted gateway container gets a new address: nginx must look its name up again.
    assert re.search(r"^\s*resolver 127\.0\.0\.11 valid=\d+s\b", text, re.M)
    upstream = re.search(r"upstream gateway \{(.*?)\}", text, re.S)
    assert upstream
    assert re.search(r"^\s*zone gateway \d+k;", upstream[1], re.M)
    gateway_lines = [line for line in lines if line.rstrip().endswith("# @gateway")]
    assert gateway_lines
    assert all(re.search(r"\sresolve;", line) for line in gateway_lines), gateway_lines
    binary = require_nginx()
    # (Debian's nginx predates `resolve`; the rendered file has loopback addresses instead.)
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


async def test_nginx_relays_http_streams_unbuffered_and_resumable(
    make_stack: StackFactory, nginx_tmp: Path
) -> None:
    """Through a real nginx, POST /v1/streams streams its SSE events as they come (not in one
    burst at the end), and a response cut off mid-way resumes with GET, exactly once."""
    binary = require_nginx()
    stack = await make_stack()
    async with running_nginx(binary, nginx_tmp, [stack.gateway.port]) as port:
        url = f"http://127.0.0.1:{port}/v1/streams"
        prompt = "Why is the sky blue? [[mock chunks=8 delay_ms=120]]"
        async with aiohttp.ClientSession() as session:
            response = await session.post(url, json={"prompt": prompt, "id": "n"})
            assert response.status == 200
            decoder = SSEDecoder()
            arrivals: list[tuple[float, dict[str, Any]]] = []
            async with asyncio.timeout(20):
                async for data in response.content.iter_any():
                    for event in decoder.feed(data):
                        arrivals.append((time.monotonic(), orjson.loads(event.data)))
                    if len([m for _, m in arrivals if m["type"] == "text_chunk"]) == 3:
                        break
            response.close()  # the network drops it after three chunks
            started = arrivals[0][1]
            chunks = [m for _, m in arrivals if m["type"] == "text_chunk"]
            times = [t for t, m in arrivals if m["type"] == "text_chunk"]
            assert times[-1] - times[0] > 0.15  # spread out: not buffered by nginx
            headers = {
                "X-Resume-Token": started["resume_token"],
                "Last-Event-ID": str(chunks[-1]["seq"]),
            }
            async with session.get(f"{url}/n", headers=headers) as resumed:
                assert resumed.status == 200
                decoder = SSEDecoder()
                rest = [orjson.loads(e.data) for e in decoder.feed(await resumed.read())]
        assert rest[0]["type"] == "resumed"
        chunks += [m for m in rest if m["type"] == "text_chunk"]
        assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
        assert "".join(c["text"] for c in chunks) == rest[-1]["text"]
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


# ---------------------------------------------------------------------------------------------
# docs/protocol.md


async def test_protocol_routes_table_is_what_the_gateway_answers(make_stack: StackFactory) -> None:
    """Each path in docs/protocol.md's table of HTTP paths answers a live gateway's GET with the
    status the table gives first for it (a plain GET of /v1/ws, without an upgrade, gets 426),
    and a path the table does not name gets 404."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    section = text[text.index("## Connecting") :]
    rows = re.findall(r"^\| `(/[^`]*)` \| ([^|]+) \|$", section, re.M)
    table = {path: answer for path, answer in rows}
    assert {"/v1/ws", "/healthz", "/readyz", "/", "/js/index.js", "/metrics"} <= set(table)
    assert re.search(r"^\| anything else \| `404`", section, re.M)
    stack = await make_stack()
    async with aiohttp.ClientSession() as session:
        for path, answer in [*table.items(), ("/no-such-path", "`404`")]:
            async with session.get(f"http://127.0.0.1:{stack.gateway.port}{path}") as response:
                expected = int(re.findall(r"`(\d{3})\b", answer)[-1 if path == "/v1/ws" else 0])
                assert response.status == expected, (path, answer)


def test_rediss_example_in_the_docs_verifies_the_server() -> None:
    """The `rediss://` URL docs/deploy.md gives for a managed Redis, set as GATEWAY_REDIS_URL,
    makes the gateway's Redis client speak TLS, require a certificate and check its name."""
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    match = re.search(r"GATEWAY_REDIS_URL=(rediss://[^`\s]+)", text)
    assert match, "docs/deploy.md has no rediss:// example"
    url = parse_serve({"GATEWAY_REDIS_URL": match[1]}, []).redis_url
    assert url == match[1]
    pool = aioredis.Redis.from_url(match[1]).connection_pool
    connection: Any = pool.make_connection()  # type: ignore[no-untyped-call]
    assert connection.__class__.__name__ == "SSLConnection"
    context = connection.ssl_context
    assert context.cert_reqs == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_compose_tls_override_mounts_the_tls_settings_nginx_includes() -> None:
    """deploy/compose.tls.yaml mounts deploy/nginx-tls.conf where nginx.conf's `# @tls` include
    looks, and the certificate directory where nginx-tls.conf reads its files, and publishes the
    TLS port nginx-tls.conf listens on, on loopback only."""
    (override,) = load_yaml_documents(DEPLOY / "compose.tls.yaml")
    nginx = override["services"]["nginx"]
    mounts = {}
    for volume in nginx["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[target] = (DEPLOY / source).resolve()
    (include,) = [line for line in NGINX_CONF.read_text().splitlines() if line.endswith("# @tls")]
    pattern = re.search(r"include (\S+);", include)
    assert pattern
    tls_targets = [t for t, s in mounts.items() if s == NGINX_TLS]
    assert len(tls_targets) == 1
    assert posixpath.dirname(tls_targets[0]) == posixpath.dirname(pattern[1])
    assert re.fullmatch(docker_glob_regex(posixpath.basename(pattern[1])), "tls.conf")
    text = NGINX_TLS.read_text()
    files = re.findall(r"^ssl_certificate(?:_key)? (\S+);", text, re.M)
    assert len(files) == 2
    for file in files:
        assert posixpath.dirname(file) in mounts, file
    (listen,) = re.findall(r"^listen (\d+) ssl;", text, re.M)
    (published,) = nginx["ports"]
    address, host_port, container_port = published.split(":")
    assert (address, container_port) == ("127.0.0.1", listen)
    assert host_port


async def test_nginx_terminates_tls_for_websocket_streams(
    make_stack: StackFactory, nginx_tmp: Path
) -> None:
    """deploy/nginx-tls.conf, included into deploy/nginx.conf's server with a certificate made
    here, passes `nginx -t`; through that nginx a wss:// client gets the upgrade (101) and an
    answer streamed chunk by chunk (the same location and hour-long timeouts as ws://), and
    /healthz answers over https."""
    binary = require_nginx()
    text = "\n".join(line.partition("#")[0] for line in NGINX_TLS.read_text().splitlines())
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = nginx_tmp / "tls.crt", nginx_tmp / "tls.key"
    issued.private_key_pem.write_to_path(str(key))
    for index, blob in enumerate(issued.cert_chain_pems):
        blob.write_to_path(str(cert), append=index > 0)
    tls_port = free_port()
    snippet = render_nginx_tls(tls_port, cert, key)
    (nginx_tmp / "tls.d").mkdir()
    (nginx_tmp / "tls.d" / "tls.conf").write_text(snippet, encoding="utf-8")
    conf = write_nginx_conf(nginx_tmp, free_port(), [free_port()])
    args = nginx_args(binary, nginx_tmp, conf)
    args.insert(1, "-t")
    check = await asyncio.create_subprocess_exec(*args, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(check.communicate(), 30)
    assert check.returncode == 0, stderr.decode()
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    stack = await make_stack()
    async with running_nginx(binary, nginx_tmp, [stack.gateway.port], tls=snippet):
        ws = await connect(f"wss://127.0.0.1:{tls_port}/v1/ws", ssl=client_tls)
        client = Client(ws)
        stack.clients.append(client)
        assert ws.response is not None
        assert ws.response.status_code == 101
        assert (await client.recv())["type"] == "welcome"
        await client.start("s1", "Why is the sky blue? [[mock chunks=6 delay_ms=100]]")
        arrivals: list[float] = []
        async with asyncio.timeout(20):
            while True:
                frame = await client.recv()
                if frame["type"] == "text_chunk":
                    arrivals.append(time.monotonic())
                if frame["type"] in ("done", "cancelled", "error"):
                    break
        assert check_stream(client.by_id["s1"])
        assert len(arrivals) >= 4
        assert arrivals[-1] - arrivals[0] > 0.25  # streamed, not buffered into one burst
        await ws.close()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"https://127.0.0.1:{tls_port}/healthz", ssl=client_tls) as response,
        ):
            assert response.status == 200
    await stack.assert_no_leaks()
