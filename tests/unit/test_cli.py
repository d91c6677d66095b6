"""The `modelguard` command: validate's output and exit code, status rendering."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controlplane.app.cli import main
from controlplane.app.status_cli import render
from controlplane.gen.modelguard.admin.v1 import admin_pb2
from controlplane.pipeline import Debouncer

ROOT = Path(__file__).resolve().parents[2]

BAD = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: budget, namespace: ml}
spec:
  targetRef: {service: fraud-model}
  limits:
  - {name: burst, clientKey: {header: x-api-key}, requests: 20, per: second}
  - {name: daily, clientKey: {header: x-api-key}, requests: 10000, per: fortnight}
"""


def test_validate_accepts_the_example_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "policies")]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_prints_each_violation_with_its_path_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "rate.yaml"
    bad.write_text(BAD)
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{bad}[0] RatePolicy ml/budget: spec.limits[1].per: "
        "must be one of second, minute, hour, day, month"
    ]


def test_validate_is_a_console_script(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("kind: Deployment\napiVersion: apps/v1\n")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "modelguard"), "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "apiVersion: must be modelguard.io/v1alpha1" in result.stdout


def _report() -> admin_pb2.StatusReport:
    report = admin_pb2.StatusReport()
    sidecar = report.sidecars.add(
        node_id="digits-model-0",
        service="digits-model",
        namespace="demo",
        stream="SotW",
        snapshot_version="4c1f0e9a2b7d99",
        state="NACKED",
    )
    for kind in ("CDS", "EDS", "LDS"):
        sidecar.resources.add(type=kind, state="SYNCED", acked_version="v1")
    sidecar.resources.add(
        type="RDS",
        state="NACKED",
        acked_version="v1",
        last_nack_version="v2",
        last_nack_error="route: unknown cluster",
    )
    report.policies.add(
        kind="AccessPolicy",
        namespace="demo",
        name="digits-model",
        source="policies/a.yaml",
        generation=3,
        state="Rejected",
        serving=True,
        sidecars=["digits-model-0"],
        errors=["policies/a.yaml[0] AccessPolicy demo/digits-model: spec.x: unknown field"],
    )
    return report


def test_status_shows_states_nacks_and_policy_errors() -> None:
    text = render(_report())
    lines = text.splitlines()
    assert lines[0].split() == [
        "SIDECAR",
        "SERVICE",
        "STREAM",
        "CDS",
        "EDS",
        "LDS",
        "RDS",
        "VERSION",
    ]
    assert lines[1].split() == [
        "digits-model-0",
        "digits-model.demo",
        "SotW",
        "SYNCED",
        "SYNCED",
        "SYNCED",
        "NACKED",
        "4c1f0e9a2b7d",
    ]
    assert "digits-model-0 RDS rejected version v2: route: unknown cluster (serving v1)" in text
    assert "Rejected (last good serving)" in text
    assert "spec.x: unknown field" in text


def test_status_without_a_control_plane_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from controlplane.netutil import free_port

    assert main(["status", "--admin", f"127.0.0.1:{free_port()}"]) == 2
    assert "cannot reach the control plane" in capsys.readouterr().err


async def test_debouncer_coalesces_a_burst_and_bounds_the_delay() -> None:
    calls: list[float] = []
    debouncer = Debouncer(
        lambda: calls.append(time.monotonic()),
        asyncio.get_running_loop(),
        quiet=0.05,
        max_delay=0.3,
    )
    start = time.monotonic()
    for _ in range(5):
        debouncer.trigger()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    assert len(calls) == 1  # one rebuild for a burst of five events
    # A steady stream of events never quiet for 50 ms still fires by max_delay.
    calls.clear()
    start = time.monotonic()
    while time.monotonic() - start < 0.5:
        debouncer.trigger()
        await asyncio.sleep(0.02)
    assert calls, "max_delay must bound the wait under a continuous stream of events"
    assert calls[0] - start < 0.45


# --- A new user's path (the readme helper): what a command says when it cannot go on. ---


