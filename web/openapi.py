"""/openapi.json (OpenAPI 3.1) generated from the app's url_map and the request schemas; /docs renders it.

Every registered route appears: views decorated with ``web.schemas.doc`` contribute
their body, query and responses; others (blueprints that don't use ``doc``) get
their docstring and the facts listed in EXTRA below.
"""
from __future__ import annotations

import html
import re

from flask import Blueprint, current_app, jsonify

from web import schemas
from web.context import settings as app_settings

bp = Blueprint("openapi", __name__)
HIDDEN_METHODS = {"HEAD", "OPTIONS"}
# Facts for views of other blueprints that do not use schemas.doc, keyed by endpoint.
EXTRA = {
    "predict.predict": {"body_types": ("multipart/form-data", "image/*", "application/json"),
                        "body_schema": {"description": "multipart `image` files, a raw image/* body or "
                                                       '{"instances": [base64 image | pixel array, ...]}'},
                        "query": schemas.PREDICT_QUERY,
                        "responses": {200: "model name and version, one prediction per input"}},
}


def openapi_path(rule: str) -> str:
    """'/v1/jobs/<job_id>/artifacts/<path:name>' -> '/v1/jobs/{job_id}/artifacts/{name}'."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def _operation(app, rule, method: str) -> dict:
    view = app.view_functions[rule.endpoint]
    facts = {**getattr(view, "openapi", {}), **EXTRA.get(rule.endpoint, {})}
    doc = (view.__doc__ or rule.endpoint).strip().splitlines()
    single = len((rule.methods or set()) - HIDDEN_METHODS) == 1
    op: dict = {"operationId": rule.endpoint if single else f"{rule.endpoint}.{method.lower()}", "summary": doc[0],
                "tags": [rule.endpoint.split(".")[0]]}
    if len(doc) > 1:
        op["description"] = " ".join(line.strip() for line in doc[1:]).strip()
    params = [{"name": arg, "in": "path", "required": True, "schema": {"type": "string"}}
              for arg in sorted(rule.arguments)]
    for name, sub in (facts.get("query") or {}).get("properties", {}).items():
        if name == "limit":
            sub = {**sub, "maximum": app_settings(app).page_size_max}  # what parse_query enforces
        params.append({"name": name, "in": "query", "required": False, "schema": sub,
                       "description": sub.get("description", "")})
    if params:
        op["parameters"] = params
    if method in ("POST", "PUT", "PATCH") and (facts.get("body") or facts.get("body_schema")):
        schema = ({"$ref": f"#/components/schemas/{facts['body']}"} if facts.get("body")
                  else facts["body_schema"])
        op["requestBody"] = {"required": True, "content": {t: {"schema": schema}
                                                          for t in facts.get("body_types", ("application/json",))}}
    responses = {str(code): {"description": text} for code, text in facts.get("responses", {}).items()}
    if not any(code.startswith("2") for code in responses):
        responses["200"] = {"description": "success"}
    for code, response in responses.items():
        if code.startswith(("4", "5")):
            response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    op["responses"] = responses
    if rule.rule.startswith(("/v1/", "/predict")):
        op["security"] = [{"bearer": []}]  # when auth is enabled (see web/auth.py for each scope)
    return op


def build_spec(app) -> dict:
    """The OpenAPI 3.1 document for every route registered on ``app`` (static files aside)."""
    paths: dict = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        item = paths.setdefault(openapi_path(rule.rule), {})
        for method in sorted((rule.methods or set()) - HIDDEN_METHODS):
            item[method.lower()] = _operation(app, rule, method)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": "1",
                 "description": "Train and serve PyTorch image classifiers. Errors are "
                                '{"error": {"code", "message", "details"}}.'},
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "paths": paths,
        "components": {"schemas": schemas.components(),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


@bp.get("/openapi.json")
@schemas.doc(responses={200: "this document"})
def spec():
    """The OpenAPI 3.1 description of this API."""
    return jsonify(build_spec(current_app))


@bp.get("/docs")
@schemas.doc(responses={200: "HTML page"})
def docs():
    """A plain HTML rendering of the OpenAPI document (no external scripts)."""
    doc = build_spec(current_app)
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>Kiln API</title>",
           "<style>body{font:14px sans-serif;max-width:60em;margin:2em auto}code{background:#eee}"
           "h3{margin-bottom:.2em}.m{display:inline-block;width:4.5em;font-weight:bold}</style></head><body>",
           "<h1>Kiln API</h1><p>", html.escape(doc["info"]["description"]),
           " Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            out.append(f"<h3><span class='m'>{method.upper()}</span><code>{html.escape(path)}</code></h3>")
            out.append(f"<p>{html.escape(op['summary'])}</p><ul>")
            for p in op.get("parameters", []):
                out.append(f"<li>{p['in']} <code>{html.escape(p['name'])}</code> {html.escape(p.get('description', ''))}</li>")
            body = op.get("requestBody")
            if body:
                out.append(f"<li>body: {html.escape(', '.join(body['content']))}</li>")
            for code, r in op["responses"].items():
                out.append(f"<li>{code}: {html.escape(r['description'])}</li>")
            out.append("</ul>")
    out.append("<h2>Schemas</h2>")
    for name, schema in doc["components"]["schemas"].items():
        out.append(f"<h3 id='{name}'>{name}</h3><pre>{html.escape(_pretty(schema))}</pre>")
    out.append("</body></html>")
    return "".join(out), 200, {"Content-Type": "text/html; charset=utf-8"}


def _pretty(schema: dict) -> str:
    import json

    return json.dumps(schema, indent=2, default=str)
