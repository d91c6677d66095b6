"""The CLI's conventions (issue 19): global flags in any position, $MODELGUARD_ADMIN,
`version`, -o json|yaml|wide with --json as its alias, validated arguments, and
not-found messages that name what was asked for."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane.app.cli import build_parser, main
from controlplane.app.cliutil import resolve_globals
from controlplane.netutil import free_port
from tests.cli.embedded import modelguard, start_serve
from tests.conftest import Processes

LISTING = [["status"], ["traces"], ["quarantine", "list"], ["usage"]]


def parse(*argv: str) -> object:
    return resolve_globals(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("command", [*LISTING, ["proxy-config", "s", "stats"]])
def test_global_flags_work_before_and_after_the_subcommand(
    command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELGUARD_ADMIN", raising=False)
    for argv in (
        ["-v", "--admin", "h:1", *command],
        [*command, "-v", "--admin", "h:1"],
        [command[0], "--admin", "h:1", *command[1:], "-v"],
    ):
        args = parse(*argv)
        assert (args.admin, args.verbose) == ("h:1", True), argv  # type: ignore[attr-defined]
    args = parse(*command)
    assert (args.admin, args.verbose) == ("127.0.0.1:18001", False)  # type: ignore[attr-defined]
    monkeypatch.setenv("MODELGUARD_ADMIN", "env:2")
    assert parse(*command).admin == "env:2"  # type: ignore[attr-defined]
    assert parse(*command, "--admin", "flag:3").admin == "flag:3"  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", LISTING)
def test_every_listing_command_takes_o_and_keeps_json(command: list[str]) -> None:
    for fmt in ("json", "yaml", "wide"):
        assert parse(*command, "-o", fmt).output == fmt  # type: ignore[attr-defined]
    args = parse(*command, "--json")
    assert (args.output, args.json) == ("json", True)  # type: ignore[attr-defined]
    assert parse(*command).output == "table"  # type: ignore[attr-defined]
    with pytest.raises(SystemExit):
        parse(*command, "-o", "xml")


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["traces", "--status", "abc"], "'abc' is not an HTTP status"),
        (["traces", "--status", "99"], "is not an HTTP status"),
        (["traces", "-n", "0"], "must be at least 1, not 0"),
        (["traces", "-n", "-1"], "must be at least 1, not -1"),
        (["traces", "-n", "many"], "'many' is not a whole number"),
        (["usage", "--top", "0"], "must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_with_a_reason(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_good_status_filters_pass() -> None:
    assert parse("traces", "--status", "4XX").status == "4xx"  # type: ignore[attr-defined]
    assert parse("traces", "--status", "403").status == "403"  # type: ignore[attr-defined]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert re.fullmatch(r"modelguard \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_help_says_where_the_global_flags_go() -> None:
    top = build_parser().format_help()
    assert "before or after the subcommand" in top and "MODELGUARD_ADMIN" in top
    sub = modelguard("quarantine", "list", "--help").stdout
    assert "global flags (any position)" in sub and "--admin HOST:PORT" in sub
    assert "-o {table,json,yaml,wide}" in sub
    assert "--admin" not in modelguard("validate", "--help").stdout  # no admin to talk to
    assert "exit" in modelguard("status", "--help").stdout.lower()


def test_a_bare_number_for_a_duration_gets_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "x.yaml"
    policy.write_text(
        (Path(__file__).parents[2] / "policies" / "extraction.yaml")
        .read_text()
        .replace("duration: 24h", "duration: 90")
    )
    assert "duration: 90" in policy.read_text()
    assert main(["validate", str(policy)]) == 1
    assert "must be a duration with a unit, e.g. 90s" in capsys.readouterr().out


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    processes = Processes(tmp_path_factory.mktemp("serve"))
    admin = free_port()
    start_serve(
        processes, "--insecure", "--policies", "policies/", "--verdicts", "",
        "--xds-port", str(free_port()), "--admin-port", str(admin),
    )  # fmt: skip
    yield f"127.0.0.1:{admin}"
    processes.stop_all()


def test_not_found_names_what_was_asked_for(control_plane: str) -> None:
    env = {"MODELGUARD_ADMIN": control_plane}
    usage = modelguard("usage", "nothing", env=env)
    assert usage.returncode == 1
    assert "no global limit whose name contains 'nothing'" in usage.stderr
    traces = modelguard("traces", "--service", "nobody", env=env)
    assert "no records match --service nobody" in traces.stderr
    status = modelguard("status", "no-such-sidecar", env=env)
    assert status.returncode == 1
    assert "no connected sidecar's id contains 'no-such-sidecar'" in status.stderr
    release = modelguard("quarantine", "release", "who", env=env)
    assert release.returncode == 1 and "who: not quarantined" in release.stderr
    config = modelguard("proxy-config", "ghost", "listeners", env=env)
    assert config.returncode == 1 and "no connected sidecar 'ghost'" in config.stderr


def test_outputs_use_one_key_style_camel_case(control_plane: str) -> None:
    env = {"MODELGUARD_ADMIN": control_plane}
    status = json.loads(modelguard("status", "--json", env=env).stdout)
    assert "generatedAt" in status and "generated_at" not in status
    as_yaml = yaml.safe_load(modelguard("status", "-o", "yaml", env=env).stdout)
    assert {k: v for k, v in as_yaml.items() if k != "generatedAt"} == {
        k: v for k, v in status.items() if k != "generatedAt"
    }
    quarantines = json.loads(modelguard("quarantine", "list", "-o", "json", env=env).stdout)
    assert "clientsMax" in quarantines["monitor"]
    usage = json.loads(modelguard("usage", "--json", env=env).stdout)
    assert "generatedAt" in usage

    def snake(value: object) -> list[str]:
        if isinstance(value, dict):
            return [k for k in value if "_" in k and k != "plaintext_on_tls"] + [
                k for v in value.values() for k in snake(v)
            ]
        if isinstance(value, list):
            return [k for v in value for k in snake(v)]
        return []

    # Map keys (reasons, counters by name) are data, not field names.
    for out in (status, usage):
        assert not snake(out), snake(out)
    # The status of a fresh control plane: policies accepted, none targets a sidecar yet.
    text = modelguard("status", env=env)
    assert text.returncode == 0, text.stdout + text.stderr
    assert "its target matches no connected sidecar" in text.stdout


def test_follow_lines_keep_the_columns_of_the_listing() -> None:
    from controlplane.app.traces_cli import _follow_widths, render
    from controlplane.gen.modelguard.admin.v1 import telemetry_pb2

    def record(service: str, verdict: str) -> telemetry_pb2.TelemetryRecord:
        return telemetry_pb2.TelemetryRecord(
            time_unix_nano=1_700_000_000_000_000_000, kind="log", service=service,
            status=403, verdict=verdict, name="POST /v1/predict", trace_id="ab" * 16,
        )  # fmt: skip

    listing = [record("digits-model", "denied")]
    widths = _follow_widths(listing, "table")
    lines = [render(listing, header=True, widths=widths)]
    # Streamed one at a time, each with other lengths than the listing's.
    for service, verdict in (("m", "allowed"), ("fraud-model-v2", "rate_limited")):
        lines.append(render([record(service, verdict)], header=False, widths=widths))
    # A value wider than its column pushes its own line only.
    lines.append(render([record("x" * 40, "denied")], header=False, widths=widths))
    lines.append(render([record("m", "denied")], header=False, widths=widths))
    text = "\n".join(lines).splitlines()
    starts = {line.index("403") for i, line in enumerate(text[1:]) if i != 3}
    assert len(starts) == 1, text  # STATUS starts in the same column on every line
    assert text[0].index("STATUS") in starts


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["run", "--listen-port", "70000"], "70000 is not a port number"),
        (["serve", "--xds-port", "x"], "'x' is not a port number"),
        (["serve", "--quota-assignment-ttl", "5"], "must be over 5 seconds"),
        (["serve", "--quota-assignment-ttl", "15s"], "(whole seconds, without a unit)"),
        (["quarantine", "release", "k", "--policy", "digits-model"], "is not namespace/name"),
    ],
)
def test_ports_seconds_and_policy_names_are_checked_too(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert complaint in capsys.readouterr().err


def test_wide_output_adds_columns() -> None:
    from controlplane.app.quarantine_cli import render as render_quarantines
    from controlplane.app.status_cli import render as render_status
    from controlplane.gen.modelguard.admin.v1 import admin_pb2

    report = admin_pb2.StatusReport()
    report.sidecars.add(
        node_id="s-0", service="svc", namespace="ns", stream="SotW", peer="ipv4:127.0.0.1:1",
        identity="spiffe://cluster.local/ns/ns/sa/svc",
    )  # fmt: skip
    assert render_status(report).splitlines()[0].split()[-1] == "VERSION"
    wide = render_status(report, wide=True).splitlines()
    assert wide[0].split()[-2:] == ["PEER", "IDENTITY"]
    assert wide[1].split()[-1] == "spiffe://cluster.local/ns/ns/sa/svc"
    entry = admin_pb2.QuarantineEntry(
        kind="quarantine", policy="demo/p", client_key="k", key_source="header", reason="prada"
    )
    entry.until.FromSeconds(int(time.time()) + 60)
    header = render_quarantines([entry], wide=True).splitlines()[0]
    assert header.split()[-3:] == ["SINCE", "KEY", "SOURCE"]