@pytest.mark.parametrize("command", ["run", "serve"])
def test_run_and_serve_refuse_a_policy_path_that_does_not_exist(
    command: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Outside a checkout (an installed package, run from any folder) the default policies/
    # is not there: watched as its parent folder, it served no policy at all, silently.
    monkeypatch.chdir(tmp_path)
    # Every port is one this test holds: were the check missing, nothing could start.
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = str(held.getsockname()[1])
        ports = ["--xds-port", port, "--admin-port", port]
        if command == "run":
            ports += ["--listen-port", port, "--outbound-port", "0", "--metrics-port", port]
        assert main([command, *ports]) == 2
    err = capsys.readouterr().err
    assert f"modelguard {command}: --policies policies/: no such file or folder" in err
    assert "--policies PATH" in err
    assert not list(tmp_path.iterdir()), "nothing may be written before the check"


def test_serve_in_cluster_mode_does_not_read_policy_paths() -> None:
    from controlplane.app.cli import _unusable_policy_paths, build_parser

    args = build_parser().parse_args(["serve", "--kubernetes", "--policies", "/nope"])
    assert args.kubernetes and args.policies == ["/nope"]
    assert _unusable_policy_paths("serve", ["/nope"]) is not None
    assert _unusable_policy_paths("serve", [str(ROOT / "policies")]) is None


def test_the_banner_names_the_modelguard_that_was_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from controlplane.app.cli import build_parser
    from controlplane.app.cliutil import cli_command
    from controlplane.app.runner import banner

    # An installed package: its venv is not ./.venv, so `.venv/bin/modelguard` is wrong.
    installed = tmp_path / "uservenv" / "bin" / "modelguard"
    installed.parent.mkdir(parents=True)
    installed.write_text("#!/bin/sh\n")
    installed.chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "argv", [str(installed), "run"])
    text = banner(build_parser().parse_args(["run"]), 18001, Path(".modelguard"), 15000)
    assert f"{installed} status --admin 127.0.0.1:18001" in text
    assert f"({installed} proxy-config digits-model-0 stats" in text
    assert f"{installed} traces --admin" in text
    assert ".venv/bin/" not in text
    # On PATH: the bare name. `make run`: the path it was started by. `python -m`: the name.
    monkeypatch.setenv("PATH", str(installed.parent))
    assert cli_command(str(installed)) == "modelguard"
    assert cli_command(".venv/bin/modelguard") == ".venv/bin/modelguard"
    assert cli_command(str(ROOT / "controlplane" / "app" / "cli.py")) == "modelguard"


def _stale_opentelemetry(into: Path) -> None:
    """The opentelemetry package as a plain `pip install` leaves it: xds-protos' older
    common.proto (before InstrumentationScope) over the current one. The current package is
    copied and its common_pb2 rebuilt from the same descriptor without that message."""
    import shutil

    import opentelemetry.proto.common.v1.common_pb2 as current
    from google.protobuf import descriptor_pb2

    package = Path(current.__file__).parents[3]  # .../site-packages/opentelemetry
    shutil.copytree(package, into / "opentelemetry", ignore=shutil.ignore_patterns("__pycache__"))
    older = descriptor_pb2.FileDescriptorProto()
    current.DESCRIPTOR.CopyToProto(older)
    kept = [m for m in older.message_type if m.name != "InstrumentationScope"]
    del older.message_type[:]
    older.message_type.extend(kept)
    (into / "opentelemetry" / "proto" / "common" / "v1" / "common_pb2.py").write_text(
        "from google.protobuf import descriptor_pool\n"
        "from google.protobuf.internal import builder\n"
        f"DESCRIPTOR = descriptor_pool.Default().AddSerializedFile({older.SerializeToString()!r})\n"
        "builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())\n"
        "builder.BuildTopDescriptorsAndMessages(\n"
        "    DESCRIPTOR, 'opentelemetry.proto.common.v1.common_pb2', globals()\n"
        ")\n"
    )


