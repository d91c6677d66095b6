"""The install step: xds-protos overwrites opentelemetry-proto and googleapis-common-protos
files with older copies; the Makefile reinstalls them. These fail if that step is lost."""

from __future__ import annotations


def test_opentelemetry_proto_is_the_current_one() -> None:
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

    assert "name" in InstrumentationScope.DESCRIPTOR.fields_by_name
    assert "event_name" in LogRecord.DESCRIPTOR.fields_by_name


def test_envoy_and_google_rpc_protos_import_together() -> None:
    from envoy.service.discovery.v3 import discovery_pb2
    from google.rpc import status_pb2

    request = discovery_pb2.DiscoveryRequest(error_detail=status_pb2.Status(code=3, message="x"))
    assert request.error_detail.message == "x"
