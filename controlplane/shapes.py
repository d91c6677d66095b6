"""Translate once per shape: sidecars whose IRs differ only in node-specific values share
one translation, and each gets its own copy with its own values put in.

The replicas of a Deployment have the same IR except their node id (it names them in
telemetry and in the query feed) and their certificate (SDS). Translating and serializing a
thousand of them one by one is most of a rebuild; here the *shape* — the IR with those
values replaced by placeholders — is translated once, and per sidecar only the few
resources that carry a placeholder are copied and filled in (a listener, an extension
config, the secrets); everything else is the same interned ``Resource`` for all of them.

Trust, but verify: a template is used only if filling it in for the first sidecar of the
shape gives byte for byte what translating that sidecar gives. A module that derives
anything from a node-specific value (hashes it, changes its case) instead of embedding it
therefore costs speed, never correctness: its shapes are translated sidecar by sidecar.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from google.protobuf import any_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controlplane.ir import SidecarIR, evolve
from controlplane.xds.snapshot import InconsistentSnapshot, Snapshot
from controlplane.xds.wire import (
    WIRE_32,
    WIRE_64,
    WIRE_LEN,
    WIRE_VARINT,
    field_tag,
    read_varint,
    varint,
)

log = logging.getLogger(__name__)

# Placeholders: plain lower-case words that no escaping or quoting changes, and that no
# real input contains (they are checked against the values they stand for).
_NODE = "mgshapenode0c7a41e9"
_CERT = "mgshapecert0c7a41e9"
_KEY = "mgshapekey0c7a41e9"
_PLACEHOLDERS = (_NODE, _CERT, _KEY)
_PLACEHOLDER_BYTES = tuple(p.encode() for p in _PLACEHOLDERS)

# A value put in place of a placeholder inside a longer string (a JSON document, a stat
# prefix) must be one that no escaping would have changed; others may only fill a field
# that is exactly the placeholder (a PEM block is a whole inline_string).
_EMBEDDABLE = re.compile(r"[A-Za-z0-9._:/@+=~-]*")

_ANY = any_pb2.Any.DESCRIPTOR.full_name


class _CannotTemplate(Exception):
    pass


def shape_of(ir: SidecarIR) -> tuple[SidecarIR, dict[str, str]]:
    """The IR with its node-specific values replaced by placeholders, and those values."""
    values = {_NODE: ir.node_id}
    if ir.mtls is None:
        return evolve(ir, node_id=_NODE), values
    cert = ir.mtls.certificate
    values[_CERT] = cert.certificate_pem
    values[_KEY] = cert.private_key_pem
    placeholders = evolve(cert, certificate_pem=_CERT, private_key_pem=_KEY)
    return evolve(ir, node_id=_NODE, mtls=evolve(ir.mtls, certificate=placeholders)), values


# -- where the placeholders are, on the wire --

# A personal resource is kept as its serialized bytes cut around the placeholders: a list
# of parts, each either bytes copied as they are, a string field holding a placeholder, or
# a length-delimited field (a sub-message, or the message packed in an Any) whose own parts
# hold one. Filling in re-encodes only those fields and the lengths that enclose them, so
# everything else keeps the exact bytes translate produced (map order included).
_Part = bytes | tuple[bytes, str] | tuple[bytes, list["_Part"]]  # raw, or (tag, …)

_SIZES = tuple(varint(n) for n in range(1 << 14))  # lengths of up to 16 KiB: two bytes


def _contains(data: bytes) -> bool:
    return any(p in data for p in _PLACEHOLDER_BYTES)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return read_varint(data, pos)
    except ValueError as err:
        raise _CannotTemplate(str(err)) from err


def _descriptor_of(type_url: str) -> Descriptor:
    name = type_url.rsplit("/", 1)[-1]
    try:
        return descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError as err:
        raise _CannotTemplate(f"unknown type {name} in an Any") from err


def _any_type_url(data: bytes) -> str:
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        if key & 7 != WIRE_LEN:
            raise _CannotTemplate("an Any that is not an Any")
        size, pos = _read_varint(data, pos)
        if key >> 3 == 1:
            return data[pos : pos + size].decode()
        pos += size
    raise _CannotTemplate("an Any without a type URL")


def _cut(data: bytes, descriptor: Descriptor) -> list[_Part]:
    """``data`` (a serialized ``descriptor`` message holding a placeholder) as parts."""
    is_any = descriptor.full_name == _ANY
    packed = _descriptor_of(_any_type_url(data)) if is_any else None
    parts: list[_Part] = []
    raw_from = pos = 0
    while pos < len(data):
        field_start = pos
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            _, pos = _read_varint(data, pos)
            continue
        if wire == WIRE_64:
            pos += 8
            continue
        if wire == WIRE_32:
            pos += 4
            continue
        if wire != WIRE_LEN:
            raise _CannotTemplate(f"wire type {wire}")
        size, payload_at = _read_varint(data, pos)
        pos = payload_at + size
        payload = data[payload_at:pos]
        if not _contains(payload):
            continue
        field = descriptor.fields_by_number.get(number)
        if field is None:
            raise _CannotTemplate(f"unknown field {number} of {descriptor.full_name}")
        if raw_from < field_start:
            parts.append(data[raw_from:field_start])
        if is_any and number == 2:
            assert packed is not None
            parts.append((field_tag(number), _cut(payload, packed)))
        elif is_any:
            raise _CannotTemplate("a placeholder in a type URL")
        elif field.type == FieldDescriptor.TYPE_STRING:
            if descriptor.GetOptions().map_entry and number == 1:
                raise _CannotTemplate("a placeholder in a map key")
            parts.append((field_tag(number), payload.decode()))
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            parts.append((field_tag(number), _cut(payload, field.message_type)))
        else:
            raise _CannotTemplate(f"a placeholder in {field.full_name}")
        raw_from = pos
    if raw_from < len(data):
        parts.append(data[raw_from:])
    return parts


# A personal resource flattened for values of given lengths: its bytes as literal pieces
# and placeholders. Every enclosing length depends only on the values' lengths, so replicas
# whose node ids are as long as each other share one flat form, and filling one in is a
# single join instead of a walk down the nested parts.
_Flat = tuple[bytes | str, ...]
_SPLIT = re.compile("(" + "|".join(_PLACEHOLDERS) + ")")


@dataclass(frozen=True)
class _FlatForm:
    resources: dict[str, dict[str, _Flat]]  # type URL → name → pieces
    embedded: frozenset[str]  # placeholders that sit inside a longer string


def _flat_string(
    value: str, lengths: Mapping[str, int], embedded: set[str]
) -> tuple[list[bytes | str], int]:
    if value in lengths:
        return [value], lengths[value]
    pieces: list[bytes | str] = []
    size = 0
    for i, piece in enumerate(_SPLIT.split(value)):
        if i % 2:
            if piece not in lengths:
                raise _CannotTemplate("a placeholder without a value")
            embedded.add(piece)
            pieces.append(piece)
            size += lengths[piece]
        elif piece:
            data = piece.encode()
            pieces.append(data)
            size += len(data)
    return pieces, size


def _flatten(
    parts: list[_Part], lengths: Mapping[str, int], embedded: set[str]
) -> tuple[list[bytes | str], int]:
    out: list[bytes | str] = []
    total = 0
    for part in parts:
        if isinstance(part, bytes):
            out.append(part)
            total += len(part)
            continue
        tag, inner = part
        pieces, size = (
            _flat_string(inner, lengths, embedded)
            if isinstance(inner, str)
            else _flatten(inner, lengths, embedded)
        )
        prefix = tag + (_SIZES[size] if size < len(_SIZES) else varint(size))
        out.append(prefix)
        out += pieces
        total += len(prefix) + size
    return out, total


def _merged(pieces: list[bytes | str]) -> _Flat:
    out: list[bytes | str] = []
    for piece in pieces:
        if isinstance(piece, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += piece
        else:
            out.append(piece)
    return tuple(out)


def _flat_form(
    personal: dict[str, dict[str, list[_Part]]], lengths: Mapping[str, int]
) -> _FlatForm:
    embedded: set[str] = set()
    resources = {
        type_url: {
            name: _merged(_flatten(parts, lengths, embedded)[0]) for name, parts in items.items()
        }
        for type_url, items in personal.items()
    }
    return _FlatForm(resources, frozenset(embedded))


# -- templates --


@dataclass(frozen=True)
class _Template:
    snapshot: Snapshot  # the shape's snapshot; its personal resources get replaced
    personal: dict[str, dict[str, list[_Part]]]  # type URL → name → serialized, cut
    # Flat forms by the values' byte lengths (placeholder, length), filled in as needed.
    flat: dict[tuple[tuple[str, int], ...], _FlatForm] = field(default_factory=dict)


Translator = Callable[[SidecarIR], Mapping[str, list[Message]]]


class ShapeCache:
    """Templates of the shapes seen in the latest rebuild (older ones are dropped).

    A shape gets a template the second time it is seen: a sidecar whose shape is its own
    (a local sidecar with ports of its own) costs one translation, as without templates.
    """

    def __init__(self, translate: Translator) -> None:
        self._translate = translate
        self._templates: dict[SidecarIR, _Template | None] = {}
        # Shapes seen once: the values and snapshot of that sidecar, to verify a template.
        self._once: dict[SidecarIR, tuple[dict[str, str], Snapshot]] = {}
        self._used: set[SidecarIR] = set()
        # The latest shape that had a template: replicas come one after the other, and
        # recognising theirs by identity spares hashing a whole IR per sidecar.
        self._last: tuple[SidecarIR, _Template] | None = None
        self.translations = 0  # full translations done (for tests and benchmarks)
        self.filled = 0  # snapshots made from a template

    def begin(self) -> None:
        self._used = set()
        self._last = None

    def end(self) -> None:
        """Forget the shapes the rebuild did not use: they hold protos and snapshots."""
        for shape in [s for s in self._templates if s not in self._used]:
            del self._templates[shape]
        self._once.clear()
        self._last = None

    def snapshot(self, ir: SidecarIR) -> Snapshot:
        """The sidecar's snapshot. Raises InconsistentSnapshot as ``Snapshot.build`` does."""
        shape, values = shape_of(ir)
        if any(p in v for v in values.values() for p in _PLACEHOLDERS):
            return self._full(ir)  # a value that contains a placeholder: never guess
        if self._last is not None and _same_shape(shape, self._last[0]):
            return self._fill(ir, self._last[1], values)
        self._used.add(shape)
        if shape not in self._templates:
            first = self._once.pop(shape, None)
            if first is None:
                snapshot = self._full(ir)
                self._once[shape] = (values, snapshot)
                return snapshot
            self._templates[shape] = self._verified(shape, *first)
        template = self._templates[shape]
        if template is None:
            return self._full(ir)
        self._last = (shape, template)
        return self._fill(ir, template, values)

    def _fill(self, ir: SidecarIR, template: _Template, values: Mapping[str, str]) -> Snapshot:
        try:
            snapshot = _apply(template, values)
        except _CannotTemplate:
            return self._full(ir)
        self.filled += 1
        return snapshot

    def _full(self, ir: SidecarIR) -> Snapshot:
        self.translations += 1
        return Snapshot.build(self._translate(ir))

    def _verified(
        self, shape: SidecarIR, values: Mapping[str, str], real: Snapshot
    ) -> _Template | None:
        """The shape's template if filling it in with ``values`` gives ``real``."""
        try:
            self.translations += 1
            template = _template(Snapshot.build(self._translate(shape)))
            filled = _apply(template, values)
        except (_CannotTemplate, InconsistentSnapshot) as err:
            log.debug("shape of %s is translated sidecar by sidecar: %s", values[_NODE], err)
            return None
        if filled.version != real.version or not _same(filled, real):
            log.warning(
                "sidecar %s: its template does not reproduce its translation; its shape is "
                "translated sidecar by sidecar (a module derives something from a node id?)",
                values[_NODE],
            )
            return None
        return template


