"""Every code block in README.md and clients/*/README.md runs as pasted, against a live gateway
started the way the README says (`make run`), and prints the answer it promises.

How a block runs follows its language and an optional annotation, an HTML comment on the line
before the fence (invisible on GitHub):

- `sh`: `bash -e` at the repository root, with `.venv/bin` first on PATH (the venv active) and
  `GATEWAY_URL` (the command-line client's default URL) pointing at the test gateway;
- `python`: saved to a file and run with `.venv/bin/python` at the repository root;
- `js`: saved as a module in the directory it names (`<!-- doctest: cwd=clients/js -->`) and
  run with `node`;
- `html`: a page in Chromium on the gateway's own origin (`<!-- doctest: browser -->`);
- `<!-- doctest: server -->`: the block that starts the gateway; it must be `make run`, which
  this module runs once for all the others;
- `<!-- doctest: venv -->`: in a fresh virtualenv of its own (blocks that `pip install`);
- `<!-- doctest: skip=REASON -->`: not run, and the reason is required (an API synopsis
  whose names are placeholders).
Blocks without a language are text (a file tree), not code.

The only change made to a block is the gateway's port: `127.0.0.1:8080` becomes the port the
test gateway listens on. A block that streams answers must print them: for every question in
it, the first word of the mock upstream's answer must appear in its output, and for at least
one question the answer's whole first sentence, word by word in order.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import venv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.mock import choose_answer
from tests.support import free_port

#: The repository's own files (docs, deployment, packaging, the page): checked once by `make test`,
#: not again on other Pythons or dependency floors (`make test-min`, `make test-python`).
pytestmark = pytest.mark.repo

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "clients/python/README.md", "clients/js/README.md")
LANGUAGES = {"sh", "python", "js", "html"}
#: Longest any one block may take (a fresh venv's pip install is the slowest).
BLOCK_TIMEOUT = 180
CHROMIUM = Path("/usr/bin/chromium")

_FENCE = re.compile(r"^```(\S*)\s*$")
_ANNOTATION = re.compile(r"^<!--\s*doctest:\s*(?P<args>.*?)\s*-->\s*$")
_QUESTION = re.compile(r"[\"'](?P<q>(?:Why|How|What|Tell me)\b[^\"'\n]*)[\"']")
_WORD = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    code: str
    mode: str  # run | server | venv | browser | skip
    cwd: str
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def parse_annotation(args: str) -> dict[str, str]:
    """`server`, `venv`, `browser`, `cwd=DIR`, `skip=REASON` (the reason runs to the end)."""
    out: dict[str, str] = {}
    rest = args.strip()
    while rest:
        if rest.startswith("skip="):
            out["skip"] = rest[len("skip=") :].strip()
            break
        word, _, rest = rest.partition(" ")
        key, _, value = word.partition("=")
        out[key] = value
        rest = rest.strip()
    return out


def extract(doc: str, text: str) -> list[Block]:
    """The fenced code blocks of `text`, with how each is to be run."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        lang = fence.group(1)
        annotation = _ANNOTATION.match(lines[i - 1]) if i else None
        args = parse_annotation(annotation.group("args")) if annotation else {}
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = "\n".join(lines[i + 1 : end]) + "\n"
        if lang:
            unknown = set(args) - {"server", "venv", "browser", "cwd", "skip"}
            assert not unknown, f"{doc}:{i + 1}: unknown doctest annotation {unknown}"
            mode = next((m for m in ("skip", "server", "venv", "browser") if m in args), "run")
            blocks.append(
                Block(doc, i + 1, lang, code, mode, args.get("cwd", ""), args.get("skip", ""))
            )
        i = end + 1
    return blocks


BLOCKS = [b for doc in DOCS for b in extract(doc, (ROOT / doc).read_text(encoding="utf-8"))]


def test_the_docs_have_blocks_in_known_languages_and_skips_say_why() -> None:
    assert len(BLOCKS) >= 10
    for block in BLOCKS:
        assert block.lang in LANGUAGES, f"{block.id}: a ```{block.lang} block cannot be run"
        if block.mode == "skip":
            assert len(block.reason) > 15, f"{block.id}: a skipped block must say why"
        if block.mode == "browser":
            assert block.lang == "html", block.id
        if block.cwd:
            assert (ROOT / block.cwd).is_dir(), f"{block.id}: no directory {block.cwd}"
        if "pip install" in block.code and block.mode not in ("venv", "skip"):
            pytest.fail(f"{block.id}: a block that pip installs runs in a venv of its own")


def test_the_mock_knows_every_question_the_docs_ask() -> None:
    """The examples' output reads right: the mock upstream answers each question the docs
    show with an answer about it, not a canned one on another subject."""
    for block in BLOCKS:
        for match in _QUESTION.finditer(block.code):
            question = match.group("q")
            answer = choose_answer(question)
            assert set(words(question)) & answer.keywords, (
                f"{block.id}: the mock has no answer about {question!r}"
            )


