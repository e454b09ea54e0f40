"""Schemathesis hooks for the HTTP API of `unialign serve`: drop one false positive of schemathesis 4.32.

Every multipart field reaches the server as text, so a negative case that changes the type of a text
field (``labels`` sent as the integer 5) may arrive as valid data (the label "5"). schemathesis knows this
and, before reporting ``negative_data_rejection``, re-reads the body as sent and validates it; but when the
body holds a file part that validation raises (jsonschema-rs refuses schemathesis's ``Binary`` wrapper) and
counts as "invalid", so every such case on ``POST /classify`` is reported as accepted negative data.
:func:`filter_failure` repeats that validation with each file part read as ``""`` (any string is a valid
``format: binary`` file) and drops the failure only when the body as sent is valid.

``tests/test_serve.py`` imports this module; for the command line::

    SCHEMATHESIS_HOOKS=tests/schemathesis_hooks.py schemathesis --config-file tests/schemathesis.toml \
        run http://127.0.0.1:8000/openapi.json --checks all
"""
from __future__ import annotations

from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import jsonschema_rs
import schemathesis
from schemathesis.core.failures import AcceptedNegativeData

MULTIPART = "multipart/form-data"


def sent_form(content_type: str, body: bytes) -> dict[str, list[str]]:
    """The fields of a multipart body as the server reads them: text, or ``""`` for a file part."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    fields: dict[str, list[str]] = {}
    for part in message.iter_parts():
        payload = part.get_payload(decode=True) or b""
        text = "" if part.get_filename() is not None else payload.decode(errors="replace")
        fields.setdefault(str(part.get_param("name", header="content-disposition")), []).append(text)
    return fields


def body_schema(raw: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    """An operation's multipart body schema with the document's components beside it, so that its
    ``$ref`` resolves."""
    schema = raw["paths"][path][method.lower()]["requestBody"]["content"][MULTIPART]["schema"]
    return {**schema, "components": raw.get("components", {})}


def valid_as_sent(raw: dict[str, Any], path: str, method: str, content_type: str, body: bytes) -> bool:
    """Whether the multipart body the server received satisfies the operation's schema (a field the
    schema types as an array keeps every repeat, any other field its last value)."""
    schema = body_schema(raw, path, method)
    name = schema.get("$ref", "").rsplit("/", 1)[-1]
    properties = raw.get("components", {}).get("schemas", {}).get(name, schema).get("properties", {})
    fields = sent_form(content_type, body)
    sent = {k: v if properties.get(k, {}).get("type") == "array" else v[-1] for k, v in fields.items()}
    return jsonschema_rs.validator_for(schema).is_valid(sent)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but an accepted "negative" multipart body that was valid as sent."""
    if not isinstance(failure, AcceptedNegativeData) or case.media_type != MULTIPART:
        return True
    request = response.request
    body = request.body.encode() if isinstance(request.body, str) else request.body
    return not valid_as_sent(case.operation.schema.raw_schema, case.operation.path, case.operation.method,
                             request.headers["Content-Type"], body or b"")
