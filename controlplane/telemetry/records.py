"""What the receiver keeps of a span or an access-log record, and how it reads verdicts.

A record is normalized from OTLP once, on arrival: secrets are already hashed, the policy
verdict is derived from Envoy's response flags, response code details and dynamic metadata
(the attribute names are those ``translate/telemetry.py`` asks Envoy for).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from opentelemetry.proto.common.v1 import common_pb2

CLIENT_KEY_ATTRIBUTE = "modelguard.client.key"  # the plain key, as a sidecar sends it
CLIENT_HASH_ATTRIBUTE = "modelguard.client.key_hash"  # what is kept instead
HEADER_ATTRIBUTE_PREFIX = "http.request.header."
VERDICT_ATTRIBUTE = "modelguard.verdict"
VERDICT_RULE_ATTRIBUTE = "modelguard.verdict.rule"


class Verdict(StrEnum):
    ALLOWED = "allowed"
    DENIED = "denied"  # by an access rule (rule: its name, or "default-deny")
    RATE_LIMITED = "rate_limited"  # rule: the limit's name when the sidecar says it
    HARDENED = "hardened"  # allowed, output perturbed (rule: what was done)
    AUDIT_DENIED = "audit_denied"  # allowed, but an Audit-mode policy would have denied
    # Outbound (egress) decisions, also ALLOWED; rule: the allow rule, or "default-deny".
    BLOCKED = "blocked"  # an outside destination no EgressPolicy allows
    WOULD_BLOCK = "would-block"  # the same under Audit: let through


# What the outbound listener sends (translate/egress.py, EGRESS_ATTRIBUTES).
EGRESS_DESTINATION_ATTRIBUTE = "modelguard.egress.destination"
EGRESS_VERDICT_ATTRIBUTE = "modelguard.egress.verdict"
EGRESS_RULE_ATTRIBUTE = "modelguard.egress.rule"
POLICY_ATTRIBUTE = "modelguard.policy"
_EGRESS_VERDICTS = {v.value: v for v in (Verdict.ALLOWED, Verdict.BLOCKED, Verdict.WOULD_BLOCK)}


class Kind(StrEnum):
    SPAN = "span"
    LOG = "log"


def hash_secret(value: str) -> str:
    """A stable, non-reversible name for a credential (API keys are high-entropy secrets)."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()[:16]


def _present(value: str) -> bool:
    return bool(value) and value != "-"