def test_a_plain_pip_install_gets_the_repair_command_not_a_traceback(tmp_path: Path) -> None:
    # `pip install modelguard` into a fresh venv installs xds-protos after opentelemetry-proto,
    # and xds-protos overwrites its files: `run` and `serve` died on an ImportError.
    _stale_opentelemetry(tmp_path / "stale")
    (tmp_path / "policies").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.app.cli", "serve", "--policies", "policies"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path / 'stale'}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "InstrumentationScope" in result.stderr
    repair = result.stderr.strip().splitlines()[-1].split()
    assert repair[:6] == [
        sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps"
    ], result.stderr
    # The versions modelguard pins, as make setup and the image reinstall them.
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in repair[6:]:
        assert f'"{pin}"' in pyproject, pin
    assert [p.split("==")[0] for p in repair[6:]] == [
        "opentelemetry-proto", "googleapis-common-protos"
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["usage"],
        ["usage", "unthrottle", "someone"],
        ["quarantine", "list"],
        ["quarantine", "release", "someone"],
        ["traces"],
        ["proxy-config", "digits-model-0", "listeners"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_every_admin_command_says_the_same_when_nothing_listens(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # usage said "modelguard usage: ADDRESS: ..." and exited 1 where the others exit 2; none
    # said what to check.
    from controlplane.netutil import free_port

    address = f"127.0.0.1:{free_port()}"
    assert main([*argv, "--admin", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cannot reach the control plane at {address}: "), err
    assert "`modelguard run` or `modelguard serve`" in err and "$MODELGUARD_ADMIN" in err


async def test_status_warns_of_an_access_rule_whose_key_secret_is_not_loaded(
    tmp_path: Path,
) -> None:
    # `serve --policies policies/` without --api-keys: policies/access.yaml admits the keys of
    # the Secret demo-keys, which nothing loaded. Every caller got 403 and status said only
    # "Accepted"; "Running a sidecar yourself" sent such a curl.
    from controlplane.app.runner import demo_keys
    from controlplane.app.server import ControlPlane, ControlPlaneConfig
    from controlplane.app.status_cli import fetch_status
    from controlplane.identity.service import IdentityConfig
    from controlplane.netutil import free_port

    warning = (
        "spec.rules[0].from.apiKeys.secretRef: no keys of Secret demo/demo-keys are loaded "
        "(serve --api-keys FILE; in a cluster, a Secret labelled modelguard.io/api-keys=true): "
        "this rule admits no caller"
    )
    keys, _ = demo_keys(tmp_path / "work")
    for api_keys, warned in (((), True), ((str(keys),), False)):
        plane = ControlPlane(
            ControlPlaneConfig(
                policy_paths=(str(ROOT / "policies"),),
                xds_port=free_port(),
                admin_port=0,
                watch=False,
                identity=IdentityConfig(
                    directory=str(tmp_path / "identity"), api_key_paths=api_keys
                ),
            )
        )
        await plane.start()
        try:
            report = await asyncio.to_thread(fetch_status, f"127.0.0.1:{plane.admin_port}", "")
        finally:
            await plane.stop(grace=0)
        access = next(p for p in report.policies if p.kind == "AccessPolicy")
        assert (warning in access.warnings) is warned, list(access.warnings)
        assert access.state == "Accepted"
        text = render(report)
        assert (f"AccessPolicy demo/digits-model: {warning}" in text) is warned, text


def test_a_reader_that_leaves_the_pipe_early_gets_no_traceback(tmp_path: Path) -> None:
    # `modelguard profile show | head` ended in a BrokenPipeError traceback. Here: more lines
    # than a pipe holds, and the reader closes after the first.
    bad = tmp_path / "many.yaml"
    bad.write_text("\n---\n".join(BAD for _ in range(2000)))
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "modelguard"), "validate", str(bad)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert b"spec.limits[1].per" in process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_traces_json_gives_integer_attributes_as_numbers() -> None:
    # The README: "numbers are numbers (status codes, sizes, durations, ports)"; traces --json
    # showed "http.response.status_code": "403" (the admin API carries strings).
    import json

    from controlplane.app.traces_cli import to_json
    from controlplane.gen.modelguard.admin.v1 import telemetry_pb2

    record = telemetry_pb2.TelemetryRecord(
        kind="log",
        status=403,
        attributes={
            "http.response.status_code": "403",
            "envoy.bytes_sent": "19",
            "modelguard.egress.listener.port": "15001",
            "url.path": "/v1/predict",
            "envoy.response_code_details": "rbac_access_denied_matched_policy[none]",
        },
    )
    attributes = json.loads(to_json(record))["attributes"]
    assert attributes == {
        "http.response.status_code": 403,
        "envoy.bytes_sent": 19,
        "modelguard.egress.listener.port": 15001,
        "url.path": "/v1/predict",
        "envoy.response_code_details": "rbac_access_denied_matched_policy[none]",
    }


def test_json_and_yaml_give_counts_as_numbers_and_empty_lists() -> None:
    # protobuf's JSON mapping writes 64-bit integers as strings: `quarantine list --json` had
    # "batches": "1", `usage --json` "used": "1", and no "entries" key when nobody was held.
    from controlplane.app.cliutil import emit, plain_dict
    from controlplane.gen.modelguard.admin.v1 import ratelimit_pb2

    stats = admin_pb2.MonitorStats(
        batches=3, queries=2**40, verdicts={"detection:quarantine": 2}, clients_max=2048
    )
    data = plain_dict(stats)
    assert data["batches"] == 3 and data["queries"] == 2**40 and data["clientsMax"] == 2048
    assert data["verdicts"] == {"detection:quarantine": 2}
    assert data["unobserved"] == 0 and data["unparsable"] == {}
    assert plain_dict(admin_pb2.QuarantineList())["entries"] == []
    report = ratelimit_pb2.UsageReport(backend="memory")
    limit = report.limits.add(limit="demo.x.daily", requests=10000, window_seconds=86400)
    limit.clients.add(client="acme", used=7, remaining=9993)
    limit.window_start.FromSeconds(86400)
    usage = plain_dict(report)
    assert usage["limits"][0]["clients"][0] == {
        "client": "acme", "used": 7, "remaining": 9993, "atOrOver": False
    }
    assert usage["limits"][0]["requests"] == 10000
    assert usage["limits"][0]["windowStart"] == "1970-01-02T00:00:00Z"  # a Timestamp: text
    assert "used: 7" in emit(usage, "yaml")
    status = admin_pb2.StatusReport(refused={"plaintext_on_tls": 4})
    assert plain_dict(status)["refused"] == {"plaintext_on_tls": 4}


RATE = """\
apiVersion: modelguard.io/v1alpha1
kind: RatePolicy
metadata: {name: fraud-model, namespace: ml}
spec:
  targetRef: {service: fraud-model}
  limits:
  - {name: tenant-day, clientKey: {apiKey: {groupBy: tenant}}, requests: 100, per: day,
     scope: Global}
  - {name: raw-day, clientKey: {header: x-api-key}, requests: 100, per: day, scope: Global}
"""


async def test_usage_names_verified_clients_as_quarantine_list_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A tenant's budget was listed as sha256:822b33ad87c148a0 (the fingerprint of "acme"):
    # nobody could tell which tenant was over. A raw header value is a secret: fingerprinted.
    import json

    from controlplane.app.server import ControlPlane, ControlPlaneConfig
    from controlplane.netutil import free_port
    from controlplane.ratelimit.admin import fingerprint
    from controlplane.ratelimit.rules import Rule

    (tmp_path / "rate.yaml").write_text(RATE)
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(str(tmp_path),), xds_port=free_port(), admin_port=0, watch=False
        )
    )
    await plane.start()
    try:
        budgets = plane.rate_limits.budgets
        tenant_day = Rule("ml.fraud-model.tenant-day", "ml/fraud-model", 100, 86400)
        await budgets.add(tenant_day, "acme", 7)
        await budgets.add(
            Rule("ml.fraud-model.raw-day", "ml/fraud-model", 100, 86400), "raw-secret-key", 3
        )
        await budgets.add(Rule("ml.gone.day", "ml/gone", 100, 86400), "acme", 1)
        argv = ["usage", "--json", "--admin", f"127.0.0.1:{plane.admin_port}"]
        assert await asyncio.to_thread(main, argv) == 0
    finally:
        await plane.stop(grace=0)
    shown = {
        limit["limit"]: [c["client"] for c in limit["clients"]]
        for limit in json.loads(capsys.readouterr().out)["limits"]
    }
    assert shown == {
        "ml.fraud-model.tenant-day": ["acme"],
        "ml.fraud-model.raw-day": [fingerprint("raw-secret-key")],
        "ml.gone.day": [fingerprint("acme")],  # no policy to ask: a secret, to be safe
    }
    assert fingerprint("raw-secret-key").startswith("sha256:")


def test_the_banner_under_insecure_says_the_keys_are_not_loaded() -> None:
    # run --insecure printed the demo keys and a curl "to try" that could only get 403.
    from controlplane.app.cli import build_parser
    from controlplane.app.runner import banner

    keys = {"acme-standard": "mg_k1", "acme-premium": "mg_k2", "globex-standard": "mg_k3"}
    plain = banner(build_parser().parse_args(["run"]), 18001, Path(".modelguard"), keys=keys)
    assert "Try (without a registered key: 403):" in plain and "loads none" not in plain
    insecure = banner(
        build_parser().parse_args(["run", "--insecure"]), 18001, Path(".modelguard"), keys=keys
    )
    assert "(--insecure loads none of them: the demo policy admits nobody)" in insecure
    assert "Try (403 under --insecure):" in insecure


@pytest.mark.parametrize(
    ("flag", "said"),
    [
        # Were a traceback (telemetry settings, a missing token file, a bad backend URL) ...
        ("--trace-sampling=200", "argument --trace-sampling: must be within 0..100"),
        ("--telemetry-max-records=0", "argument --telemetry-max-records: must be at least 1"),
        ("--otlp-endpoint=nonsense", "argument --otlp-endpoint: 'nonsense' is not HOST:PORT"),
        ("--rate-limit-backend=foo", "argument --rate-limit-backend: 'foo': write memory"),
        # ... or accepted and then harmful: a negative certificate lifetime, a hop count.
        ("--svid-lifetime=-1", "argument --svid-lifetime: must be at least 60 seconds"),
        ("--svid-lifetime=1h", "'1h' is not a number (seconds, without a unit)"),
        ("--xds-max-connection-age=0", "must be at least 1 second, not 0"),
        ("--xff-num-trusted-hops=-1", "argument --xff-num-trusted-hops: must be 0 or more"),
        ("--trust-domain=UPPER_case", "'UPPER_case' is not a SPIFFE trust domain"),
    ],
)
def test_serve_refuses_a_bad_flag_value_before_it_starts(
    flag: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", flag, "--policies", str(ROOT / "policies")])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err


def test_the_defaults_and_documented_values_of_those_flags_parse(tmp_path: Path) -> None:
    from controlplane.app.cli import build_parser

    parse = build_parser().parse_args
    serve = parse(["serve"])
    assert serve.otlp_endpoint == "" and serve.trust_domain == "cluster.local"
    assert serve.rate_limit_backend == "memory" and serve.svid_lifetime == 3600.0
    key = tmp_path / "keys.yaml"
    key.write_text("")
    documented = parse(
        ["serve", "--trace-sampling", "10", "--otlp-endpoint",
         "otel-collector.modelguard-system:4317", "--rate-limit-backend",
         "redis://127.0.0.1:6379/0", "--api-keys", str(key), "--xff-num-trusted-hops", "1"]
    )  # fmt: skip
    assert documented.trace_sampling == 10.0 and documented.xff_num_trusted_hops == 1
    assert parse(["run"]).trust_domain == "cluster.local"
    assert parse(["inject", "-f", "-", "--trust-domain", "example.org"]).trust_domain
    assert parse(["ca", "init"]).trust_domain == "cluster.local"


@pytest.mark.parametrize(
    ("command", "flag"),
    [("serve", "--api-keys"), ("serve", "--admin-token-file"), ("serve", "--ca-cert"),
     ("run", "--api-keys"), ("run", "--ca-cert")],
)  # fmt: skip
def test_a_file_read_at_start_must_be_there(
    command: str, flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A missing --api-keys file was ignored: every rule admitting its keys admitted nobody.
    # A missing token file or CA ended in a traceback. Checked when the command starts (the
    # manifests' arguments are parsed offline, where the pod's mounted files are not).
    missing = str(tmp_path / "nope")
    argv = [command, flag, missing, "--policies", str(ROOT / "policies")]
    if flag == "--ca-cert":
        argv += ["--ca-key", missing]
    with socket.create_server(("127.0.0.1", 0)) as held:  # were the check missing: no start
        port = str(held.getsockname()[1])
        assert main([*argv, "--xds-port", port, "--admin-port", port]) == 2
    err = capsys.readouterr().err
    assert f"modelguard {command}: {flag} {missing}: no such file or folder" in err, err


def test_bootstrap_names_an_identity_folder_without_a_control_plane_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A wrong --identity-dir (or bootstrap before serve's first start) ended in a traceback,
    # after creating a token key there that no control plane knows.
    from controlplane.identity.service import IdentityConfig, IdentityService

    argv = ["bootstrap", "--service", "digits-model", "--namespace", "demo", "--app-port",
            "8081", "--inbound-port", "10100", "--admin-port", "15100", "--xds",
            "127.0.0.1:18100", "-o", str(tmp_path / "envoy.yaml")]  # fmt: skip
    wrong = tmp_path / "not-the-identity"
    assert main([*argv, "--identity-dir", str(wrong)]) == 1
    err = capsys.readouterr().err
    assert f"--identity-dir {wrong} holds no control-plane identity" in err, err
    assert "trust-bundle.pem and bootstrap-token.key missing" in err
    assert not wrong.exists() and not (tmp_path / "envoy.yaml").exists()
    # The folder a control plane made (its first start): the bootstrap and its token.
    identity = tmp_path / "identity"
    IdentityService(IdentityConfig(directory=str(identity)))
    assert main([*argv, "--identity-dir", str(identity)]) == 0
    assert "wrote " + str(tmp_path / "envoy.token") in capsys.readouterr().out


def test_validate_warns_of_a_folder_without_policy_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A mistyped folder read "0 policies valid", like a correct one.
    (tmp_path / "notes.txt").write_text("not a policy")
    assert main(["validate", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {tmp_path}: no policy files (.yaml, .yml) in this folder" in captured.err
    assert main(["validate", str(ROOT / "policies")]) == 0
    assert "no policy files" not in capsys.readouterr().err


def test_profile_commands_name_a_missing_or_foreign_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both were tracebacks (FileNotFoundError, KeyError).
    with pytest.raises(SystemExit) as exited:
        main(["profile", "build", str(tmp_path / "nope.yaml")])
    assert exited.value.code == 2
    assert "argument policy_file: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "show", str(tmp_path / "nope.json")])
    assert "no such file" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    assert main(["profile", "show", str(other)]) == 1
    assert f"{other}: not a modelguard profile" in capsys.readouterr().err


def test_the_cli_reference_is_generated_from_the_parser() -> None:
    # docs/cli.md lists every subcommand and flag as --help shows them; a flag added without
    # regenerating it fails here.
    from controlplane.app import cli_reference

    text = cli_reference.render()
    for heading in ("## `modelguard serve`", "## `modelguard quarantine release`",
                    "## `modelguard ca init`", "## `modelguard proxy-config`"):  # fmt: skip
        assert heading in text
    assert "--rate-limit-backend RATE_LIMIT_BACKEND" in text
    assert cli_reference.REFERENCE.read_text() == text, (
        "docs/cli.md is stale: run .venv/bin/python -m controlplane.app.cli_reference"
    )


def test_a_taken_port_is_named_with_the_flag_that_moves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `make run` beside another one said "choose another port" without saying how.
    from controlplane.netutil import free_port

    monkeypatch.chdir(tmp_path)
    policies = str(ROOT / "policies")
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = str(held.getsockname()[1])
        assert main(["serve", "--policies", policies, "--xds-port", port, "--admin-port",
                     str(free_port()), "--verdicts", ""]) == 1  # fmt: skip
        assert "choose another port with --xds-port" in capsys.readouterr().err
        assert main(["run", "--policies", policies, "--listen-port", port, "--outbound-port",
                     "0", "--xds-port", str(free_port()), "--admin-port", str(free_port()),
                     "--metrics-port", str(free_port())]) == 1  # fmt: skip
        err = capsys.readouterr().err
        assert f"sidecar listener port 127.0.0.1:{port} is already in use" in err, err
        assert "choose another port with --listen-port" in err


def test_version_as_a_flag_too(capsys: pytest.CaptureFixture[str]) -> None:
    # `modelguard --version` answered "the following arguments are required: command".
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    flag = capsys.readouterr().out
    assert main(["version"]) == 0
    assert flag == capsys.readouterr().out and flag.startswith("modelguard ")


def test_every_option_of_every_command_says_what_it_is() -> None:
    # --lease-namespace, --webhook-host, inject's --inbound-port and --trust-domain, ca init's
    # --trust-domain and profile build's --seed were listed in --help with no word.
    from controlplane.app.cli import build_parser
    from controlplane.app.cliutil import commands

    silent = [
        (" ".join(path), action.option_strings)
        for path, parser in commands(build_parser())
        for action in parser._actions  # argparse has no public list of options
        if action.option_strings and not action.help
    ]
    assert silent == []


def test_cluster_mode_without_a_cluster_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Was a ConfigException traceback from the kubernetes client.
    empty = tmp_path / "kubeconfig"
    empty.write_text("")
    with socket.create_server(("127.0.0.1", 0)) as held:  # nothing could start anyway
        port = str(held.getsockname()[1])
        ports = ["--xds-port", port, "--admin-port", port, "--webhook-port", "0"]
        missing = str(tmp_path / "nope")
        assert main(["serve", "--kubernetes", "--kubeconfig", missing, *ports]) == 2
        assert f"--kubeconfig {missing}: no such file or folder" in capsys.readouterr().err
        assert main(["serve", "--kubernetes", "--kubeconfig", str(empty), *ports]) == 1
    err = capsys.readouterr().err
    said = "modelguard serve --kubernetes: no Kubernetes API server to talk to: --kubeconfig"
    assert f"{said} {empty}" in err
    assert "Traceback" not in err
