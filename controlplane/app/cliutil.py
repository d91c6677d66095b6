"""What every ``modelguard`` subcommand shares: global flags, output formats, argument types.

Global flags (``-v``, ``--admin``) are added to the top-level parser *and* to every
subcommand parser, nested ones included, by walking the parser tree once it is built
(:func:`add_global_flags`). So they work in any position, a subcommand added later gets
them without a line of its own, and each ``--help`` lists them where they are accepted.
Their defaults are ``SUPPRESS`` so that a subcommand's parser never overwrites a value given
before the subcommand; :func:`resolve_globals` fills the defaults in after parsing.

Kept free of heavy imports: every CLI start-up pays for this module.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

DEFAULT_ADMIN = "127.0.0.1:18001"
ADMIN_ENV = "MODELGUARD_ADMIN"
# Subcommands that never talk to a control plane's admin service get no --admin.
NO_ADMIN = frozenset({"validate", "run", "serve", "bootstrap", "inject", "ca", "version"})
OUTPUT_FORMATS = ("table", "json", "yaml", "wide")

GLOBAL_FLAGS_HELP = (
    "global flags (-v, --admin) are accepted before or after the subcommand; "
    f"--admin defaults to ${ADMIN_ENV}, else {DEFAULT_ADMIN}"
)


def _add_flags(parser: argparse.ArgumentParser, admin: bool) -> None:
    group = parser.add_argument_group("global flags (any position)")
    known = parser._option_string_actions  # argparse has no public "has option" query
    if "-v" not in known and "--verbose" not in known:
        group.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
    if admin and "--admin" not in known:
        group.add_argument(
            "--admin",
            default=argparse.SUPPRESS,
            metavar="HOST:PORT",
            help=f"admin address of the control plane (default: ${ADMIN_ENV}, else "
            f"{DEFAULT_ADMIN})",
        )


def _subparsers(parser: argparse.ArgumentParser) -> Iterable[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterable[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command parser under ``parser`` (itself first), with its subcommand path."""
    yield path, parser
    for name, child in _subparsers(parser):
        yield from commands(child, (*path, name))


def add_global_flags(root: argparse.ArgumentParser) -> None:
    """Give the root and every (nested) subcommand parser the global flags."""
    _add_flags(root, admin=True)

    def walk(parser: argparse.ArgumentParser, admin: bool) -> None:
        for name, child in _subparsers(parser):
            child_admin = admin and name not in NO_ADMIN
            _add_flags(child, child_admin)
            walk(child, child_admin)

    walk(root, True)


def resolve_globals(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults of the global flags, after parsing: ``--admin``, then $MODELGUARD_ADMIN."""
    if not hasattr(args, "verbose"):
        args.verbose = False
    if not getattr(args, "admin", None):
        args.admin = os.environ.get(ADMIN_ENV) or DEFAULT_ADMIN
    if hasattr(args, "output"):
        # Listing commands read ``args.json``; --json is -o json.
        args.json = args.output == "json"
    return args


def add_output_arguments(parser: argparse.ArgumentParser, *, wide: bool = True) -> None:
    """``-o json|yaml|wide`` like kubectl, and ``--json`` kept as the alias of ``-o json``."""
    choices = [f for f in OUTPUT_FORMATS if wide or f != "wide"]
    parser.add_argument(
        "-o",
        "--output",
        choices=choices,
        default="table",
        help="output format: " + "|".join(choices) + " (default: table)",
    )
    parser.add_argument(
        "--json", dest="output", action="store_const", const="json", help="same as -o json"
    )


def emit(data: Any, output: str) -> str:
    """A JSON-ready value as ``-o json`` or ``-o yaml`` prints it (camelCase keys, the API's)."""
    if output == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False)).rstrip()
    return json.dumps(data, indent=2)


def _number_arg(text: str, cast: Callable[[str], T], what: str) -> T:
    """``cast(text)``, or the argparse error "'text' is not <what>"."""
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise argparse.ArgumentTypeError(message)


def _unit_hint(text: str, unit: str) -> str:
    """A hint for a value written with a unit (``30s``) where a bare number is wanted."""
    return f" ({unit}, without a unit)" if text[-1:].isalpha() else ""


def positive_int(text: str) -> int:
    """An argparse type: 1, 2, ... (``-n 0`` would print nothing, ``-n -1`` is no count)."""
    value = _number_arg(text, int, "a whole number")
    _check(value >= 1, f"must be at least 1, not {value}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = _number_arg(text, int, "a port number")
    _check(0 <= value <= 65535, f"{value} is not a port number (0-65535)")
    return value


def seconds_over(least: int) -> Any:
    """An argparse type: whole seconds, more than ``least``."""

    def parse(text: str) -> int:
        value = _number_arg(text, int, "a number" + _unit_hint(text, "whole seconds"))
        _check(value > least, f"must be over {least} seconds, not {value}")
        return value

    return parse


_POLICY_REF = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9.]*[a-z0-9])?")


def policy_ref(text: str) -> str:
    """An argparse type: ``namespace/name`` of a policy ('' is no filter)."""
    if text and not _POLICY_REF.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not namespace/name (e.g. demo/digits-model)")
    return text


_STATUS = re.compile(r"[1-5](?:\d\d|xx)")


def http_status(text: str) -> str:
    """An argparse type: an HTTP status (``403``) or a class (``4xx``); '' is no filter
    (argparse passes string defaults through the type too)."""
    if text and not _STATUS.fullmatch(text.lower()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an HTTP status: write a code such as 403 or a class such as 4xx"
        )
    return text.lower()


