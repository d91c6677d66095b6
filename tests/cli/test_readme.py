"""The README tells the truth (issue 19): its marked shell blocks are run and their output's
shape is compared with what the README shows.

A block is tested when the line before its fence is an HTML comment starting with
``<!-- readme-test: embedded`` (run against `modelguard run` on free ports; the admin address
goes in through $MODELGUARD_ADMIN) or ``<!-- readme-test: sidecar`` (run as written, as one
shell script, its port numbers swapped for free ones). Only marked blocks are read, so other
sections can change freely.

Shape: header lines (all upper case) must match column for column; other lines by their first
word, digits folded (versions, counts, ports and hashes differ from run to run). Expected
lines must appear in order; extra lines in the real output (warnings, banner lines) are
allowed. Drift fails with both outputs shown.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from controlplane.netutil import free_port, http_request
from tests.cli.embedded import MODELGUARD, Embedded, modelguard, start_embedded
from tests.conftest import REPO, Processes

pytestmark = pytest.mark.envoy

README = REPO / "README.md"
PROMPT = ".venv/bin/modelguard "


@dataclass
class Step:
    command: str  # without the prompt path and the trailing comment
    expected: list[str]


def marked_blocks(text: str, marker: str) -> list[list[str]]:
    """The lines of each fenced block whose fence follows ``<!-- readme-test: <marker>``."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith(f"<!-- readme-test: {marker}"):
            indent = len(line) - len(line.lstrip())  # a block inside a list item
            fence = lines[i + 1].lstrip()
            assert fence.startswith("```"), f"README line {i + 2}: a fence must follow"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].lstrip().startswith("```"))
            blocks.append([row[indent:] for row in lines[i + 2 : end]])
    return blocks


def steps(block: list[str]) -> list[Step]:
    out: list[Step] = []
    for line in block:
        if line.startswith(PROMPT):
            command = re.sub(r"\s+#.*$", "", line[len(PROMPT) :]).strip()
            out.append(Step(command, []))
        elif out and line.strip() and line.strip() != "...":
            out[-1].expected.append(line)
    return out


def _columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def _is_header(line: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z ]*[A-Z]", line.strip())) and "  " in line.strip()


def shape(line: str) -> tuple[str, ...]:
    if _is_header(line):
        return ("header", *_columns(line))
    first = line.split()[0]
    return ("line", re.sub(r"\d+", "#", first))


def assert_same_shape(command: str, expected: list[str], actual: str) -> None:
    have = [shape(line) for line in actual.splitlines() if line.strip()]
    at = 0
    for line in expected:
        want = shape(line)
        try:
            at = have.index(want, at) + 1
        except ValueError:
            raise AssertionError(
                f"README drift in `modelguard {command}`: no line shaped like\n  {line}\n"
                f"in the real output (after what matched before):\n{actual}"
            ) from None


def test_the_readme_marks_the_blocks_this_test_runs() -> None:
    text = README.read_text()
    embedded = [s for b in marked_blocks(text, "embedded") for s in steps(b)]
    assert {s.command.split()[0] for s in embedded} >= {"validate", "status", "proxy-config"}
    # Every tested block shows some output to compare.
    assert all(any(s.expected for s in steps(b)) for b in marked_blocks(text, "embedded"))
    assert len(marked_blocks(text, "sidecar")) == 1


def test_shape_comparison_catches_drift() -> None:
    # The comparison must be able to fail: a missing column, an unknown first word.
    actual = "SIDECAR  SERVICE  VERSION\nnode-1   svc      abc\n"
    assert_same_shape("status", ["SIDECAR  SERVICE  VERSION", "node-7  x  y"], actual)
    with pytest.raises(AssertionError, match="README drift"):
        assert_same_shape("status", ["SIDECAR  SERVICE  SDS  VERSION"], actual)
    with pytest.raises(AssertionError, match="README drift"):
        assert_same_shape("status", ["SIDECAR  SERVICE  VERSION", "policy-1  x"], actual)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    processes = Processes(tmp_path_factory.mktemp("readme"))
    try:
        yield start_embedded(processes, processes.log_dir / "workdir")
    finally:
        processes.stop_all()


