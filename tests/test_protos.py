"""The committed gRPC stubs are what the .proto files generate."""

import subprocess
import sys

import pytest

from baton.protos import common_pb2, decode_pb2, kvtransfer_pb2, prefill_pb2

pytestmark = pytest.mark.unit


def test_committed_stubs_are_current():
    result = subprocess.run(
        [sys.executable, "-m", "baton.protos.generate", "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"stale stubs, run `python -m baton.protos.generate`:\n{result.stderr}"


def test_services_and_package():
    assert prefill_pb2.DESCRIPTOR.package == "baton.v1"
    assert set(prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].methods_by_name) == {
        "Prefill", "Embed", "Abort", "GetLoad", "LoadLoRA", "UnloadLoRA", "ResetPrefixCache"}
    assert set(decode_pb2.DESCRIPTOR.services_by_name["Decode"].methods_by_name) == {
        "Reserve", "Generate", "PrefillAndGenerate", "Abort", "GetLoad", "LoadLoRA", "UnloadLoRA", "ResetPrefixCache"}
    assert set(kvtransfer_pb2.DESCRIPTOR.services_by_name["KVTransfer"].methods_by_name) == {"Push"}


def test_optional_seed_has_presence():
    params = common_pb2.SamplingParams()
    assert not params.HasField("seed")
    params.seed = 0
    assert params.HasField("seed")


def test_every_structured_output_kind_crosses_the_wire():
    from baton.engine.sampling_params import StructuredOutputParams
    from baton.services.convert import structured_output_from_proto, structured_output_to_proto

    for spec in [StructuredOutputParams(json='{"type": "array"}', disable_any_whitespace=True),
                 StructuredOutputParams(json_object=True), StructuredOutputParams(regex="a+"),
                 StructuredOutputParams(choice=("yes", "no")), StructuredOutputParams(grammar='root ::= "a"'),
                 StructuredOutputParams(structural_tag='{"type": "structural_tag"}', reasoning_end=(7, 8))]:
        assert structured_output_from_proto(structured_output_to_proto(spec)) == spec