def table(rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart (kubectl's look)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cli_command(argv0: str | None = None) -> str:
    """How to call this ``modelguard`` again, for the hints a command prints: ``modelguard``
    when that is what PATH finds, else the path it was started by (``.venv/bin/modelguard``
    for ``make run``; a venv's bin folder elsewhere for an installed package)."""
    started = Path(sys.argv[0] if argv0 is None else argv0)
    if started.name != "modelguard":  # python -m controlplane.app.cli: no script to name
        return "modelguard"
    found = shutil.which("modelguard")
    if found is not None and Path(found).resolve() == started.resolve():
        return "modelguard"
    return str(started)


class _RpcError(Protocol):  # grpc.RpcError as the CLI reads it (grpc is not imported here)
    def code(self) -> Any: ...

    def details(self) -> str | None: ...


def admin_call_failed(address: str, err: _RpcError, stream: Any = None) -> int:
    """Say why a call to the admin API failed, and return the exit code: 2 when the control
    plane cannot be reached (as ``status`` documents), 1 when it answered with an error."""
    out = sys.stderr if stream is None else stream
    code = getattr(err.code(), "name", str(err.code()))
    details = err.details() or code
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        print(
            f"cannot reach the control plane at {address}: {details}\n"
            "  (is `modelguard run` or `modelguard serve` running? --admin HOST:PORT or "
            f"${ADMIN_ENV} names another address)",
            file=out,
        )
        return 2
    print(f"the control plane at {address} refused the call ({code}): {details}", file=out)
    return 1


def plain_dict(message: Any) -> dict[str, Any]:
    """A protobuf message as ``-o json|yaml`` print it: the API's camelCase keys, every field
    (empty lists and zeros included, so a script can count what is not there), and 64-bit
    integers as numbers (protobuf's JSON mapping writes them as strings: "batches": "1")."""
    from google.protobuf import json_format

    data: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, data)
    return data


_INT64 = frozenset({3, 4, 6, 16, 18})  # TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64
_MESSAGE = 11  # FieldDescriptor.TYPE_MESSAGE


def _numbers(descriptor: Any, data: dict[str, Any]) -> None:
    for field in descriptor.fields:
        value = data.get(field.json_name)
        if value is None:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                value[key] = _number(value_field, item)
        elif isinstance(value, list):
            data[field.json_name] = [_number(field, item) for item in value]
        else:
            data[field.json_name] = _number(field, value)


def _number(field: Any, value: Any) -> Any:
    if field.type in _INT64 and isinstance(value, str):
        return int(value)
    if field.type == _MESSAGE and isinstance(value, dict):
        _numbers(field.message_type, value)  # Timestamps and Structs are strings/dicts: kept
    return value


# --- argparse types for the flags of serve, run, inject and ca (issue 19: every argument is
# validated, as the user wrote it, before anything starts) ---------------------------------


def percent(text: str) -> float:
    """An argparse type: a percentage, 0 to 100."""
    value = _number_arg(text, float, "a number (a percentage)")
    _check(0 <= value <= 100, f"must be within 0..100 (a percentage), not {text}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: 0, 1, 2, ..."""
    value = _number_arg(text, int, "a whole number")
    _check(value >= 0, f"must be 0 or more, not {value}")
    return value


def seconds_at_least(least: float) -> Any:
    """An argparse type: seconds (a number, no unit), at least ``least``."""

    def parse(text: str) -> float:
        value = _number_arg(text, float, "a number" + _unit_hint(text, "seconds"))
        unit = "second" if least == 1 else "seconds"
        _check(value >= least, f"must be at least {least:g} {unit}, not {text}")  # NaN fails
        return value

    return parse


def host_port(text: str) -> str:
    """An argparse type: HOST:PORT (an OTLP endpoint, an address); '' is none."""
    if text == "":  # the default of an optional endpoint (argparse parses string defaults)
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def budget_backend(text: str) -> str:
    """An argparse type: where budgets are counted, ``memory`` or a Redis URL."""
    if text in ("", "memory") or text.startswith(("redis://", "rediss://", "unix://")):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r}: write memory, or a Redis URL (redis://HOST:PORT/DB, rediss://..., unix://...)"
    )


def existing_file(text: str) -> Path:
    """An argparse type: a file that is there (what a command reads at once)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    return Path(text)


def trust_domain(text: str) -> str:
    """An argparse type: a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_')."""
    if not re.fullmatch(r"[a-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a SPIFFE trust domain: lower-case letters, digits, '.', '-', '_'"
        )
    return text


# Option → its argparse type, wherever a subcommand has that option. The options are
# declared by the boxes that read them (identity, telemetry, cluster), which cannot import
# this module (the app is above them); their types are tightened here, in one place.
FLAG_TYPES: dict[str, Any] = {
    "--trace-sampling": percent,
    "--telemetry-max-records": positive_int,
    "--telemetry-max-bytes": positive_int,
    "--otlp-endpoint": host_port,
    "--rate-limit-backend": budget_backend,
    "--svid-lifetime": seconds_at_least(60),
    "--xds-max-connection-age": seconds_at_least(1),
    "--xff-num-trusted-hops": non_negative_int,
    "--trust-domain": trust_domain,
}
# Files a command reads at start, checked then (not while parsing: the manifests' arguments
# are parsed offline, where the pod's mounted files are not).
START_FILES = ("api_keys", "admin_token_file", "ca_cert", "ca_key", "kubeconfig")


def check_flag_values(root: argparse.ArgumentParser) -> None:
    """Give every (nested) subcommand's options of ``FLAG_TYPES`` their checking type."""
    for _, child in _subparsers(root):
        for action in child._actions:
            for option in action.option_strings:
                if option in FLAG_TYPES:
                    action.type = FLAG_TYPES[option]
        check_flag_values(child)