@pytest.mark.timeout(300)
def test_the_readme_blocks_run_against_the_embedded_default(embedded: Embedded) -> None:
    env = {"MODELGUARD_ADMIN": embedded.admin}
    deadline = time.monotonic() + 30  # every resource type ACKed
    while "NOT_SENT" in (status := modelguard("status", env=env).stdout) or "STALE" in status:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    # What the egress sample shows: a workload's HTTP and TLS attempts to reach hosts no
    # EgressPolicy allows, through the sidecar's outbound port.
    status_code, _, _ = http_request(
        "GET", f"http://127.0.0.1:{embedded.outbound_port}/", headers={"Host": "example.com"}
    )
    assert status_code == 403
    context = ssl.create_default_context()
    with (
        socket.create_connection(("127.0.0.1", embedded.outbound_port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, OSError)),
        context.wrap_socket(raw, server_hostname="evil.example.org"),
    ):
        pass  # closed during the handshake: refused
    deadline = time.monotonic() + 30  # access logs are flushed every second
    while (status := modelguard("status", env=env).stdout).count("blocked  ") < 2:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    # What the usage sample shows: a tenant's key has spent some of the daily budget.
    keys = dict(
        line.split()
        for line in (embedded.processes.log_dir / "workdir" / "demo-keys.txt").open()
    )
    deadline = time.monotonic() + 30  # the sidecar reports budget usage every 5 s
    while "daily-budget" not in (usage := modelguard("usage", env=env).stdout):
        assert time.monotonic() < deadline, usage
        http_request(
            "POST", f"http://127.0.0.1:{embedded.listen_port}/v1/predict",
            b'{"instances": [[' + b",".join([b"1"] * 64) + b"]]}",
            {"content-type": "application/json", "x-api-key": keys["acme-standard"]},
        )  # fmt: skip
        time.sleep(1)
    for block in marked_blocks(README.read_text(), "embedded"):
        for step in steps(block):
            result = modelguard(*step.command.split(), env=env)
            assert result.returncode == 0, f"modelguard {step.command}:\n{result.stderr}"
            assert_same_shape(step.command, step.expected, result.stdout)


@pytest.mark.timeout(300)
def test_the_banner_and_proxy_config_show_the_sidecars_envoy(embedded: Embedded) -> None:
    env = {"MODELGUARD_ADMIN": embedded.admin}
    match = re.search(r"sidecar Envoy admin\s+http://127\.0\.0\.1:(\d+)/", embedded.output())
    assert match, embedded.output()
    listeners = modelguard("proxy-config", "digits-model-0", "listeners", env=env).stdout
    assert f"inbound|{embedded.listen_port}" in listeners
    clusters = modelguard("proxy-config", "digits-model-0", "clusters", env=env).stdout
    assert "modelguard-xds" in clusters and "bootstrap" in clusters
    routes = modelguard("proxy-config", "digits-model-0", "routes", "-o", "yaml", env=env)
    assert yaml.safe_load(routes.stdout)["configs"], routes.stdout
    stats = modelguard(
        "proxy-config", "digits-model-0", "stats", "--filter", "server.live", env=env
    )
    assert stats.stdout.strip() == "server.live: 1", stats.stdout
    # Read through the admin port the banner printed, the same numbers.
    direct = modelguard(
        "proxy-config", "x", "stats", "--filter", "server.live",
        "--envoy-admin", f"127.0.0.1:{match.group(1)}",
    )  # fmt: skip
    assert direct.stdout == stats.stdout


