"""The sidecar's own request headers (``x-modelguard-*``): whatever a caller sent under that
prefix is dropped before any filter runs, so only the sidecar states who the caller is
(the caller filter) and what a request costs (the instance class)."""

from __future__ import annotations

from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.http.early_header_mutation.header_mutation.v3 import (
    header_mutation_pb2,
)
from envoy.type.matcher.v3 import string_pb2

from controlplane.translate.module import Inbound
from controlplane.translate.protos import pack

INTERNAL_PREFIX = "x-modelguard-"


def strip_internal_headers() -> extension_pb2.TypedExtensionConfig:
    """Every x-modelguard-* header of a request, removed before any filter runs: only the
    sidecar states who the caller is."""
    mutation = header_mutation_pb2.HeaderMutation(
        mutations=[
            mutation_rules_pb2.HeaderMutation(
                remove_on_match=mutation_rules_pb2.HeaderMutation.RemoveOnMatch(
                    key_matcher=string_pb2.StringMatcher(prefix=INTERNAL_PREFIX)
                )
            )
        ]
    )
    return extension_pb2.TypedExtensionConfig(
        name="modelguard.strip-internal-headers", typed_config=pack(mutation)
    )


def strip_internal_headers_of(inbound: Inbound) -> None:
    """Adds the strip to the inbound listener's connection manager, once."""
    early = inbound.manager.early_header_mutation_extensions
    strip = strip_internal_headers()
    if all(e.name != strip.name for e in early):
        early.append(strip)
