"""The gateway under schemathesis: requests generated from its own OpenAPI document, bodies that
fit the request models and bodies that do not, never get a server error. The backend takes
each request's sampling params through the workers' wire format, as the gRPC backend does,
before answering as the fake backend does (that is where a value the wire cannot hold once
became a 500). The cases are the same each run; to look for new ones, run schemathesis (``st run``)
against a live ``baton up`` with the document patched as ``gateway_schema`` patches it."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.checks import not_a_server_error

from baton.services.convert import params_from_proto, params_to_proto
from baton.services.gateway.app import create_app
from baton.services.gateway.backend import GenerationRequest
from baton.services.gateway.config import GatewayConfig
from baton.services.gateway.tokenizer import GatewayTokenizer

from conftest import DEMO_MODEL
from test_gateway_api import MODEL, FakeBackend

pytestmark = pytest.mark.unit


class WireBackend(FakeBackend):
    def generate(self, request: GenerationRequest):
        params_from_proto(params_to_proto(request.params))
        return super().generate(request)


def gateway_schema() -> schemathesis.schemas.BaseSchema:
    tok = GatewayTokenizer(DEMO_MODEL)
    config = GatewayConfig(model_dir=str(DEMO_MODEL), served_model_name=MODEL, tool_call_parser="hermes",
                           reasoning_parser="qwen3")
    app = create_app(config, WireBackend(tok), tok)
    document = app.openapi()
    # Name the served model (past the 404) and ask for few tokens (within the context, and quick).
    for name, schema in document["components"]["schemas"].items():
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"const": MODEL}
        if name in ("CompletionRequest", "ChatCompletionRequest"):
            schema["properties"]["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 8}
            schema["properties"].pop("max_completion_tokens", None)
        if name == "ResponsesRequest":
            schema["properties"]["max_output_tokens"] = {"type": "integer", "minimum": 1, "maximum": 8}
    app.openapi_schema = document
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = gateway_schema()


@schema.parametrize()
@settings(derandomize=True, max_examples=100, deadline=None)   # the same cases each run: CI explores nothing new
def test_no_request_gets_a_server_error(case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
