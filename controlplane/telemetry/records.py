"""What the receiver keeps of a span or an access-log record, and how it reads verdicts.

A record is normalized from OTLP once, on arrival: secrets are already hashed, the policy
verdict is derived from Envoy's response flags, response code details and dynamic metadata
(the attribute names are those ``translate/telemetry.py`` asks Envoy for).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, NamedTuple

from opentelemetry.proto.common.v1 import common_pb2

from controlplane.telemetry.wire import DecodeError, LenientAnyValue, LogRecordView

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


# What the outbound listener sends (policies/egress/translate.py, EGRESS_ATTRIBUTES).
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


# -- values as they are on the wire (an encoded AnyValue; see wire.py) --
#
# Envoy sends every value as a string shorter than 128 bytes: b"\x0a" + length + UTF-8, read
# here without a protobuf call. Anything else goes through AnyValue itself.

_DASH = b"\x0a\x01-"


def _lenient(raw: bytes) -> Any:
    try:
        return LenientAnyValue.FromString(raw)
    except DecodeError:
        return None


def value_text(raw: bytes) -> str | None:
    """An encoded AnyValue as ``normalized_attributes`` reads it: its text, or None for no
    value (unset, an empty or "-" string, bytes that are not an AnyValue). A string that
    is not UTF-8 is read with replacement characters."""
    n = len(raw)
    if n > 2 and raw[0] == 0x0A and raw[1] == n - 2:
        return None if raw == _DASH else raw[2:].decode(errors="replace")
    try:
        value = common_pb2.AnyValue.FromString(raw)
    except DecodeError:  # not UTF-8 (a string too long for the fast path), or not an AnyValue
        lenient = _lenient(raw)
        if lenient is None or lenient.WhichOneof("value") != "string_value":
            return None
        text: str = lenient.string_value.decode(errors="replace")
        return text if _present(text) else None
    which = value.WhichOneof("value")
    if which is None:
        return None
    text = any_value_text(value)
    if which == "string_value" and not _present(text):
        return None
    return text


def string_value(raw: bytes) -> str:
    """An encoded AnyValue's string (a log record's body), "" when it holds none."""
    n = len(raw)
    if n >= 2 and raw[0] == 0x0A and raw[1] == n - 2:
        return raw[2:].decode(errors="replace")
    lenient = _lenient(raw)
    if lenient is None or lenient.WhichOneof("value") != "string_value":
        return ""
    return str(lenient.string_value.decode(errors="replace"))


def secret_hash(raw: bytes) -> str | None:
    """``hash_secret`` of an encoded AnyValue's text; None when it holds no value. A string
    is hashed from its bytes, so two keys that are not UTF-8 never share a hash."""
    n = len(raw)
    if n > 2 and raw[0] == 0x0A and raw[1] == n - 2:
        return None if raw == _DASH else _hash_bytes(raw[2:])
    lenient = _lenient(raw)
    if lenient is not None and lenient.WhichOneof("value") == "string_value":
        data: bytes = lenient.string_value
        return _hash_bytes(data) if data and data != b"-" else None
    text = value_text(raw)
    return hash_secret(text) if text is not None else None


def _hash_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def encoded_string(text: str) -> bytes:
    """``text`` as an encoded AnyValue string."""
    return common_pb2.AnyValue(string_value=text).SerializeToString()


# Every attribute verdict_of may read (tests/unit/test_telemetry_receiver.py checks it): the
# receiver derives a verdict once per distinct combination of these in an export.
VERDICT_INPUTS: tuple[str, ...] = (
    "http.response.status_code",
    "http.status_code",
    "envoy.response_code_details",
    "envoy.response_flags",
    "response_flags",
    EGRESS_VERDICT_ATTRIBUTE,
    EGRESS_RULE_ATTRIBUTE,
    "modelguard.ratelimit.limit",
    "modelguard.output.hardened",
    "envoy.rbac.audit_deny_shadow_engine_result",
    "envoy.rbac.audit_deny_shadow_effective_policy_id",
    "envoy.rbac.audit_allow_shadow_engine_result",
    "envoy.rbac.audit_allow_shadow_effective_policy_id",
)


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


class Record(NamedTuple):
    """One span or access-log record as the store keeps it.

    A sidecar's access-log record keeps as fields only what queries, counters and the
    status page read; its body and attributes stay in ``raw`` — the LogRecord as received,
    credentials already replaced by their hashes — and are decoded when read (``name``,
    ``attributes``): most records leave the store unread. Spans and records made by
    ``make_record`` carry them decoded (``title``, ``pairs``) and no ``raw``.
    """

    kind: Kind
    time_unix_nano: int
    source: str  # "sidecar" or "control-plane"
    service: str
    node: str
    title: str = ""  # span name, or the log record's body (when not in ``raw``)
    trace_id: str = ""  # hex
    span_id: str = ""
    duration_ms: float = 0.0
    status: int = 0  # HTTP status code, 0 when none
    client: str = ""  # hashed client key
    identity: str = ""  # the caller's SPIFFE ID under mTLS
    route: str = ""
    verdict: str = ""
    rule: str = ""
    pairs: tuple[tuple[str, str], ...] = ()  # the attributes (when not in ``raw``)
    raw: bytes = b""  # a serialized wire.LogRecordView, scrubbed
    size: int = 0  # bytes this record holds in memory
    seq: int = 0  # the store's arrival number (for --follow and paging); the last field

    @property
    def name(self) -> str:
        if not self.raw:
            return self.title
        return string_value(LogRecordView.FromString(self.raw).body)

    @property
    def attributes(self) -> tuple[tuple[str, str], ...]:
        """(name, text) of every attribute, sorted; credentials as hashes, plus the derived
        verdict (``modelguard.verdict``, ``modelguard.verdict.rule``)."""
        if not self.raw:
            return self.pairs
        attrs = {}
        for key, value in LogRecordView.FromString(self.raw).attributes.items():
            text = value_text(value)
            if text is not None:
                attrs[key] = text
        if self.verdict:
            attrs[VERDICT_ATTRIBUTE] = self.verdict
            if self.rule:
                attrs[VERDICT_RULE_ATTRIBUTE] = self.rule
        return tuple(sorted(attrs.items()))

    def with_seq(self, seq: int) -> Record:
        # A tuple copy with the last field replaced: this runs for every record the store
        # keeps (NamedTuple._replace would go through keyword arguments).
        return _new_record(Record, (*self[:-1], seq))


_new_record = tuple.__new__

# Per-object overhead of a Record beyond its strings: the tuple, the deque slot; and of each
# attribute pair (a decoded record's tuple of pairs). Measured with tracemalloc
# (tests/unit/test_telemetry_store.py).
RECORD_OVERHEAD = 240
_PAIR_OVERHEAD = 120


def measure(record: Record) -> int:
    return _measure(
        (
            record.source,
            record.service,
            record.node,
            record.title,
            record.trace_id,
            record.span_id,
            record.client,
            record.identity,
            record.route,
            record.verdict,
            record.rule,
        ),
        record.pairs,
    ) + (sys.getsizeof(record.raw) if record.raw else 0)


def _measure(strings: tuple[str, ...], attributes: tuple[tuple[str, str], ...]) -> int:
    getsizeof = sys.getsizeof
    size = RECORD_OVERHEAD + sum(map(getsizeof, strings)) + _PAIR_OVERHEAD * len(attributes)
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
        title=name,
        trace_id=trace_hex,
        span_id=span_hex,
        duration_ms=duration_ms,
        status=small_int(status_text),
        client=client,
        identity=identity,
        route=route,
        verdict=verdict_text,
        rule=rule,
        pairs=pairs,
        size=_measure((*strings, verdict_text, rule), pairs),
    )


def attribute_map(attributes: Iterable[common_pb2.KeyValue]) -> dict[str, str]:
    return {kv.key: any_value_text(kv.value) for kv in attributes}
