"""Issue 17: what operators look at — Prometheus /metrics, the Grafana dashboards' queries, a
real Prometheus scraping the control plane, and the live page driven in a real Chromium.

One embedded default (`modelguard run`, real Envoy, demo model, registered demo keys) for the
whole module, on free ports, with a copy of policies/ that a test edits (a policy change is
what the convergence histogram measures). The tests run in file order: the last one attacks
until quarantine.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.local.model import load_digits_data
from controlplane.netutil import free_port
from tests.cli.embedded import Embedded, start_embedded
from tests.conftest import REPO, Processes

pytestmark = pytest.mark.envoy

DASHBOARDS = REPO / "k8s" / "observability"
ARTIFACTS = REPO / ".modelguard" / "artifacts"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@dataclass
class System:
    run: Embedded
    keys: dict[str, str]  # key id → key
    tmp: Path
    processes: Processes

    @property
    def envoy_admin(self) -> int:
        found = re.search(r"sidecar Envoy admin\s+http://127\.0\.0\.1:(\d+)/", self.run.output())
        assert found, self.run.output()
        return int(found.group(1))

    def predict(self, key: str | None, rows: Any) -> int:
        body = json.dumps({"instances": [[float(v) for v in row] for row in rows]}).encode()
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["x-api-key"] = key
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.run.listen_port}/v1/predict", body, headers
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.run.web}{path}", timeout=10) as response:
            return str(response.read().decode())

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Sample name → (labels, value) of every sample /metrics shows now."""
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.get("/metrics")):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
        return out

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/ui/state"))
        return result