_FIELDS = tuple(f.name for f in dataclasses.fields(SidecarIR))


def _same_shape(a: SidecarIR, b: SidecarIR) -> bool:
    """``a == b``, mostly by identity: replicas copied from one compile share their parts."""
    return all(
        getattr(a, name) is getattr(b, name) or getattr(a, name) == getattr(b, name)
        for name in _FIELDS
    )


def _template(snapshot: Snapshot) -> _Template:
    personal: dict[str, dict[str, list[_Part]]] = {}
    for type_url in snapshot.type_urls():
        if any(p in n for n in snapshot.referenced(type_url) for p in _PLACEHOLDERS):
            raise _CannotTemplate("a placeholder in a referenced name")
        for name, res in snapshot.resources(type_url).items():
            if any(p in name for p in _PLACEHOLDERS):
                raise _CannotTemplate("a placeholder in a resource name")
            if _contains(res.any.value):
                cut = _cut(res.any.value, _descriptor_of(type_url))
                personal.setdefault(type_url, {})[name] = cut
    return _Template(snapshot, personal)


def _apply(template: _Template, values: Mapping[str, str]) -> Snapshot:
    """The template filled in: one join per personal resource (see ``_flatten``)."""
    encoded = {p: v.encode() for p, v in values.items()}
    key = tuple((p, len(v)) for p, v in encoded.items())
    form = template.flat.get(key)
    if form is None:
        form = template.flat[key] = _flat_form(template.personal, dict(key))
    for placeholder in form.embedded:
        if not _EMBEDDABLE.fullmatch(values[placeholder]):
            raise _CannotTemplate("a value that escaping could change, inside a string")
    return template.snapshot.replace(
        {
            type_url: {
                name: b"".join([encoded[p] if isinstance(p, str) else p for p in pieces])
                for name, pieces in items.items()
            }
            for type_url, items in form.resources.items()
        }
    )


def _same(a: Snapshot, b: Snapshot) -> bool:
    if a.type_urls() != b.type_urls():
        return False
    for type_url in a.type_urls():
        ra, rb = a.resources(type_url), b.resources(type_url)
        if ra.keys() != rb.keys() or any(ra[n].any.value != rb[n].any.value for n in ra):
            return False
    return True
