"""CallerIR → the first HTTP filters of the inbound chain: who the caller is (issue 14).

JWT verification, then the Lua caller filter (``apikey.py``): it drops every
``x-modelguard-*`` header the caller sent and sets the verified key id, tenant and tier
(or the source address), before quarantines, RBAC, budgets and the Wasm filter read them.
A key presented beside a JWT or client certificate it is not bound to is refused by the
access Deny filter (``rbac.binding_policy``), with the usual JSON 403 naming
``api-key-not-bound-to-principal``.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from controlplane.ir import SidecarIR
from controlplane.policies.access import translate as rbac
from controlplane.policies.access.ir import of as access_of
from controlplane.translate import apikey
from controlplane.translate.internal import strip_internal_headers_of
from controlplane.translate.module import Inbound, Module
from controlplane.translate.protos import pack

UNBOUND_RULE = rbac.UNBOUND_RULE


def caller_filter(ir: SidecarIR) -> hcm_pb2.HttpFilter:
    access = access_of(ir)
    classes = rbac.key_classes_of(access) if access is not None else {}
    source = apikey.script(classes=classes, caller=ir.caller)
    config = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=source))
    return hcm_pb2.HttpFilter(name="envoy.filters.http.lua", typed_config=pack(config))


class Caller(Module):
    name = "modelguard.caller"

    def http_filters(self, ir: SidecarIR) -> list[hcm_pb2.HttpFilter]:
        caller = ir.caller
        if caller is None:
            return []
        filters = []
        # Verified tokens first: the caller filter binds keys to their subject and copies
        # the claims client keys read.
        access = access_of(ir)
        if access is not None and access.jwt_providers:
            filters.append(rbac.jwt_filter(access))
        filters.append(caller_filter(ir))
        return filters

    def patch(self, ir: SidecarIR, inbound: Inbound) -> None:
        if ir.caller is not None:
            strip_internal_headers_of(inbound)


MODULE = Caller()
