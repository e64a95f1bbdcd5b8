"""Schemathesis over every operation of /openapi.json against the real app and services: no
server error, and every response (status, content type, body) is what the schema documents.

Examples per operation are bounded (STEP1X_FUZZ_EXAMPLES, default 25) to keep CI short; raise it
to fuzz longer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from tests.integration.helpers import api_client

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("STEP1X_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schemathesis.serializer("application/x-ndjson")
def _jsonl(_: schemathesis.SerializationContext, value: Any) -> bytes:
    """The manifest's schema is the list of its lines."""
    lines = value if isinstance(value, list) else [value]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def test_every_operation_answers_as_documented_and_never_500(settings):
    authorization = api_client(settings).headers["Authorization"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings, migrate=False))
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # every route is in the schema, the manifest's JSONL body included

    for operation in operations:
        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                             phases=[Phase.explicit, Phase.generate],
                             suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": authorization}, checks=CHECKS)

        try:
            fuzz()
        except Exception as exc:  # collect every operation's failure, then report them all
            failures[operation.label] = str(exc)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
