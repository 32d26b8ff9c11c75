"""The OpenAPI document: complete, self-consistent, and what the handlers really answer."""

from __future__ import annotations

import re
from typing import Any

import jsonschema
from openapi_spec_validator import validate as validate_openapi

from broker.api import models as m
from broker.api.routes import OPERATIONS, PLATFORM_OPERATIONS
from tests.api.conftest import S3_BODY, SWIFT_BODY, Api, seed


def _check(doc: dict[str, Any], schema_name: str, value: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    jsonschema.Draft202012Validator(schema).validate(value)


async def test_document_covers_every_route(api: Api) -> None:
    status, doc = await api.call("GET", "/v1/openapi.json", basic=None)
    assert status == 200 and doc["openapi"] == "3.1.0"
    jsonschema.Draft202012Validator.check_schema({"components": doc["components"]})
    routes = {
        (r.method, r.resource.canonical)
        for r in api.service.server.app.router.routes()
        if r.resource is not None
        and (
            r.resource.canonical.startswith("/v1/service_instances")
            or r.resource.canonical in {o.path for o in PLATFORM_OPERATIONS}
        )
        and r.method != "HEAD"
    }
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert routes == documented
    assert len(documented) == len(OPERATIONS) + len(PLATFORM_OPERATIONS)
    assert all(o.path.startswith("/v1/") and "{instance_id}" not in o.path
               for o in PLATFORM_OPERATIONS)  # fmt: skip
    ids = [o.operation_id for o in [*OPERATIONS, *PLATFORM_OPERATIONS]]
    assert len(set(ids)) == len(ids)
    text = str(doc)
    for ref in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert ref in doc["components"]["schemas"], ref
    # secrets never appear in answers
    for name, schema in doc["components"]["schemas"].items():
        if name.endswith("Out"):
            props = schema.get("properties", {})
            assert not {"secret_access_key", "password", "key"} & set(props) or name.startswith(
                "RestorePoint"
            ), name


async def test_answers_match_the_document(
    api: Api, instance: str, destination: dict, plan: dict
) -> None:
    _, doc = await api.call("GET", "/v1/openapi.json", basic=None)
    _check(doc, "DestinationOut", destination)
    _check(doc, "S3DestinationSpec", S3_BODY)
    _check(doc, "SwiftDestinationSpec", SWIFT_BODY)
    _check(doc, "DestinationIn", SWIFT_BODY)
    _, page = await api.call("GET", "/destinations", instance=instance)
    _check(doc, "DestinationPage", page)
    _check(doc, "PlanOut", plan)
    _, job = await api.call("POST", f"/plans/{plan['id']}/backups", instance=instance)
    _check(doc, "JobOut", job)
    _, jobs = await api.call("GET", "/jobs", instance=instance)
    _check(doc, "JobPage", jobs)
    _, err = await api.call("GET", "/plans/nope", instance=instance)
    _check(doc, "ErrorOut", err)
    _, items = await api.call("GET", "/items", instance=instance)
    _check(doc, "ItemsOut", items)


async def test_docs_page_is_self_contained(api: Api) -> None:
    async with api.service.http.get(api.service.url + "/v1/docs") as r:
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
    assert "/v1/service_instances/{instance_id}/plans" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)


async def test_document_is_valid_openapi_3_1(api: Api) -> None:
    _, doc = await api.call("GET", "/v1/openapi.json", basic=None)
    validate_openapi(doc)  # raises on any violation of the OpenAPI 3.1 schema


async def test_document_is_generated_from_the_handlers_models(api: Api) -> None:
    """Bodies, query strings and answers are the pydantic models the handlers validate
    with, not a hand-written copy."""
    _, doc = await api.call("GET", "/v1/openapi.json", basic=None)
    schemas = doc["components"]["schemas"]
    assert (
        schemas["PlanSpec"]["properties"].keys()
        == m.PlanIn.model_json_schema()["properties"].keys()
    )
    assert set(schemas["JobOut"]["properties"]) == set(m.JobOut.model_fields)
    by_id = {item["operationId"]: item for path in doc["paths"].values() for item in path.values()}
    for operation in [*OPERATIONS, *PLATFORM_OPERATIONS]:
        documented = by_id[operation.operation_id]
        query = {p["name"] for p in documented["parameters"] if p["in"] == "query"}
        expected = (
            {f.alias or n for n, f in operation.query.model_fields.items()}
            if operation.query
            else set()
        )
        assert query == expected, operation.operation_id
        assert str(operation.status) in documented["responses"]
        assert ("requestBody" in documented) == (operation.body is not None)
    jobs = by_id["list_jobs"]["parameters"]
    assert {p["name"] for p in jobs} >= {"type", "status", "plan_id", "page", "size", "cursor"}


async def test_every_documented_answer_is_what_the_handlers_send(api: Api) -> None:
    """A 2xx of every GET validates against its documented schema."""
    s = await seed(api)
    _, doc = await api.call("GET", "/v1/openapi.json", basic=None)
    for operation in OPERATIONS:
        if operation.method != "GET":
            continue
        status, body = await api.call("GET", s.path(operation), instance=s.instance)
        assert status == 200, (operation.path, body)
        documented = doc["paths"][operation.path]["get"]["responses"]["200"]
        ref = documented["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        _check(doc, ref, body)
    for operation in PLATFORM_OPERATIONS:  # the operators' views, as the broker reads them
        if operation.method != "GET" or "{" in operation.path:  # lists (an empty one, here)
            continue
        status, body = await api.call("GET", operation.path)
        assert status == 200, (operation.path, body)
        documented = doc["paths"][operation.path]["get"]["responses"]["200"]
        ref = documented["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
        _check(doc, ref, body)
        assert "403" in doc["paths"][operation.path]["get"]["responses"]
