"""The OpenAPI 3.1 document, generated from the operations and the pydantic models the
handlers use, and a self-contained page that renders it (no external assets)."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from broker.api import models
from broker.api.routes import OPERATIONS, PLATFORM_OPERATIONS

_REF = "#/components/schemas/{model}"
_STATUS_TEXT = {
    400: "The request is malformed or breaks a rule; nothing was changed.",
    401: "Missing or invalid credentials.",
    403: "You may read but not change this instance's backups.",
    404: "No such instance (or not one you may access), or no such object.",
    409: "Conflicts with what is stored (duplicate name, in use, already ended...).",
    415: "The body is not sent as Content-Type: application/json.",
    422: "Well formed, but the storage check failed: nothing was saved.",
    429: "Too many failed logins from this address (or user name); see Retry-After.",
    503: "A dependency (storage, token issuer, Cloud Controller) is unavailable; retry.",
}
_PLATFORM_FORBIDDEN = "Only operators may call this platform-wide operation."


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or re.sub(r"\W", "", repr(tp))[:40]


@cache
def document() -> dict[str, Any]:
    inputs: list[tuple[str, JsonSchemaMode, TypeAdapter[Any]]] = []
    named: dict[str, Any] = {"ErrorOut": models.ErrorOut, "DestinationIn": models.DestinationIn}
    named["DestinationOut"] = models.DestinationOut
    for operation in [*OPERATIONS, *PLATFORM_OPERATIONS]:
        for tp in (operation.body, operation.response):
            if tp is not None and tp not in named.values():
                named[_name(tp)] = tp
    for key, tp in named.items():
        mode: JsonSchemaMode = "serialization" if key.endswith(("Out", "Page")) else "validation"
        inputs.append((key, mode, TypeAdapter(tp)))
    schemas, defs = TypeAdapter.json_schemas(inputs, ref_template=_REF)
    components: dict[str, Any] = dict(defs.get("$defs", {}))
    for (key, _mode), schema in schemas.items():
        if "$ref" not in schema or key not in components:
            components.setdefault(key, schema)
    refs = {key: _ref_of(key, schema, components) for (key, _mode), schema in schemas.items()}

    paths: dict[str, Any] = {}
    for operation in [*OPERATIONS, *PLATFORM_OPERATIONS]:
        params = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "maxLength": 256 if name == "instance_id" else 64},
            }
            for name in re.findall(r"{(\w+)}", operation.path)
        ]
        params += _query_parameters(operation.query)
        responses: dict[str, Any] = {}
        ok: dict[str, Any] = {"description": "Success."}
        if operation.response is not None:
            ok["content"] = {"application/json": {"schema": refs[_key(named, operation.response)]}}
        responses[str(operation.status)] = ok
        for code, text in operation.also.items():
            responses[str(code)] = {**ok, "description": text}
        codes = {400, 401, 404, 429, 503, *operation.errors} | (
            {403} if operation.manage else set()
        )
        for code in sorted(codes | ({415} if operation.body is not None else set())):
            platform = operation.scope == "platform" and code == 403
            responses[str(code)] = {
                "description": _PLATFORM_FORBIDDEN if platform else _STATUS_TEXT[code],
                "content": {
                    "application/json": {"schema": {"$ref": _REF.format(model="ErrorOut")}}
                },
            }
        entry: dict[str, Any] = {
            "operationId": operation.operation_id,
            "summary": operation.summary,
            "tags": [operation.tag],
            "parameters": params,
            "responses": responses,
        }
        if operation.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": refs[_key(named, operation.body)]}},
            }
        paths.setdefault(operation.path, {})[operation.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "OSB backup manager API",
            "version": "1",
            "description": "Destinations, plans, jobs, restore points and restores of one "
            "service instance, and for operators the platform-wide views under /v1 (a tenant "
            "gets 403 there). Lists are newest first, paginated with an opaque cursor or "
            "numbered pages, and carry a total. Secrets are never returned: answers say "
            "`<name>_set` instead. Every error is JSON with a stable `error` code and a "
            "`description`. Human-readable page: /v1/docs.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A UAA/OIDC user token (JWT), or a binding key bmk_...",
                },
                "basic": {"type": "http", "scheme": "basic", "description": "Broker/operator."},
            },
        },
        "security": [{"bearer": []}, {"basic": []}],
    }


def _query_parameters(model: type[BaseModel] | None) -> list[dict[str, Any]]:
    """The query parameters of an operation, from the model its handler validates them with."""
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=_REF)
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", "")
        prop.pop("title", None)
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            prop.update(options[0])
        if "$ref" in prop:  # an enum: its values inline, as a parameter's schema stands alone
            named = schema["$defs"][prop.pop("$ref").rsplit("/", 1)[-1]]
            prop.update({k: v for k, v in named.items() if k not in ("title", "description")})
        if prop.get("default", "") is None:
            prop.pop("default")
        params.append(
            {"name": name, "in": "query", "required": False, "description": description,
             "schema": prop}
        )  # fmt: skip
    return params


def _key(named: dict[str, Any], tp: Any) -> str:
    return next(k for k, v in named.items() if v is tp)


def _ref_of(key: str, schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return {"$ref": schema["$ref"]}
    return {"$ref": _REF.format(model=key)}


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>OSB backup manager API</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ddd;margin-top:2em}
.op{border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.4em .8em}
.m{display:inline-block;min-width:4.5em;font-weight:bold;font-family:monospace}
.GET{color:#0a6}.POST{color:#06c}.PATCH{color:#b60}.DELETE{color:#c22}
code{background:#f4f4f4;padding:0 .2em}pre{background:#f7f7f7;padding:.6em;overflow:auto}
details summary{cursor:pointer}
</style></head><body>
<h1>OSB backup manager API</h1>
<p id="desc"></p><p>Machine-readable document: <a href="/v1/openapi.json">/v1/openapi.json</a></p>
<div id="ops"></div>
<script id="spec" type="application/json">__SPEC__</script>
<script>
const spec = JSON.parse(document.getElementById('spec').textContent);
const entities = {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'};
const esc = s => String(s).replace(/[&<>"]/g, c => entities[c]);
const refName = s => s && s.$ref ? s.$ref.split('/').pop() : '';
document.getElementById('desc').textContent = spec.info.description;
const byTag = {};
for (const [path, item] of Object.entries(spec.paths))
  for (const [method, op] of Object.entries(item))
    (byTag[op.tags[0]] = byTag[op.tags[0]] || []).push([method.toUpperCase(), path, op]);
let html = '';
for (const [tag, ops] of Object.entries(byTag)) {
  html += `<h2>${esc(tag)}</h2>`;
  for (const [method, path, op] of ops) {
    const body = op.requestBody ? refName(op.requestBody.content['application/json'].schema) : '';
    const resp = Object.entries(op.responses).map(([c, r]) => {
      const s = r.content ? refName(r.content['application/json'].schema) : '';
      const shown = s && c < 300 ? `<details><summary><code>${esc(s)}</code></summary>` +
        `<pre>${esc(JSON.stringify(spec.components.schemas[s], null, 2))}</pre></details>` :
        (s ? '<code>' + esc(s) + '</code>' : '');
      return `<li><b>${c}</b> ${esc(r.description)} ${shown}</li>`;
    }).join('');
    const q = op.parameters.filter(p => p.in === 'query')
      .map(p => `<li><code>${esc(p.name)}</code> ${esc(p.description || '')}</li>`).join('');
    const schema = body ? `<details><summary>request body <code>${esc(body)}</code></summary>` +
      `<pre>${esc(JSON.stringify(spec.components.schemas[body], null, 2))}</pre></details>` : '';
    html += `<div class="op"><span class="m ${method}">${method}</span> <code>${esc(path)}</code>
      <div>${esc(op.summary)}</div>${q ? '<div>query:<ul>' + q + '</ul></div>' : ''}${schema}
      <ul>${resp}</ul></div>`;
  }
}
document.getElementById('ops').innerHTML = html;
</script></body></html>
"""


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(document())


async def docs_page(request: web.Request) -> web.Response:
    spec = json.dumps(document()).replace("</", "<\\/")
    return web.Response(text=_PAGE.replace("__SPEC__", spec), content_type="text/html")


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/openapi.json", openapi_json)
    app.router.add_get("/v1/docs", docs_page)