def until(predicate: Any, timeout: float = 60.0, every: float = 0.5, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("observability")
    shutil.copytree(REPO / "policies", tmp / "policies")
    processes = Processes(tmp)
    try:
        run = start_embedded(processes, tmp / "run", policies=str(tmp / "policies"))
        keys = {}
        for line in (tmp / "run" / "demo-keys.txt").read_text().splitlines():
            key_id, _, key = line.partition(" ")
            keys[key_id] = key
        yield System(run, keys, tmp, processes)
    finally:
        processes.stop_all()


def _value(samples: list[tuple[dict[str, str], float]], **labels: str) -> float:
    return sum(v for got, v in samples if all(got.get(k) == w for k, w in labels.items()))


EXPECTED = [
    "modelguard_sidecars",  # by sync state
    "modelguard_sidecars_connected",
    "modelguard_push_duration_seconds_bucket",
    "modelguard_convergence_duration_seconds_bucket",
    "modelguard_compile_duration_seconds_bucket",
    "modelguard_xds_nacks_total",
    "modelguard_policies",
    "modelguard_verdicts_total",
    "modelguard_extraction_verdicts_total",
    "modelguard_extraction_enforcements",
    "modelguard_extraction_queries_total",
    "modelguard_extraction_clients",
    "modelguard_telemetry_records_total",
    "modelguard_ratelimit_decisions_total",
    "modelguard_extraction_fidelity_clients",  # clients by estimated fidelity (issue 10)
]


def test_metrics_show_the_control_plane_and_never_a_client_key(system: System) -> None:
    digits, _ = load_digits_data()
    # Traffic of every demo key, an anonymous caller (403) and a blocked egress request.
    for i, key in enumerate(system.keys.values()):
        assert system.predict(key, digits[i * 4 : i * 4 + 4]) == 200
    assert system.predict(None, digits[:1]) == 403
    proxy = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{system.run.outbound_port}"})
    with pytest.raises(urllib.error.HTTPError) as blocked:
        urllib.request.build_opener(proxy).open("http://example.com/", timeout=10)
    assert blocked.value.code == 403
    # A policy edit: compiled, pushed and ACKed — what the convergence histogram measures.
    rate = system.tmp / "policies" / "rate.yaml"
    rate.write_text(rate.read_text().replace("burst: 40", "burst: 41"))

    def ready() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        m = system.metrics()
        done = (
            _value(m.get("modelguard_verdicts_total", []), verdict="hardened") >= 3
            and _value(m.get("modelguard_verdicts_total", []), verdict="denied") >= 1
            and _value(m.get("modelguard_verdicts_total", []), verdict="blocked") >= 1
            and m.get("modelguard_convergence_duration_seconds_count")
        )
        return m if done else None

    metrics = until(ready, timeout=90, what="access logs and a convergence in /metrics")
    missing = [name for name in EXPECTED if name not in metrics]
    assert not missing, f"not exported: {missing}"
    assert _value(metrics["modelguard_sidecars"], state="SYNCED") == 1
    assert _value(metrics["modelguard_sidecars"], state="NACKED") == 0
    assert _value(metrics["modelguard_policies"], kind="ExtractionPolicy", state="Accepted") == 1
    assert _value(metrics["modelguard_extraction_queries_total"], outcome="observed") >= 3
    assert _value(metrics["modelguard_extraction_enforcements"], kind="quarantine") == 0
    assert _value(metrics["modelguard_ratelimit_decisions_total"], decision="ok") >= 3
    assert metrics["modelguard_push_duration_seconds_count"][0][1] >= 1
    # Bounded cardinality: no label value is a client's key, key id, tenant or a hash of one.
    secrets = set(system.keys.values()) | set(system.keys) | {"acme", "globex"}
    values = {v for samples in metrics.values() for labels, _ in samples for v in labels.values()}
    leaked = [
        v for v in values
        if v in secrets or v.startswith(("mg_", "sha256:")) or re.fullmatch(r"[0-9a-f]{16,}", v)
    ]  # fmt: skip
    assert not leaked, f"client keys as label values: {leaked}"
    for name, samples in metrics.items():
        assert len(samples) <= 64, f"{name}: {len(samples)} series"


# --- a real Prometheus ---------------------------------------------------------------------


def test_a_real_prometheus_scrapes_the_control_plane_and_the_sidecar(system: System) -> None:
    port = free_port()
    config = system.tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"- job_name: modelguard-control-plane\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{system.run.metrics_port}']}}]\n"
        f"- job_name: modelguard-sidecars\n"
        f"  metrics_path: /stats/prometheus\n"
        f"  static_configs: [{{targets: ['127.0.0.1:{system.envoy_admin}']}}]\n"
    )
    process = system.processes.start(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={system.tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        name="prometheus",
    )

    def query(promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            assert process.poll() is None, system.processes.log_of(process)
            return []
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    synced = until(
        lambda: query('modelguard_sidecars{state="SYNCED"}'), timeout=90, what="Prometheus"
    )
    assert float(synced[0]["value"][1]) == 1
    assert synced[0]["metric"]["job"] == "modelguard-control-plane"
    up = until(lambda: len(query("up == 1")) == 2 and query("up == 1"), what="both targets up")
    assert {r["metric"]["job"] for r in up} == {"modelguard-control-plane", "modelguard-sidecars"}
    hardened = until(lambda: query('sum(modelguard_verdicts_total{verdict="hardened"})'))
    assert float(hardened[0]["value"][1]) >= 3
    assert until(lambda: query("envoy_http_downstream_rq_xx"), what="Envoy's stats")


# --- the dashboards ------------------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "le",
}  # fmt: skip


def promql_metrics(expr: str) -> tuple[set[str], list[str]]:
    """(metric names, ``__name__`` regexes) a PromQL expression reads."""
    regexes = re.findall(r'__name__\s*=~\s*"([^"]*)"', expr)
    plain = re.sub(r"\$\{?\w+\}?", "0", expr)  # Grafana variables ($__rate_interval, ${x})
    plain = re.sub(r"\{[^}]*\}", "", plain)  # label matchers
    plain = re.sub(r"\[[^\]]*\]", "", plain)  # ranges
    plain = re.sub(r'"[^"]*"', "", plain)
    plain = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", plain)
    names = {
        m.group(1)
        for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", plain)
        if m.group(2) is None and m.group(1).lower() not in PROMQL_WORDS
    }
    return names, regexes


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every query in k8s/observability/*.json."""
    out = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        panels = list(board.get("panels", []))
        for panel in list(panels):
            panels.extend(panel.get("panels", []))  # rows
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, panel.get("title", ""), target["expr"]))
        for variable in board.get("templating", {}).get("list", []):
            q = variable.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if variable.get("type") == "query" and q:
                inner = re.fullmatch(r"label_values\((.*?)(,\s*\w+)?\)", q.strip())
                out.append((path.name, f"${variable['name']}", inner.group(1) if inner else q))
    return out


def test_every_dashboard_query_reads_metrics_that_are_exported(system: System) -> None:
    boards = sorted(p.name for p in DASHBOARDS.glob("*.json"))
    assert boards == ["control-plane.json", "data-path.json", "extraction-defense.json"]
    exported = set(system.metrics())
    with urllib.request.urlopen(
        f"http://127.0.0.1:{system.envoy_admin}/stats/prometheus", timeout=10
    ) as response:
        envoy_text = response.read().decode()
    exported |= {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][\w:]*)", envoy_text, re.M)}
    # The checker itself catches a name nobody exports.
    assert promql_metrics('sum(rate(modelguard_nope_total{a="b"}[5m])) by (x)')[0] == {
        "modelguard_nope_total"
    }
    queries = dashboard_queries()
    assert len(queries) >= 20
    problems = []
    for board, title, expr in queries:
        names, regexes = promql_metrics(expr)
        if not names and not regexes:
            problems.append(f"{board} {title!r}: no metric in {expr!r}")
        for name in names - exported:
            problems.append(f"{board} {title!r}: {name} is not exported ({expr})")
        for regex in regexes:
            if not any(re.fullmatch(regex, name) for name in exported):
                problems.append(f"{board} {title!r}: nothing exported matches {regex!r}")
    assert not problems, "\n".join(problems)


# --- the live page, in a real browser -------------------------------------------------------


def _post(system: System, path: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(f"{system.run.web}{path}", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_release_is_held_to_the_admin_rules(system: System) -> None:
    from controlplane.app.observability import ObservabilityServer, _Bad

    body = json.dumps({"client": "sha256:0000000000000000"}).encode()
    # Without the custom header (what a cross-site form could send): refused.
    assert _post(system, "/ui/release", body, {"content-type": "application/json"}) == 403
    # With it, a Host that is not loopback (a rebound DNS name): refused.
    rebound = {"x-modelguard-action": "release", "host": "attacker.example:80"}
    assert _post(system, "/ui/release", body, rebound) == 403
    # Well-formed, but nobody by that fingerprint is quarantined.
    assert _post(system, "/ui/release", body, {"x-modelguard-action": "release"}) == 404
    with pytest.raises(urllib.error.HTTPError) as missing:
        system.get("/nothing-here")
    assert missing.value.code == 404
    # A peer off loopback is refused whatever it sends (the admin API's rule).
    server = ObservabilityServer(None, "127.0.0.1", 0)  # type: ignore[arg-type]
    good = {"x-modelguard-action": "release", "host": "127.0.0.1:1"}
    server._authorize_release(("127.0.0.1", 5), good)
    with pytest.raises(_Bad):
        server._authorize_release(("10.1.2.3", 5), good)
    # With --admin-token-file, the admin API's bearer token as well (the page asks for it).
    token = system.tmp / "admin-token"
    token.write_text("s3cret-admin-token\n")
    guarded = ObservabilityServer(None, "127.0.0.1", 0, token_file=str(token))  # type: ignore[arg-type]
    with pytest.raises(_Bad) as refused:
        guarded._authorize_release(("127.0.0.1", 5), good)
    assert refused.value.status == 401
    with pytest.raises(_Bad):
        guarded._authorize_release(("127.0.0.1", 5), {**good, "authorization": "Bearer nope"})
    guarded._authorize_release(
        ("127.0.0.1", 5), {**good, "authorization": "Bearer s3cret-admin-token"}
    )


def _raw(system: System, request: bytes) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", system.run.metrics_port), timeout=10) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_bad_requests_get_a_clear_error_and_the_listener_keeps_serving(system: System) -> None:
    assert _raw(system, b"NONSENSE\r\n\r\n").startswith("HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 100_000 + b"\r\n\r\n"
    assert _raw(system, huge).startswith("HTTP/1.1 413 ")
    assert _raw(system, b"DELETE /metrics HTTP/1.1\r\n\r\n").startswith("HTTP/1.1 405 ")
    bad_json = (
        b"POST /ui/release HTTP/1.1\r\nHost: 127.0.0.1\r\nx-modelguard-action: release\r\n"
        b"Content-Length: 5\r\n\r\n{nope"
    )
    answer = _raw(system, bad_json)
    assert answer.startswith("HTTP/1.1 400 ") and "client" in answer, answer
    assert "modelguard_sidecars" in system.get("/metrics")


def _browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--window-size=1400,1500", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(argument)
    service = Service(CHROMEDRIVER, popen_kw={"start_new_session": True})
    return webdriver.Chrome(service=service, options=options)


@pytest.mark.timeout(300)
def test_live_page_shows_an_attack_its_evidence_and_releases_the_quarantine(
    system: System,
) -> None:
    from selenium.webdriver.common.by import By

    digits, _ = load_digits_data()
    rng = np.random.default_rng(17)
    attacker, benign = system.keys["acme-standard"], system.keys["globex-standard"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = _browser(system.tmp / "chromium-profile")
    try:
        # The page is open from the start: its charts follow the attack as it happens.
        driver.get(f"{system.run.web}/ui")
        # A uniform-noise extraction attack (tenant acme) beside a benign client (globex),
        # until the monitor quarantines the attacker; the throttle before it slows it down.
        for i in range(300):
            assert system.predict(benign, digits[(i * 4) % 1700 :][:4]) == 200
            code = system.predict(attacker, rng.uniform(0, 16, size=(8, 64)).round(1))
            if system.state()["summary"]["quarantined"]:
                break
            time.sleep(1.0 if code == 429 else 0.3)  # the page polls every 2 s
        else:
            raise AssertionError("no quarantine after 300 attack requests")
        until(lambda: system.predict(attacker, digits[:1]) == 403, what="quarantine enforced")

        def text(section: str) -> str:
            # The page redraws a section every 2 s: an element found just before a redraw
            # is stale by the time its text is read, so find it again.
            from selenium.common.exceptions import StaleElementReferenceException

            for _ in range(5):
                try:
                    return str(driver.find_element(By.ID, section).text)
                except StaleElementReferenceException:
                    time.sleep(0.1)
            return str(driver.find_element(By.ID, section).text)

        # The attacker ranks first, detected, with its evidence; its quarantine is listed;
        # its 403s show among the recent denials (access logs arrive within seconds).
        def first_row() -> str:
            return text("clients").splitlines()[2]

        until(lambda: "acme" in first_row() and "detected" in first_row(), what="acme detected")
        first = first_row()
        assert "detected" in first and "quarantine" in first, first
        assert re.search(r"\w+ [\d.e+]+ ≥ [\d.e+]+ after \d+ queries", first), first
        assert "globex" in text("clients") and "watching" in text("clients")
        quarantines = text("quarantines")
        assert "quarantine" in quarantines and "acme" in quarantines, quarantines
        until(lambda: "denied" in text("denials"), what="denials on the page")
        until(
            lambda: driver.find_elements(By.CSS_SELECTOR, "#chart polyline.series"),
            what="the verdict chart",
        )
        # The leader's risk over its queries (stage, or the estimated fidelity).
        until(lambda: driver.find_elements(By.ID, "risk-line"), what="the risk chart")
        assert "acme" in text("risk")
        assert "SYNCED" in text("sidecars") and "Accepted=True" in text("policies")
        # The tenant's daily budget, named as `usage` and `quarantine list` name a verified
        # tenant: as it is (raw header keys alone are shown by fingerprint).
        budgets = text("budgets")
        assert "daily-budget" in budgets and "acme" in budgets and "sha256:" not in budgets
        driver.save_screenshot(str(ARTIFACTS / "live-page-quarantined.png"))
        # Release from the page: the quarantine is gone and the attacker is served again.
        driver.find_element(By.CSS_SELECTOR, "#quarantines button.release").click()
        until(lambda: "released acme" in text("notice"), what="release acknowledged")
        until(lambda: "none" in text("quarantines"), what="quarantine gone from the page")
        assert not system.state()["summary"]["quarantined"]
        until(lambda: system.predict(attacker, digits[:1]) == 200, what="attacker served again")
        until(lambda: "acme" not in text("quarantines"), what="page updated")
        driver.save_screenshot(str(ARTIFACTS / "live-page-released.png"))
    finally:
        driver.quit()
    metrics = system.metrics()
    assert _value(metrics["modelguard_extraction_verdicts_total"], stage="detection") >= 1
    assert _value(metrics["modelguard_extraction_enforcements"], kind="quarantine") == 0