def test_the_extractor_reads_annotations_and_languages() -> None:
    text = (
        "intro\n<!-- doctest: cwd=clients/js -->\n```js\nconsole.log(1)\n```\n"
        "```\ntree/\n```\n<!-- doctest: skip=an API synopsis with placeholders -->\n"
        "```python\nf(x)\n```\n"
    )
    js, py = extract("x.md", text)
    assert (js.lang, js.mode, js.cwd, js.code, js.line) == (
        "js",
        "run",
        "clients/js",
        "console.log(1)\n",
        3,
    )
    assert (py.mode, py.reason) == ("skip", "an API synopsis with placeholders")


# ------------------------------------------------------------------ the live gateway


@dataclass
class Live:
    port: int

    def localize(self, code: str) -> str:
        return code.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """`make run`, as the README says, on a free port (GATEWAY_PORT), with no API key: the
    built-in mock upstream. Ready once it logs `gateway.listening`."""
    for block in BLOCKS:
        if block.mode == "server":
            commands = [ln.split("#")[0].strip() for ln in block.code.splitlines()]
            assert [c for c in commands if c] == ["make run"], block.id
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.update(GATEWAY_PORT=str(port), GATEWAY_LOG_FORMAT="json")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if "gateway.listening" in line:
            break
    else:
        proc.wait()
        pytest.fail("`make run` ended before listening:\n" + "".join(seen[-30:]))
    try:
        yield Live(port)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


# ------------------------------------------------------------------ running the blocks


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def in_order(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(w == n for w in it) for n in needles)


def check_answers(block: Block, output: str) -> None:
    """Every question of the block got its answer's first word, and one its first sentence."""
    questions = [m.group("q") for m in _QUESTION.finditer(block.code)]
    if not questions:
        return
    said = words(output)
    sentences = []
    for question in questions:
        answer = choose_answer(question).text
        first, *_ = words(answer)
        assert first in said, f"{block.id}: no answer to {question!r} in:\n{output[-2000:]}"
        sentences.append(words(answer.split(". ")[0]))
    assert any(in_order(s, said) for s in sentences), (
        f"{block.id}: no answer arrived whole:\n{output[-2000:]}"
    )


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"exit {done.returncode}:\n{output[-3000:]}"
    return output


def shell_env(bin_dir: Path, live: Live) -> dict[str, str]:
    """The venv `bin_dir` active; `gateway-client`'s default URL ($GATEWAY_URL, documented) the
    test gateway's."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["GATEWAY_URL"] = f"ws://127.0.0.1:{live.port}/v1/ws"
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    return env


RUNNABLE = [b for b in BLOCKS if b.mode not in ("skip", "server")]


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs_as_pasted(block: Block, live: Live, tmp_path: Path) -> None:
    code = live.localize(block.code)
    cwd = ROOT / block.cwd
    if block.mode == "browser":
        output = run_in_browser(code, live)
    elif block.mode == "venv":
        venv.create(tmp_path / "venv", with_pip=True)
        output = run(["bash", "-e", "-c", code], cwd, shell_env(tmp_path / "venv" / "bin", live))
    elif block.lang == "sh":
        output = run(["bash", "-e", "-c", code], cwd, shell_env(ROOT / ".venv" / "bin", live))
    elif block.lang == "python":
        script = tmp_path / "example.py"
        script.write_text(code, encoding="utf-8")
        output = run([str(ROOT / ".venv" / "bin" / "python"), str(script)], cwd)
    elif block.lang == "js":
        assert shutil.which("node"), "node is needed for the JavaScript examples"
        script = cwd / f".doctest-{os.getpid()}-{block.line}.mjs"
        script.write_text(code, encoding="utf-8")
        try:
            output = run(["node", script.name], cwd)
        finally:
            script.unlink()
    else:  # pragma: no cover - test_the_docs_have_blocks_in_known_languages says why not
        pytest.fail(f"{block.id}: no way to run a ```{block.lang} block")
    check_answers(block, output)


def run_in_browser(html: str, live: Live) -> str:
    """Serve `html` as a page of the gateway's origin (so its `/js/index.js` and `/v1/ws` are
    the gateway's) and return the page's text once a stream has arrived."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            pytest.fail("the playwright package is not installed")
        pytest.skip("the playwright package is not installed")
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing (CI installs it: see .ci/run)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    origin = f"http://127.0.0.1:{live.port}"
    page_html = f"<!doctype html><html><head><meta charset=utf-8></head><body>{html}</body></html>"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            # A page fulfilled by the test has no address space of its own, so Chromium's
            # local-network checks would treat it as public and block its loopback WebSocket.
            args=["--no-sandbox", "--disable-gpu", "--disable-features=LocalNetworkAccessChecks"],
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.route(
                f"{origin}/doctest.html",
                lambda route: route.fulfill(status=200, content_type="text/html", body=page_html),
            )
            page.goto(f"{origin}/doctest.html")
            # The answer's last words: the stream has arrived whole.
            question = _QUESTION.search(html)
            assert question is not None
            last = choose_answer(question.group("q")).text.split()[-1]
            page.wait_for_function(
                "last => document.body.innerText.includes(last)", arg=last, timeout=15_000
            )
            assert not errors, errors
            text: str = page.inner_text("body")
        finally:
            browser.close()
    return text


if __name__ == "__main__":  # pragma: no cover - a listing for humans
    for block in BLOCKS:
        print(block.id, block.lang, block.mode, block.cwd or ".", block.reason, file=sys.stdout)
