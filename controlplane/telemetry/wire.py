"""How the receiver reads OTLP log exports: a view of their wire format.

Decoded with the generated classes, every attribute of every record is a ``KeyValue`` whose
key and value must be fetched one Python call at a time; a 1 MiB export of Envoy's access
log is ~1,300 records × 20 attributes. The view decodes the same bytes (protobuf's wire
format is the contract) with attributes as a ``map<string, bytes>`` — a repeated
``KeyValue {1: key, 2: value}`` is exactly how a map is encoded — so the receiver looks up
the few attributes it needs in C and leaves each value as its encoded ``AnyValue``. Fields
the view does not name are kept as unknown fields and serialized back unchanged.

Values are ``bytes``, not strings, so a value that is not UTF-8 does not make the whole
export undecodable: Envoy sends header bytes as they came (an ``x-api-key`` with a byte
≥ 0x80 is valid HTTP), and one such request used to cost every record of its batch.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

_F = descriptor_pb2.FieldDescriptorProto
_PACKAGE = "modelguard.telemetry.wire"


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="modelguard/telemetry/wire.proto", package=_PACKAGE, syntax="proto3"
    )

    Field = tuple[str, int, int, int, str]  # name, number, type, label, message type

    def message(name: str, *fields: Field) -> descriptor_pb2.DescriptorProto:
        m = file.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            f = m.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"
        return m

    def attributes_entry(m: descriptor_pb2.DescriptorProto) -> None:
        entry = m.nested_type.add(name="AttributesEntry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)

    one, many = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
    attributes_entry(
        message("Resource", ("attributes", 1, _F.TYPE_MESSAGE, many, "Resource.AttributesEntry"))
    )
    attributes_entry(
        message(
            "LogRecord",
            ("time_unix_nano", 1, _F.TYPE_FIXED64, one, ""),
            ("body", 5, _F.TYPE_BYTES, one, ""),
            ("attributes", 6, _F.TYPE_MESSAGE, many, "LogRecord.AttributesEntry"),
            ("trace_id", 9, _F.TYPE_BYTES, one, ""),
            ("span_id", 10, _F.TYPE_BYTES, one, ""),
            ("observed_time_unix_nano", 11, _F.TYPE_FIXED64, one, ""),
        )
    )
    message("ScopeLogs", ("log_records", 2, _F.TYPE_MESSAGE, many, "LogRecord"))
    message(
        "ResourceLogs",
        ("resource", 1, _F.TYPE_MESSAGE, one, "Resource"),
        ("scope_logs", 2, _F.TYPE_MESSAGE, many, "ScopeLogs"),
    )
    message("ExportLogsServiceRequest", ("resource_logs", 1, _F.TYPE_MESSAGE, many, "ResourceLogs"))
    # An AnyValue whose string is bytes: which kind it holds, even when it is not UTF-8.
    lenient = message(
        "LenientAnyValue",
        *(
            (name, number, kind, one, "")
            for name, number, kind in (
                ("string_value", 1, _F.TYPE_BYTES),
                ("bool_value", 2, _F.TYPE_BOOL),
                ("int_value", 3, _F.TYPE_INT64),
                ("double_value", 4, _F.TYPE_DOUBLE),
                ("array_value", 5, _F.TYPE_BYTES),
                ("kvlist_value", 6, _F.TYPE_BYTES),
                ("bytes_value", 7, _F.TYPE_BYTES),
            )
        ),
    )
    lenient.oneof_decl.add(name="value")
    for f in lenient.field:
        f.oneof_index = 0
    return file


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def _class(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.{name}"))


# Typed Any: built at run time, so the type checker cannot see their fields.
ExportLogsView: Any = _class("ExportLogsServiceRequest")
LogRecordView: Any = _class("LogRecord")
LenientAnyValue: Any = _class("LenientAnyValue")

__all__ = ["DecodeError", "ExportLogsView", "LenientAnyValue", "LogRecordView"]