def test_kubectl_get_sample_has_the_crds_printer_columns() -> None:
    text = README.read_text()
    start = text.index("kubectl get modelguard -A")
    block = text[start : text.index("```", start)].splitlines()[1:]
    crds = {
        doc["spec"]["names"]["kind"].lower(): doc["spec"]["versions"][0]
        for path in (REPO / "k8s" / "crds").glob("*.yaml")
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    }
    tables = 0
    for header, row in itertools.pairwise(block):
        if not header.startswith("NAMESPACE"):
            continue
        kind = row.split()[1].split(".")[0]
        columns = [c["name"].upper() for c in crds[kind].get("additionalPrinterColumns", [])]
        assert _columns(header) == ["NAMESPACE", "NAME", *columns], (kind, header)
        tables += 1
    assert tables == len(crds), "one table per policy kind, as kubectl prints a category"


@pytest.mark.timeout(300)
def test_running_a_sidecar_yourself_works_as_written(tmp_path: Path) -> None:
    (block,) = marked_blocks(README.read_text(), "sidecar")
    script = "\n".join(block)
    # Every port of the block, swapped for a free one (tests never take fixed ports).
    for port in sorted(set(re.findall(r"(?<![\d.])(\d{4,5})(?![\d.])", script)), key=len):
        if int(port) > 1024:
            script = re.sub(rf"(?<![\d.]){port}(?![\d.])", str(free_port()), script)
    script = script.replace("sleep 3", "sleep 8")  # a loaded test machine is slower
    script = script.replace(".modelguard/own", str(tmp_path / "own"))
    # Each line runs as written; between steps, wait for what the previous one started.
    # A here-document (the key Secret) runs whole, through its closing EOF.
    lines: list[str] = []
    heredoc = False
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc or line.startswith((".venv/", "curl ", "sleep ", "mkdir ")):
            lines.append(line)  # the rest is output it shows
        heredoc = (heredoc or "<<'EOF'" in line) and line != "EOF"
    runner = "set -u\ncd " + str(tmp_path) + "\nln -s " + str(REPO / ".venv") + " .venv\n"
    runner += f"cp -r {REPO / 'policies'} policies\n"
    for line in lines:
        runner += line + "\n"
        if line.startswith(".venv/bin/envoy"):
            runner += "sleep 6\n"  # the sidecar connects and is configured
        if " status " in line:
            runner += "sleep 1\n"
    log = tmp_path / "block.log"
    with log.open("wb") as sink:  # a file: the block's background jobs keep writing to it
        process = subprocess.Popen(
            ["bash", "-c", runner],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PATH": f"{Path(MODELGUARD).parent}:{os.environ['PATH']}"},
        )
    try:
        process.wait(timeout=200)
        out = log.read_text(errors="replace")
    finally:
        # The block's background jobs share the script's session: stopped by its id.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    assert "wrote envoy.yaml (the bootstrap" in out, out
    assert "wrote envoy.token (" in out and "wrote envoy.token.sds.yaml (" in out, out
    assert re.search(r"digits-model\.demo\s+digits-model\.demo\s+SotW\s+SYNCED", out), out
    # The app port is served (no 503 from a sidecar without its application), and the
    # block's key is admitted: a key no Secret holds got 403 and left the reader stuck.
    assert '"predictions"' in out, out
    assert "access denied" not in out and "admits no caller" not in out, out
    assert "upstream connect error" not in out and "no healthy upstream" not in out
    assert "wasmcustom.modelguard" in out, out
    ignored = subprocess.run(
        ["git", "check-ignore", "envoy.yaml", "x.token", "x.token.sds.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == ["envoy.yaml", "x.token", "x.token.sds.yaml"]


def test_the_quarantine_list_sample_is_shaped_like_the_real_table() -> None:
    # The sample showed no FIDELITY column, a client the demo policy cannot name (a key id:
    # it names tenants) and verdict counts keyed unlike the monitor's ("quarantine 1").
    from controlplane.app.quarantine_cli import render, render_stats
    from controlplane.gen.modelguard.admin.v1 import admin_pb2

    text = README.read_text()
    start = text.index(PROMPT + "quarantine list            #")
    sample = text[start : text.index("```", start)].splitlines()[1:]
    sample = [line for line in sample if line.strip() and not line.startswith(PROMPT)]
    entry = admin_pb2.QuarantineEntry(
        kind="quarantine", policy="demo/digits-model", client_key="globex", reason="coverage",
        fidelity=0.15, distinct_queries=25,
    )  # fmt: skip
    raw = admin_pb2.QuarantineEntry(
        kind="quarantine", policy="demo/raw-header", client_key="sha256:3c1f0e9a2b7d4e81",
        reason="coverage",
    )  # fmt: skip
    for e in (entry, raw):
        e.until.FromSeconds(int(time.time()) + 86000)
    stats = admin_pb2.MonitorStats(
        queries=44817, batches=412, unparsable={"features": 3}, refused_batches=2,
        verdicts={"detection:quarantine": 1, "suspicion:throttle": 1}, clients_tracked=37,
        clients_max=2048,
    )  # fmt: skip
    real = render([entry, raw]) + "\n\n" + render_stats(stats)
    assert_same_shape("quarantine list", sample, real)
    assert "globex" in sample[1] and "(detection:quarantine 1, suspicion:throttle 1)" in text


def test_protecting_your_own_model_writes_reference_data_and_valid_policies(
    tmp_path: Path,
) -> None:
    # The section's first shell block (the reference rows, as written) and its policies
    # (the marked YAML block) must give policies that load, reference file included.
    from controlplane.api import load_paths

    text = README.read_text()
    section = text[text.index("## Protecting your own model") : text.index("## Zero trust")]
    first = section.index("```sh\n") + len("```sh\n")
    script = section[first : section.index("```", first)]
    (tmp_path / ".venv").symlink_to(REPO / ".venv")
    done = subprocess.run(
        ["bash", "-euc", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    (block,) = marked_blocks(text, "own-model")
    (tmp_path / "fraud" / "policies" / "fraud.yaml").write_text("\n".join(block) + "\n")
    loaded, violations = load_paths([str(tmp_path / "fraud" / "policies")])
    assert not violations, violations
    assert sorted(lp.policy.kind for lp in loaded) == ["AccessPolicy", "ExtractionPolicy"]


# Flags the README shows for other tools: curl, pip, kubectl, openssl, envoy, the demo
# model's module, and the --strict that `status` says it does not need.
OTHER_TOOLS_FLAGS = {
    "--cert", "--connect-to", "--force-reinstall", "--from-literal", "--key", "--no-deps",
    "--port", "--strict", "--type", "--use-dynamic-base-id", "--write-reference",
}  # fmt: skip


def test_every_flag_the_readme_names_exists() -> None:
    # A documented flag that no modelguard command has is drift a user finds by an error.
    from controlplane.app.cli import build_parser
    from controlplane.app.cliutil import commands

    options = {
        option
        for _, parser in commands(build_parser())
        for action in parser._actions  # argparse has no public list of options
        for option in action.option_strings
    }
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", README.read_text()))
    assert named - options - OTHER_TOOLS_FLAGS == set()
    assert OTHER_TOOLS_FLAGS & options == set(), "a modelguard flag is listed as another tool's"


def test_the_kubernetes_steps_come_in_the_order_they_must_run() -> None:
    # Redis's password Secret was explained after `kubectl apply -k k8s/`, whose Redis and
    # control-plane pods cannot start without it; the demo keys need the demo namespace.
    text = README.read_text()
    section = text[text.index("## Kubernetes") :]
    apply = section.index("kubectl apply -k k8s/")
    assert section.index("create secret generic modelguard-redis") < apply
    assert section.index("docker build -f") < apply
    assert section.index("kubectl -n demo create secret generic demo-keys") > apply
