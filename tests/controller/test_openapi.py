"""``GET /v1/openapi.json`` describes every route of the app and nothing else, validates
as OpenAPI 3.1, and links the wire contract's JSON Schemas with references that resolve."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from pydantic import BaseModel
from redis.asyncio import Redis

from contracts.schema import schemas
from controller import openapi
from controller.app import create_app
from controller.settings import ControllerSettings

P = 4
HOW_TO = "add an entry for it to controller.openapi.OPERATIONS (see docs/api.md, 'Documenting a new route')"


@dataclass
class Served:
    app: web.Application
    session: ClientSession

    async def get(self, path: str) -> tuple[int, str, Any]:
        async with self.session.get(path) as response:
            return response.status, response.content_type, orjson.loads(await response.read())


@pytest.fixture
async def served(redis: Redis, redis_url: str) -> AsyncIterator[Served]:
    app = create_app(ControllerSettings(redis_url=redis_url, partitions=P, consumer="openapi-tests", block_ms=50))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with ClientSession(base_url=str(server.make_url(""))) as session:
            yield Served(app, session)
    finally:
        await server.close()


@pytest.fixture
async def doc(served: Served) -> dict[str, Any]:
    status, content_type, body = await served.get("/v1/openapi.json")
    assert (status, content_type) == (200, "application/json")
    assert isinstance(body, dict)
    return body


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route registered in the app, aiohttp's implicit HEAD left out."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(doc: dict[str, Any], pointer: str) -> Any:
    assert pointer.startswith("#/"), f"{pointer} does not point into the document"
    node: Any = doc
    for part in pointer[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), f"{pointer} does not resolve (nothing under {part!r})"
        assert part in node, f"{pointer} does not resolve (no {part!r})"
        node = node[part]
    return node


def inline(node: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """``node`` with every ``$ref`` replaced by what it points to in ``root`` (the schemas are not recursive)."""
    assert depth < 50, "recursive schema"
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            rest = {key: inline(value, root, depth) for key, value in node.items() if key != "$ref"}
            return {**inline(resolve(root, node["$ref"]), root, depth + 1), **rest}
        return {key: inline(value, root, depth) for key, value in node.items() if key != "$defs"}
    if isinstance(node, list):
        return [inline(value, root, depth) for value in node]
    return node


# --- no drift -------------------------------------------------------------------------


async def test_every_route_of_the_app_is_documented(served: Served, doc: dict[str, Any]) -> None:
    routes = app_routes(served.app)

    assert routes - documented(doc) == set()
    undocumented = sorted(
        f"{method.upper()} {path}"
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if operation.get("x-undocumented")
    )
    assert undocumented == [], f"undocumented routes: {undocumented}; {HOW_TO}"
    assert openapi.undocumented(openapi.routes_of(served.app.router)) == [], HOW_TO


async def test_every_documented_route_exists(served: Served, doc: dict[str, Any]) -> None:
    routes = app_routes(served.app)

    assert documented(doc) - routes == set()
    assert openapi.unrouted(openapi.routes_of(served.app.router)) == [], (
        "controller.openapi.OPERATIONS documents routes the app does not have"
    )


async def test_every_operation_has_a_summary_a_unique_id_its_path_parameters_and_a_problem_default(
    doc: dict[str, Any],
) -> None:
    ids: list[str] = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            where = f"{method.upper()} {path}"
            assert operation["summary"], where
            ids.append(operation["operationId"])
            in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert in_path == set(openapi.path_parameters(path)), where
            assert operation["responses"]["default"] == {"$ref": "#/components/responses/Problem"}, where
            assert any(status.startswith("2") for status in operation["responses"]), where
    assert len(ids) == len(set(ids))


# --- a valid document whose references resolve ------------------------------------------


async def test_the_document_validates_as_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


async def test_every_ref_resolves_within_the_document(doc: dict[str, Any]) -> None:
    found = set(refs(doc))

    assert found
    for pointer in sorted(found):
        resolve(doc, pointer)


async def test_the_document_served_is_the_one_built_from_the_route_table(served: Served, doc: dict[str, Any]) -> None:
    from controller.api import _OperatorRequestIn, _PurgeIn

    bodies: dict[str, type[BaseModel]] = {"OperatorRequest": _OperatorRequestIn, "DeadLetterPurge": _PurgeIn}
    built = openapi.document(openapi.routes_of(served.app.router), bodies)

    assert orjson.loads(orjson.dumps(built)) == doc


# --- the contracts, linked ------------------------------------------------------------


async def test_every_contract_schema_is_a_component_that_means_what_v1_contracts_serves(
    served: Served, doc: dict[str, Any]
) -> None:
    status, _, contracts = await served.get("/v1/contracts")
    assert status == 200
    components = doc["components"]["schemas"]

    assert set(contracts) == set(schemas())
    for name, schema in contracts.items():
        component = components[name]
        assert component["externalDocs"]["url"] == "/v1/contracts"
        assert schema["$id"] in component["externalDocs"]["description"]
        served_meaning = inline({k: v for k, v in schema.items() if k not in ("$schema", "$id")}, schema)
        documented_meaning = inline({k: v for k, v in component.items() if k != "externalDocs"}, doc)
        assert documented_meaning == served_meaning, name
    contracts_reply = doc["paths"]["/v1/contracts"]["get"]["responses"]["200"]["content"]["application/json"]
    linked = resolve(doc, contracts_reply["schema"]["$ref"])["properties"]
    assert linked == {name: {"$ref": f"#/components/schemas/{name}"} for name in contracts}


async def test_request_bodies_come_from_the_models_that_validate_them(doc: dict[str, Any]) -> None:
    def body(method: str, path: str) -> dict[str, Any]:
        request_body: dict[str, Any] = doc["paths"][path][method]["requestBody"]
        return request_body

    order = body("post", "/v1/orders")
    assert order["required"] is True
    assert order["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OrderIn"}
    assert resolve(doc, "#/components/schemas/OrderIn")["additionalProperties"] is False
    for path in ("/v1/workflows/{id}/cancel", "/v1/workflows/{id}/retry"):
        operator = body("post", path)
        assert operator["required"] is False
        schema = resolve(doc, operator["content"]["application/json"]["schema"]["$ref"])
        assert set(schema["properties"]) == {"by", "reason"}
    purge = resolve(doc, body("post", "/v1/dead-letters/purge")["content"]["application/json"]["schema"]["$ref"])
    assert set(purge["properties"]) == {"older_than_s"}


# --- errors ---------------------------------------------------------------------------


async def test_errors_are_problem_documents_defined_once(served: Served, doc: dict[str, Any]) -> None:
    problem = doc["components"]["schemas"]["Problem"]
    for name, response in doc["components"]["responses"].items():
        assert response["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }, name
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status == "default" or status >= "400":
                    assert response["$ref"].startswith("#/components/responses/"), f"{method} {path} {status}"
    status, content_type, answered = await served.get("/v1/workflows/no-such-id")
    assert (status, content_type) == (404, "application/problem+json")
    assert set(problem["required"]) <= set(answered)
    assert "404" in doc["paths"]["/v1/workflows/{id}"]["get"]["responses"]
