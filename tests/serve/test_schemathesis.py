"""Property-based fuzzing of the OpenAPI schema (schemathesis): no input may produce a 5xx.

Every operation gets a few positive and negative examples (bounded so the run stays short); every
response must also match the declared status codes, content type and schema. The operations are driven
with hypothesis directly, because schemathesis' pytest plugin does not load under pytest 9.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cxrnn.serve.app import create_app  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(served_model):
    return schemathesis.openapi.from_asgi("/openapi.json", create_app(served_model, timeout_s=60))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_errors(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/predict", "POST /v1/explain", "GET /v1/model", "GET /healthz"}
    statuses: list[int] = []
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to make invalid in a parameterless GET

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            response = case.call_and_validate(checks=CHECKS)
            statuses.append(response.status_code)

        fuzz()
    assert statuses and all(s < 500 for s in statuses)
