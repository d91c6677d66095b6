"""AccessPolicy: who may call which operations of a model API (zero-trust segmentation).

Semantics follow Istio's AuthorizationPolicy: any matching Deny rule denies; with
``defaultAction: Deny`` a request must match an Allow rule. In a rule, ``from`` and ``to``
must both match; an absent clause matches everything.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import InitErrorDetails

from controlplane.api.base import (
    DnsLabel,
    DnsSubdomain,
    Model,
    PolicyBase,
    at_least_one,
    duplicate_names,
)
from controlplane.api.common import Mode, TargetRef

Action = Literal["Allow", "Deny"]

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]

# spiffe://<trust domain>/<path>; characters as allowed by the SPIFFE ID specification.
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def _spiffe_id(value: str) -> str:
    segments = value.split("/")[3:]
    if not _SPIFFE_ID.fullmatch(value) or any(s in (".", "..") for s in segments):
        raise ValueError("must be a SPIFFE ID: spiffe://<trust-domain>/<path>")
    return value


SpiffeId = Annotated[
    str,
    AfterValidator(_spiffe_id),
    Field(json_schema_extra={"pattern": f"^{_SPIFFE_ID.pattern}$"}),
]

_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()+,;=:@%/]*")


def _path_pattern(value: str) -> str:
    """Istio-style: exact ``/v1/predict``, prefix ``/v1/*``, suffix ``*/predict``, any ``*``."""
    if value == "*":
        return value
    body = value[:-1] if value.endswith("*") else value[1:] if value.startswith("*") else value
    if not _PATH_CHARS.fullmatch(body) or not (value.startswith("*") or body.startswith("/")):
        raise ValueError(
            "must be a path starting with '/', optionally with one '*' at the start or end "
            "(/v1/predict, /v1/*, */predict, *)"
        )
    return value


PathPattern = Annotated[str, AfterValidator(_path_pattern)]


class ApiKeys(Model):
    """Callers present a key (header ``x-api-key``) listed in a Secret; keys are stored
    hashed."""

    secret_ref: DnsSubdomain


class JwtRule(Model):
    issuer: str = Field(min_length=1)
    jwks_file: str | None = Field(default=None, min_length=1)  # absolute, read by the sidecar
    jwks: str | None = Field(default=None, min_length=1)  # the JWKS document itself
    claims: dict[str, list[str]] = {}  # claim → accepted values (any of)

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtRule:
        # Neither: the rule cannot verify tokens and matches nobody (compile fails closed).
        if self.jwks_file is not None and self.jwks is not None:
            raise ValueError("set at most one of jwksFile, jwks")
        return self


class From(Model):
    """Who is calling. Every field that is set must match."""

    identities: list[SpiffeId] = []
    namespaces: list[DnsLabel] = []
    api_keys: ApiKeys | None = None
    jwt: JwtRule | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> From:
        # An empty clause would silently match everyone; omit `from` to mean that.
        at_least_one(
            {
                "identities": self.identities,
                "namespaces": self.namespaces,
                "apiKeys": self.api_keys,
                "jwt": self.jwt,
            }
        )
        return self


class To(Model):
    """Which operations. Empty lists match any method or path."""

    methods: list[HttpMethod] = []
    paths: list[PathPattern] = []

    @model_validator(mode="after")
    def _not_empty(self) -> To:
        at_least_one({"methods": self.methods, "paths": self.paths})
        return self


class AccessRule(Model):
    name: DnsLabel | None = None  # names the rule in logs and deny reasons
    action: Action
    from_: From | None = Field(default=None, alias="from")
    to: To | None = None


class Mtls(Model):
    """Inbound mutual TLS (Istio's PeerAuthentication): Strict accepts mTLS only;
    Permissive also accepts plaintext (migration, callers outside the mesh)."""

    mode: Literal["Strict", "Permissive"] = "Strict"


class AccessPolicySpec(Model):
    target_ref: TargetRef
    mode: Mode = "Enforce"
    mtls: Mtls | None = None  # unset: Strict, unless another policy of the workload decides
    default_action: Action = "Deny"
    rules: list[AccessRule] = []

    @classmethod
    def precheck(cls, data: dict[str, Any]) -> list[InitErrorDetails]:
        return duplicate_names(data, "rules", "name")


class AccessPolicy(PolicyBase):
    KIND: ClassVar[str] = "AccessPolicy"
    RULE_LIST: ClassVar[str | None] = "rules"

    kind: Literal["AccessPolicy"] = "AccessPolicy"
    spec: AccessPolicySpec
