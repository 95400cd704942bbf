"""docs/openapi.yaml is the HTTP side as the gateway serves it: a well-formed OpenAPI 3.1
document whose references all resolve (into docs/asyncapi.yaml for the shared message schemas),
whose examples are valid, and whose every operation a live gateway answers with a status the
document lists for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import StackFactory
from tests.schema import document as asyncapi_document

pytestmark = pytest.mark.repo

DOCS = Path(__file__).resolve().parents[1] / "docs"
OPENAPI = DOCS / "openapi.yaml"
BASE = "https://llm-ws-gateway.invalid/docs/"


def openapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    return doc


def registry() -> Registry[Any]:
    return Registry().with_resources(
        [
            (BASE + "openapi.yaml", Resource.from_contents(openapi(), DRAFT202012)),
            (BASE + "asyncapi.yaml", Resource.from_contents(asyncapi_document(), DRAFT202012)),
        ]
    )


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


def test_the_document_is_openapi_3_1_and_every_reference_resolves() -> None:
    """Every `$ref` points at something, in this file or in asyncapi.yaml."""
    doc = openapi()
    assert doc["openapi"].startswith("3.1")
    resolver = registry().resolver(BASE + "openapi.yaml")
    found = refs(doc)
    assert found
    for ref in found:
        assert resolver.lookup(ref).contents is not None, ref


def test_the_start_example_is_a_valid_start_body() -> None:
    """The POST /v1/streams example is valid against StartBody (and the Options it refers to),
    and a body with `type` or an unknown field is not."""
    doc = openapi()
    schema = {"$ref": BASE + "openapi.yaml#/components/schemas/StartBody"}
    validator = Draft202012Validator(schema, registry=registry())
    example = doc["paths"]["/v1/streams"]["post"]["requestBody"]["content"]["application/json"][
        "example"
    ]
    validator.validate(example)
    assert not validator.is_valid({"type": "start", "prompt": "x"})
    assert not validator.is_valid({"prompt": "x", "options": {"stream": False}})


#: A request per documented operation: (headers, body) that a live gateway answers.
REQUESTS: dict[tuple[str, str], tuple[dict[str, str], Any]] = {
    ("/v1/streams", "post"): ({}, {"prompt": "Why is the sky blue? [[mock chunks=2]]"}),
    ("/v1/streams", "options"): ({"Origin": "http://127.0.0.1:1"}, None),
    ("/v1/streams/{id}", "get"): ({"X-Resume-Token": "unknown"}, None),
    ("/v1/streams/{id}", "delete"): ({"X-Resume-Token": "unknown"}, None),
    ("/v1/ai-sdk/chat", "post"): (
        {},
        {
            "id": "c",
            "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": "Why?"}]}],
        },
    ),
    ("/v1/ai-sdk/chat/{chatId}/stream", "get"): ({}, None),
    ("/v1/ai-sdk/chat/{chatId}/stream", "delete"): ({}, None),
    ("/v1/models", "get"): ({}, None),
    ("/v1/usage", "get"): ({}, None),
}


async def test_every_documented_operation_is_answered_as_documented(
    make_stack: StackFactory,
) -> None:
    """Each path and method of the document gets, from a live gateway, a status it lists."""
    doc = openapi()
    operations = {
        (path, method)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "post", "delete", "options")
    }
    assert operations == set(REQUESTS)
    stack = await make_stack()
    base = f"http://127.0.0.1:{stack.gateway.port}"
    async with aiohttp.ClientSession() as http:
        for (path, method), (headers, body) in sorted(REQUESTS.items()):
            url = base + path.replace("{id}", "x").replace("{chatId}", "c")
            async with http.request(method.upper(), url, headers=headers, json=body) as response:
                await response.read()
                listed = doc["paths"][path][method]["responses"]
                assert str(response.status) in listed, (path, method, response.status)