def small_int(text: str, default: int = 0) -> int:
    """An attribute's non-negative integer, or ``default``. ``str.isdigit`` alone is not
    enough: it accepts digits ``int`` refuses ("²") and numbers too long to convert."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else default


def any_value_text(value: common_pb2.AnyValue) -> str:
    which = value.WhichOneof("value")
    if which is None:
        return ""
    if which == "string_value":
        return str(value.string_value)
    if which in ("int_value", "double_value", "bool_value"):
        raw = getattr(value, which)
        return str(raw).lower() if which == "bool_value" else str(raw)
    if which == "bytes_value":
        return bytes(value.bytes_value).hex()
    return str(value).strip()


def scrub_attributes(
    attributes: Iterable[common_pb2.KeyValue], secret_headers: Iterable[str]
) -> list[common_pb2.KeyValue]:
    """The attributes with every credential replaced by its hash and empty values dropped.

    Runs on the raw OTLP before anything is stored or forwarded, so the plain key never
    leaves the receiver.
    """
    secret = {HEADER_ATTRIBUTE_PREFIX + h for h in secret_headers}
    out: list[common_pb2.KeyValue] = []
    for kv in attributes:
        text = any_value_text(kv.value)
        if kv.key == CLIENT_KEY_ATTRIBUTE:
            if _present(text):
                out.append(
                    common_pb2.KeyValue(
                        key=CLIENT_HASH_ATTRIBUTE,
                        value=common_pb2.AnyValue(string_value=hash_secret(text)),
                    )
                )
            continue
        if kv.key in secret:
            if _present(text):
                out.append(
                    common_pb2.KeyValue(
                        key=kv.key, value=common_pb2.AnyValue(string_value=hash_secret(text))
                    )
                )
            continue
        if kv.value.WhichOneof("value") is None or (
            kv.value.WhichOneof("value") == "string_value" and not _present(text)
        ):
            continue
        out.append(kv)
    return out


def normalized_attributes(
    attributes: Iterable[common_pb2.KeyValue], secret: frozenset[str]
) -> dict[str, str]:
    """``attribute_map(scrub_attributes(attributes, …))`` in one pass, without new protos.

    ``secret`` holds the attribute names (``HEADER_ATTRIBUTE_PREFIX`` + header) whose values
    are credentials. The receiver uses this when nothing is forwarded: the export itself is
    then dropped after this, so scrubbing it in place would be work for nobody.
    """
    out: dict[str, str] = {}
    for kv in attributes:
        value = kv.value
        which = value.WhichOneof("value")
        if which == "string_value":
            text = value.string_value
            if not text or text == "-":
                continue
        elif which is None:
            continue
        else:
            text = any_value_text(value)
        key = kv.key
        if key == CLIENT_KEY_ATTRIBUTE:
            out[CLIENT_HASH_ATTRIBUTE] = hash_secret(text)
        elif key in secret:
            out[key] = hash_secret(text)
        else:
            out[key] = text
    return out


def secret_attributes(secret_headers: Iterable[str]) -> frozenset[str]:
    return frozenset(HEADER_ATTRIBUTE_PREFIX + h for h in secret_headers)


def verdict_of(attrs: Mapping[str, str]) -> tuple[Verdict | None, str]:
    """(verdict, rule or limit) of one request, from its access-log or span attributes.

    None when the attributes are not a sidecar request's (the control plane's own spans).
    """
    status = attrs.get("http.response.status_code") or attrs.get("http.status_code", "")
    details = attrs.get("envoy.response_code_details", "")
    flags = attrs.get("envoy.response_flags") or attrs.get("response_flags", "")
    # An outbound request or connection: the sidecar's egress decision is the verdict (a
    # blocked HTTP request also carries RBAC's denial, which is not an access verdict).
    egress = _EGRESS_VERDICTS.get(attrs.get(EGRESS_VERDICT_ATTRIBUTE, ""))
    if egress is not None:
        return egress, attrs.get(EGRESS_RULE_ATTRIBUTE, "")
    if not _present(status) and not _present(details):
        return None, ""
    prefix = "rbac_access_denied_matched_policy["
    if details.startswith(prefix):
        rule = details[len(prefix) :].rstrip("]")
        return Verdict.DENIED, "default-deny" if rule in ("", "none") else rule
    limit = attrs.get("modelguard.ratelimit.limit", "")
    if "RL" in flags.split(",") or "rate_limit" in details:
        return Verdict.RATE_LIMITED, limit if _present(limit) else details
    hardened = attrs.get("modelguard.output.hardened", "")
    if _present(hardened):
        return Verdict.HARDENED, hardened
    for which in ("audit_deny", "audit_allow"):
        if attrs.get(f"envoy.rbac.{which}_shadow_engine_result") == "denied":
            rule = attrs.get(f"envoy.rbac.{which}_shadow_effective_policy_id", "")
            return Verdict.AUDIT_DENIED, rule if _present(rule) else "default-deny"
    return Verdict.ALLOWED, ""


@dataclass(frozen=True)
class Record:
    """One span or access-log record as the store keeps it."""

    kind: Kind
    time_unix_nano: int
    source: str  # "sidecar" or "control-plane"
    service: str
    node: str
    name: str  # span name, or the log record's body
    trace_id: str = ""  # hex
    span_id: str = ""
    duration_ms: float = 0.0
    status: int = 0  # HTTP status code, 0 when none
    client: str = ""  # hashed client key
    identity: str = ""  # the caller's SPIFFE ID under mTLS
    route: str = ""
    verdict: str = ""
    rule: str = ""
    attributes: tuple[tuple[str, str], ...] = ()
    seq: int = 0  # the store's arrival number (for --follow and paging)
    size: int = field(default=0, compare=False)  # bytes this record holds in memory

    def with_seq(self, seq: int) -> Record:
        # A copy of the instance's dict rather than dataclasses.replace, which re-runs
        # __init__ through field introspection: this runs for every record the store keeps.
        new = object.__new__(Record)
        new.__dict__.update(self.__dict__)
        new.__dict__["seq"] = seq
        return new


# Per-object overhead of a Record beyond its strings: the instance, its tuple of attribute
# pairs, the deque slot. Measured with tracemalloc (tests/unit/test_telemetry_store.py).
_RECORD_OVERHEAD = 400
_PAIR_OVERHEAD = 120


def measure(record: Record) -> int:
    return _measure(
        (
            record.source,
            record.service,
            record.node,
            record.name,
            record.trace_id,
            record.span_id,
            record.client,
            record.identity,
            record.route,
            record.verdict,
            record.rule,
        ),
        record.attributes,
    )


def _measure(strings: tuple[str, ...], attributes: tuple[tuple[str, str], ...]) -> int:
    getsizeof = sys.getsizeof
    size = _RECORD_OVERHEAD + sum(map(getsizeof, strings)) + _PAIR_OVERHEAD * len(attributes)
    for key, value in attributes:
        size += getsizeof(key) + getsizeof(value)
    return size


def make_record(
    kind: Kind,
    *,
    time_unix_nano: int,
    source: str,
    resource: Mapping[str, str],
    name: str,
    attributes: Mapping[str, str],
    trace_id: bytes = b"",
    span_id: bytes = b"",
    duration_ms: float = 0.0,
) -> Record:
    attrs = dict(attributes)
    verdict, rule = verdict_of(attrs)
    if verdict is not None:
        attrs[VERDICT_ATTRIBUTE] = str(verdict)
        if rule:
            attrs[VERDICT_RULE_ATTRIBUTE] = rule
    status_text = attrs.get("http.response.status_code") or attrs.get("http.status_code", "")
    service = resource.get("service.name", "")
    node = resource.get("modelguard.node_id") or attrs.get("modelguard.node_id", "")
    trace_hex, span_hex = trace_id.hex(), span_id.hex()
    client = attrs.get(CLIENT_HASH_ATTRIBUTE, "")
    identity = attrs.get("modelguard.caller.identity", "")
    route = attrs.get("envoy.route", "")
    verdict_text = str(verdict) if verdict is not None else ""
    pairs = tuple(sorted(attrs.items()))
    # Measured from the same strings before the record exists: one construction, no copy.
    strings = (source, service, node, name, trace_hex, span_hex, client, identity, route)
    return Record(
        kind=kind,
        time_unix_nano=time_unix_nano,
        source=source,
        service=service,
        node=node,
        name=name,
        trace_id=trace_hex,
        span_id=span_hex,
        duration_ms=duration_ms,
        status=small_int(status_text),
        client=client,
        identity=identity,
        route=route,
        verdict=verdict_text,
        rule=rule,
        attributes=pairs,
        size=_measure((*strings, verdict_text, rule), pairs),
    )


def attribute_map(attributes: Iterable[common_pb2.KeyValue]) -> dict[str, str]:
    return {kv.key: any_value_text(kv.value) for kv in attributes}
