"""Sources and progress steps (pure): `SourceIndex` numbers one stream's sources, whatever
dialect reveals them; `progress_step` turns a Perplexity reasoning step into a protocol one."""

from __future__ import annotations

from typing import Any, Final

#: Dropped URLs remembered (so a URL repeated on every chunk is counted once); past this many,
#: further drops are counted each time they are seen in a changed list.
_DROPPED_MEMORY: Final = 4096


class SourceIndex:
    """Numbers one stream's sources: each URL is sent once, with an `index` that never changes.

    The index is what the answer's `[n]` markers refer to. A URL in Perplexity's `citations` gets
    its 1-based position there. Any other URL (only in `search_results`, a `url_citation`
    annotation, a reasoning step's search result) gets the next number after every index given
    and every citation position seen so far, in order of first appearance. Citations normally
    come whole in the first chunk that has them (every capture); if they grow later, a new
    citation keeps its position unless a URL sent earlier already holds that number, in which
    case it takes the next free one (an index, once sent, is never reused or moved).

    At most `limit` sources; further URLs are dropped and counted in `dropped`.
    """

    __slots__ = ("_by_url", "_dropped_urls", "_limit", "_taken", "_top", "dropped")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._by_url: dict[str, int] = {}
        self._taken: set[int] = set()
        #: The highest index given, or citation position seen.
        self._top = 0
        self._dropped_urls: set[str] = set()
        self.dropped = 0

    def perplexity(self, citations: Any, results: Any) -> list[dict[str, Any]]:
        """New sources in Perplexity's cumulative `citations` (URLs) and `search_results`
        (`{title, url, date, snippet, ...}`, merged into the citation of the same URL)."""
        found: list[dict[str, Any]] = []
        info: dict[str, dict[str, Any]] = {}
        if isinstance(results, list):
            for result in results:
                if isinstance(result, dict):
                    url = result.get("url")
                    if isinstance(url, str) and url:
                        info.setdefault(url, result)
        if isinstance(citations, list):
            top = self._top
            self._top = max(top, len(citations))
            for position, url in enumerate(citations, 1):
                if isinstance(url, str) and url and url not in self._by_url:
                    index = position if position not in self._taken else None
                    self._add(found, url, info.get(url), index)
        for url, result in info.items():
            if url not in self._by_url:
                self._add(found, url, result)
        return found

    def reveal(self, url: Any, about: Any = None) -> dict[str, Any] | None:
        """A source by order of first appearance (annotations, search steps), if it is new."""
        if not isinstance(url, str) or not url or url in self._by_url:
            return None
        found: list[dict[str, Any]] = []
        self._add(found, url, about if isinstance(about, dict) else None)
        return found[0] if found else None

    def _add(
        self,
        found: list[dict[str, Any]],
        url: str,
        about: dict[str, Any] | None,
        index: int | None = None,
    ) -> None:
        if len(self._by_url) >= self._limit:
            if url not in self._dropped_urls:
                self.dropped += 1
                if len(self._dropped_urls) < _DROPPED_MEMORY:
                    self._dropped_urls.add(url)
            return
        if index is None:
            index = self._top + 1
        self._top = max(self._top, index)
        self._by_url[url] = index
        self._taken.add(index)
        source: dict[str, Any] = {"index": index, "url": url}
        if about is not None:
            for key in ("title", "snippet", "date"):
                value = about.get(key)
                if isinstance(value, str) and value:
                    source[key] = value
        found.append(source)


def _strings(value: Any) -> list[str]:
    return [x for x in value if isinstance(x, str) and x] if isinstance(value, list) else []


def _pages(value: Any) -> list[dict[str, Any]]:
    """`[{url, title?}]` of a list of search results or fetched pages."""
    pages: list[dict[str, Any]] = []
    if isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                url = item.get("url")
                if isinstance(url, str) and url:
                    title = item.get("title")
                    pages.append(
                        {"url": url, "title": title}
                        if isinstance(title, str) and title
                        else {"url": url}
                    )
    return pages


def progress_step(step: dict[str, Any]) -> dict[str, Any]:
    """A Perplexity reasoning step (`{thought, type, web_search?, fetch_url_content?,
    execute_python?}`, perplexity-py `ReasoningStepOutput`) as a protocol progress step:
    `search` (`queries`, `results`), `fetch` (`urls`), `code` (`code`, `result`), `thought`
    (`text`) or `other` (`type`). The step's thought, when it has one, is its `text`."""
    kind = step.get("type")
    thought = step.get("thought")
    out: dict[str, Any]
    search = step.get("web_search")
    fetch = step.get("fetch_url_content")
    code = step.get("execute_python")
    if isinstance(search, dict) or kind == "web_search":
        search = search if isinstance(search, dict) else {}
        out = {
            "kind": "search",
            "queries": _strings(search.get("search_keywords")),
            "results": _pages(search.get("search_results")),
        }
    elif isinstance(fetch, dict) or kind == "fetch_url_content":
        fetch = fetch if isinstance(fetch, dict) else {}
        out = {"kind": "fetch", "urls": [page["url"] for page in _pages(fetch.get("contents"))]}
    elif isinstance(code, dict) or kind == "execute_python":
        code = code if isinstance(code, dict) else {}
        out = {"kind": "code"}
        for key in ("code", "result"):
            value = code.get(key)
            if isinstance(value, str):
                out[key] = value
    elif kind is None or kind == "thought" or kind == "reasoning":
        out = {"kind": "thought"}
    else:
        out = {"kind": "other"}
        if isinstance(kind, str):
            out["type"] = kind
    if isinstance(thought, str) and thought:
        out["text"] = thought
    elif out["kind"] == "thought":
        out["text"] = ""
    return out
