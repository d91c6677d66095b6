"""The policy tax: what modelguard's sidecar costs on the data path, against a bare Envoy.

Every sidecar is a real Envoy (one worker) configured over xDS by a real control plane
(in this process: CA and SVIDs over SDS, rate limit and quota services, the extraction
monitor's feed receiver, the OTLP receiver), in front of the same fixed backend: an Envoy
answering the digits model's real JSON answer by ``direct_response``, so the backend costs
next to nothing and the sidecar's work is what is measured. ``wrk`` (one thread, keep-alive,
16 connections) POSTs real digits queries with 100 API keys.

Variants, each against its baseline measured right before it (bare, variant, bare, ...;
the order of variants shuffled every round, so the machine's noise hits both sides):

  one hop (wrk → sidecar → backend), baseline ``bare``: a static Envoy with only a router
    empty      a modelguard sidecar with no policy (the xDS-delivered skeleton)
    rbac       AccessPolicy: default deny, 4 rules by method and path
    apikey     AccessPolicy allowing 100 API keys (Lua SHA-256 of x-api-key; Permissive)
    tenants    the same keys with metadata (10 tenants, 2 tiers): the sidecar verifies the key
               and sets its id, tenant and tier headers, after dropping caller-sent ones
    local      RatePolicy: a per-client token bucket (Local)
    budget     RatePolicy: a per-client daily budget (Global: RLQS quota assignments)
    wasm       ExtractionPolicy: output hardening (top-1, 2 digits) in the Wasm filter
    feed       ExtractionPolicy: hardening + detection (the query feed to the monitor)
    telemetry  OTel tracer (the default 1 % sampling) + OTel access log to the OTLP receiver
  two hops (wrk → client sidecar → sidecar → backend), baseline ``bare-pair``: two bare
  router Envoys in a row; mTLS needs a client side, and wrk has no client certificates
    mtls       mutual TLS (Strict) with SVIDs over SDS, client sidecar originating it
    native     mTLS + RBAC by SPIFFE ID + the local limit: the native set
    full       mTLS + RBAC (identity and API keys) + local limit + daily budget +
               Wasm hardening + query feed + telemetry: the full set

Reported per variant: median requests/s, p50/p99 latency (wrk, closed loop), the median
ratio of requests/s to its adjacent baseline and the spread (min-max) of that ratio over
rounds, and the proxies' CPU per request (user + system of the Envoys on the path, from
/proc, as a ratio to the baseline's): on a shared machine that isolates the sidecar's own
cost better than throughput does. Control-plane CPU per request is reported too (it shares
the machine here; in a cluster it does not sit on the sidecar's cores).

``--instructions N`` replaces wrk by a count that the machine's load moves far less:
every proxy on the measured paths runs under valgrind's callgrind, and N requests (after N of
warm-up, one keep-alive connection, the same bodies and keys) give each proxy's instructions
per request. It leaves out the kernel's share (sockets, ~25 % of a bare Envoy's CPU here), so
its ratios overstate CPU ratios a little; it is the figure to compare configurations with.
Timers (the feed's flush ticks, quota reports, stats) run by wall time, and under callgrind a
request takes ~50x its time, longer still on a loaded machine: their share of the count grows
with the load (±8 % on the full set between a quiet and a loaded run). So each path is then
left idle for ``--idle-windows`` (3) times as long as its count took, and the table also
gives the count less that idle share per window ("net of idle"). The timers tick every 5 s
(quota reports and stats flushes, each millions of instructions), so the
count's window is stretched to whole 5 s periods and so is each idle window: both then
hold as many ticks, and averaging the idle share over several windows makes "net of idle"
move less still. ``--callgrind-dir DIR`` keeps the dumps (the idle windows' in ``idle/``);
the proxies' stats are read outside the count (an admin call that reads them costs
millions of instructions), and a configuration update taken during the count is reported
(it would be charged to the requests).

The baselines are fair (checked for issue 9, unchanged): the same Envoy binary, one worker
each, the same HTTP settings on every hop (codec AUTO with default HTTP/1 options, request
ids generated, HTTP/1.1 to the backend; the mesh hop's TLS offers no ALPN, so it is HTTP/1.1
like the bare pair's plaintext hop), a router and nothing else. Nothing in the sidecars'
bootstrap costs per request: a static copy of the native set's two xDS-configured sidecars
(listeners, routes, clusters, secrets inlined; no ADS, no runtime layers, no node metadata)
spends the same instructions per request within 1 %, and so do the access log with its
runtime-keyed status filter, the local reply mappers, the RBAC stat prefixes, request-id
generation, the local limit's LRU bound and its second (no-key) action. What a sidecar adds
over its baseline is the work of its features.

    .venv/bin/python bench/policy_tax.py [--seconds 3] [--rounds 3] [--only full,native]
                                         [--json FILE] [--instructions 300]
                                         [--callgrind-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import math
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib.load import (  # noqa: E402
    WrkResult,
    backend_bootstrap,
    cpu_seconds,
    router_bootstrap,
    wrk,
)
from controlplane.app.server import ControlPlane, ControlPlaneConfig  # noqa: E402
from controlplane.compile.inputs.inventory import Sidecar  # noqa: E402
from controlplane.identity.service import IdentityConfig  # noqa: E402
from controlplane.local.envoy import EnvoyProcess, envoy_binary  # noqa: E402
from controlplane.netutil import free_port, http_request  # noqa: E402
from controlplane.sidecar.bootstrap import XdsCredentials, build_bootstrap  # noqa: E402
from controlplane.telemetry.settings import TelemetrySettings  # noqa: E402

NS = "bench"
CLIENT_NS = "web"
KEYS = 100
SAMPLES = 64
T = TypeVar("T")


def spiffe(namespace: str, service: str) -> str:
    return f"spiffe://cluster.local/ns/{namespace}/sa/{service}"


# --- policies ------------------------------------------------------------------------------


def access(service: str, *, mtls: str | None, callers: list[str]) -> str:
    """A realistic AccessPolicy: deny admin paths, allow predict for ``callers``, health."""
    predict = (
        "  - name: NAME\n    action: Allow\nFROM"
        "    to: {methods: [POST], paths: [/v1/predict, '/v1/models/*']}\n"
    )
    rules = "  - name: no-admin\n    action: Deny\n    to: {paths: ['/admin/*']}\n"
    if not callers:
        rules += predict.replace("NAME", "predict").replace("FROM", "")
    for i, caller in enumerate(callers):
        rules += predict.replace("NAME", f"predict-{i}").replace("FROM", f"    from: {caller}\n")
    rules += "  - name: health\n    action: Allow\n    to: {methods: [GET], paths: [/healthz]}\n"
    mode = f"  mtls: {{mode: {mtls}}}\n" if mtls else ""
    return (
        "apiVersion: modelguard.io/v1alpha1\nkind: AccessPolicy\n"
        f"metadata: {{name: {service}, namespace: {NS}}}\n"
        f"spec:\n  targetRef: {{service: {service}}}\n{mode}"
        f"  defaultAction: Deny\n  rules:\n{rules}---\n"
    )


def mtls_only(service: str) -> str:
    """Strict mTLS and nothing else: every authenticated caller is allowed."""
    return (
        "apiVersion: modelguard.io/v1alpha1\nkind: AccessPolicy\n"
        f"metadata: {{name: {service}, namespace: {NS}}}\n"
        f"spec:\n  targetRef: {{service: {service}}}\n  mtls: {{mode: Strict}}\n"
        "  defaultAction: Allow\n  rules:\n  - name: no-admin\n    action: Deny\n"
        "    to: {paths: ['/admin/*']}\n---\n"
    )


def rate(service: str, *, local: bool, budget: bool) -> str:
    limits = ""
    if local:
        limits += (
            "  - {name: burst, clientKey: {header: x-api-key}, requests: 1000000, per: second,"
            " scope: Local}\n"
        )
    if budget:
        limits += (
            "  - {name: daily, clientKey: {header: x-api-key}, requests: 1000000000, per: day,"
            " scope: Global, cost: instances}\n"
        )
    return (
        "apiVersion: modelguard.io/v1alpha1\nkind: RatePolicy\n"
        f"metadata: {{name: {service}, namespace: {NS}}}\n"
        f"spec:\n  targetRef: {{service: {service}}}\n  limits:\n{limits}---\n"
    )


def extraction(service: str, *, detection: bool) -> str:
    text = (
        "apiVersion: modelguard.io/v1alpha1\nkind: ExtractionPolicy\n"
        f"metadata: {{name: {service}, namespace: {NS}}}\n"
        f"spec:\n  targetRef: {{service: {service}}}\n  clientKey: {{header: x-api-key}}\n"
        "  request: {features: '$.instances[*]'}\n"
        "  response: {scores: '$.predictions[*].probabilities', label: '$.predictions[*].label'}\n"
        "  output: {topK: 1, roundDigits: 2}\n"
    )
    if detection:
        text += (
            "  detection: {detectors: [prada, nearDuplicate, coverage], sensitivity: medium,\n"
            f"    reference: {{file: {ROOT / 'policies' / 'digits-reference.csv'}, "
            "labelColumn: label}}\n"
            "  actions:\n    onSuspicion: {throttle: {requests: 60, per: minute}}\n"
            "    onDetection: {quarantine: {duration: 24h}}\n"
        )
    return text + "---\n"


API_KEYS_SECRET = (
    "apiVersion: v1\nkind: Secret\n"
    f"metadata: {{name: bench-keys, namespace: {NS}}}\nstringData:\n"
    + "".join(f"  client-{i}: key-{i}\n" for i in range(KEYS))
)
FROM_KEYS = "{apiKeys: {secretRef: bench-keys}}"
# The same keys with a tenant (10 keys each) and a tier (issue 14's key verification and
# tenant lookup).
TENANT_KEYS_SECRET = (
    "apiVersion: v1\nkind: Secret\n"
    f"metadata:\n  name: bench-tenant-keys\n  namespace: {NS}\n"
    "  annotations:\n    modelguard.io/keys: |\n"
    + "".join(
        f"      client-{i}: {{tenant: tenant-{i // 10}, tier: {('standard', 'premium')[i % 2]}}}\n"
        for i in range(KEYS)
    )
    + "stringData:\n"
    + "".join(f"  client-{i}: key-{i}\n" for i in range(KEYS))
)
FROM_TENANT_KEYS = "{apiKeys: {secretRef: bench-tenant-keys}}"
# The full set's caller is a mesh workload that also sends a key: since issue 14 a key sent
# beside a client certificate must name that workload among its principals.
BOUND_KEYS_SECRET = (
    "apiVersion: v1\nkind: Secret\n"
    f"metadata:\n  name: bench-bound-keys\n  namespace: {NS}\n"
    "  annotations:\n    modelguard.io/keys: |\n"
    + "".join(
        f'      client-{i}: {{principals: ["{spiffe(CLIENT_NS, "client-full")}"]}}\n'
        for i in range(KEYS)
    )
    + "stringData:\n"
    + "".join(f"  client-{i}: key-{i}\n" for i in range(KEYS))
)
FROM_BOUND_KEYS = "{apiKeys: {secretRef: bench-bound-keys}}"


# --- variants ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    plane: str  # which control plane serves it: "plain" | "telemetry" | "mesh" | "full"
    hops: int  # 1: wrk → sidecar; 2: wrk → client sidecar → sidecar (mTLS)
    policies: str = ""
    # Strings the sidecar's listener config must contain: the variant carries what it claims.
    expect: tuple[str, ...] = ()
    hardened: bool = False


def variants() -> list[Variant]:
    native_from = f'{{identities: ["{spiffe(CLIENT_NS, "client-native")}"]}}'
    full_from = f'{{identities: ["{spiffe(CLIENT_NS, "client-full")}"]}}'
    return [
        Variant("empty", "modelguard sidecar, no policy", "plain", 1),
        Variant(
            "rbac",
            "RBAC (4 rules, default deny)",
            "plain",
            1,
            access("rbac", mtls=None, callers=[]),
            ("modelguard.access.allow",),
        ),
        Variant(
            "apikey",
            "RBAC by API key (100 keys, Lua SHA-256)",
            "mesh",
            1,
            access("apikey", mtls="Permissive", callers=[FROM_KEYS]),
            ("envoy.filters.http.lua", "modelguard.access.allow"),
        ),
        Variant(
            "tenants",
            "API key + key id, tenant, tier (10 tenants)",
            "mesh",
            1,
            access("tenants", mtls="Permissive", callers=[FROM_TENANT_KEYS]),
            ("envoy.filters.http.lua", "modelguard.access.allow", "tenant-9"),
        ),
        Variant(
            "local",
            "local per-client token bucket",
            "plain",
            1,
            rate("local", local=True, budget=False),
            ("modelguard.rate.local",),
        ),
        Variant(
            "budget",
            "global daily budget (RLQS)",
            "plain",
            1,
            rate("budget", local=False, budget=True),
            ("modelguard.rate.quota.",),
        ),
        Variant(
            "wasm",
            "Wasm output hardening",
            "plain",
            1,
            extraction("wasm", detection=False),
            ("modelguard.extraction.",),
            hardened=True,
        ),
        Variant(
            "feed",
            "Wasm hardening + query feed",
            "plain",
            1,
            extraction("feed", detection=True),
            ("modelguard.extraction.",),
            hardened=True,
        ),
        Variant(
            "telemetry",
            "OTel tracer + access log",
            "telemetry",
            1,
            expect=("envoy.tracers.opentelemetry", "envoy.access_loggers.open_telemetry"),
        ),
        Variant(
            "mtls",
            "mTLS (Strict, SDS)",
            "mesh",
            2,
            mtls_only("mtls"),
            ("envoy.transport_sockets.tls",),
        ),
        Variant(
            "native",
            "native set: mTLS + RBAC + local limit",
            "mesh",
            2,
            access("native", mtls="Strict", callers=[native_from])
            + rate("native", local=True, budget=False),
            ("envoy.transport_sockets.tls", "modelguard.access.allow", "modelguard.rate.local"),
        ),
        Variant(
            "full",
            "full set: native + API keys + budget + Wasm + feed + telemetry",
            "full",
            2,
            access("full", mtls="Strict", callers=[full_from, FROM_BOUND_KEYS])
            + rate("full", local=True, budget=True)
            + extraction("full", detection=True),
            (
                "envoy.transport_sockets.tls",
                "envoy.filters.http.lua",
                "modelguard.access.allow",
                "modelguard.rate.local",
                "modelguard.rate.quota.",
                "modelguard.extraction.",
                "envoy.tracers.opentelemetry",
            ),
            hardened=True,
        ),
    ]


PLANES = {
    # name: (runs a CA: mTLS, API keys; sidecars send telemetry)
    "plain": (False, False),
    "telemetry": (False, True),
    "mesh": (True, False),
    "full": (True, True),
}


# --- the run -------------------------------------------------------------------------------


def wrk_script(host: str) -> str:
    """POSTs real digits queries, cycling through ``KEYS`` API keys."""
    from sklearn.datasets import load_digits

    data = load_digits().data[:SAMPLES]
    bodies = ", ".join(
        json.dumps(json.dumps({"instances": [[float(v) for v in row]]})) for row in data
    )
    return (
        f"local bodies = {{{bodies}}}\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        "  return wrk.format('POST', '/v1/predict', {\n"
        "    ['content-type'] = 'application/json',\n"
        f"    ['Host'] = '{host}',\n"
        f"    ['x-api-key'] = 'key-' .. (n % {KEYS}),\n"
        f"  }}, bodies[(n % {SAMPLES}) + 1])\n"
        "end\n"
    )


def digits_bodies() -> list[str]:
    from sklearn.datasets import load_digits

    data = load_digits().data[:SAMPLES]
    return [json.dumps({"instances": [[float(v) for v in row]]}) for row in data]


# Idle windows (each as long as the count) the timers' share is averaged over.
IDLE_WINDOWS = 3
# The sidecars' periodic work: quota usage reports and stats flushes, every 5 s.
WINDOW_QUANTUM = 5.0

CALLGRIND = (
    "valgrind",
    "--tool=callgrind",
    "--instr-atstart=no",
    "--smc-check=all-non-file",  # V8 (Wasm) and LuaJIT generate code
)


def callgrind_wrapper(work: Path) -> Path:
    """A script that runs Envoy under callgrind, its dumps in ``work``."""
    wrapper = work / "envoy-callgrind"
    wrapper.write_text(
        f"#!/bin/sh\nexec {' '.join(CALLGRIND)} --callgrind-out-file={work}/callgrind.%p "
        f'{envoy_binary()} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def instructions(
    path: Path_,
    work: Path,
    requests: int,
    bodies: list[str],
    keep_dumps: Path | None = None,
    idle_windows: int = IDLE_WINDOWS,
) -> tuple[list[float], list[float]]:
    """Instructions per request of each proxy on ``path`` (callgrind; warm-up excluded):
    ``requests`` POSTs on one keep-alive connection, cycling through the keys like wrk."""
    pids = [str(p.pid) for p in path.proxies]

    def control(*args: str) -> None:
        for pid in pids:
            subprocess.run(["callgrind_control", *args, pid], capture_output=True, check=True)

    def post(n: int, warm_up: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", path.port, timeout=120)
        for i in range(n):
            headers = {"content-type": "application/json", "host": path.host}
            headers["x-api-key"] = f"key-{i % KEYS}"
            for _attempt in range(10):
                conn.request("POST", "/v1/predict", bodies[i % len(bodies)], headers)
                answer = conn.getresponse()
                answer.read()
                # Under callgrind a first TLS handshake between sidecars can outlast the
                # cluster's 1 s connect timeout: retried in the warm-up, never counted.
                if answer.status == 200 or not (warm_up and answer.status == 503):
                    break
            if answer.status != 200:
                raise RuntimeError(f"{path.host}: {answer.status} under callgrind")
        conn.close()

    def updates() -> list[dict[str, int]]:
        """Configuration updates each proxy has taken (xDS pushes cost far more than a
        request: one during the count would be charged to the requests)."""
        return [
            {k: v for k, v in p.stats(r"update_success|config_reload").items() if v}
            for p in path.proxies
        ]

    def totals(windows: int = 1) -> list[float]:
        """Each proxy's instructions in its dumps so far, per request and window."""
        counts = []
        for pid in pids:
            total = 0
            for dump in work.glob(f"callgrind.{pid}.*"):
                for line in dump.read_text(errors="replace").splitlines():
                    if line.startswith("totals:"):
                        total += int(line.split()[1])
                        break
            counts.append(total / requests / windows)
        return counts

    for dump in work.glob("callgrind.*"):
        dump.unlink()
    control("--instr=on")
    post(requests, warm_up=True)
    # Read before zeroing: the admin call that reads the stats would be counted otherwise
    # (~2-6M instructions, the bare Envoy's ~12k a request at 200 requests).
    before = updates()
    control("--zero")
    started = time.monotonic()
    post(requests, warm_up=False)
    # The count's window is stretched to whole periods of the timers (WINDOW_QUANTUM), and
    # so is each idle window: both then hold the same number of quota reports and stats
    # flushes, however the requests fell between them, and "net of idle" removes them
    # whole rather than one report more or less (~24k a request at 200 requests).
    elapsed = time.monotonic() - started
    window = math.ceil(elapsed / WINDOW_QUANTUM) * WINDOW_QUANTUM
    time.sleep(window - elapsed)
    control("--dump")
    for pid, old, new in zip(pids, before, updates(), strict=True):
        changed = {k: v - old.get(k, 0) for k, v in new.items() if v != old.get(k, 0)}
        if changed:
            print(f"{path.host} proxy {pid}: updates during the count: {changed}", file=sys.stderr)
    if keep_dumps is not None:
        keep_dumps.mkdir(parents=True, exist_ok=True)
        for dump in work.glob("callgrind.*"):
            shutil.copy(dump, keep_dumps / dump.name)
    counts = totals()
    for dump in work.glob("callgrind.*"):
        dump.unlink()
    # The same wall time again without requests: what timers cost (feed flush ticks, quota
    # reports, stats). Under callgrind a request takes ~50x its time, and longer still on a
    # loaded machine, so the timers' share of the count grows with the load; the count
    # less this idle share is the figure that stays put. Each idle window is as long as the
    # count's (whole timer periods: the same number of quota reports and stats flushes), and
    # the idle share is averaged over ``idle_windows`` of them.
    control("--zero")
    time.sleep(window * idle_windows)
    control("--dump")
    control("--instr=off")
    if keep_dumps is not None:
        # The idle window's dumps too: per function, the count less these is what the
        # requests themselves cost (callgrind_annotate on both).
        (keep_dumps / "idle").mkdir(exist_ok=True)
        for dump in work.glob("callgrind.*"):
            shutil.copy(dump, keep_dumps / "idle" / dump.name)
    return counts, totals(idle_windows)


@dataclass
class Path_:
    """One measured path: the port wrk hits and the Envoys requests cross."""

    port: int
    host: str
    proxies: list[EnvoyProcess]
    script: Path


@dataclass
class Round:
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_us: float  # per request, Envoys on the path
    plane_cpu_us: float  # per request, this process (the control planes)


@dataclass
class Row:
    name: str
    label: str
    baseline: str
    rounds: list[Round] = field(default_factory=list)
    baselines: list[Round] = field(default_factory=list)


class Loop:
    """An asyncio loop in a thread for the control planes; the main thread drives wrk."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(path: Path_, seconds: float, connections: int) -> Round:
    before = [cpu_seconds(p.pid) for p in path.proxies if p.pid]
    plane_before = self_cpu()
    result: WrkResult = wrk(
        f"http://127.0.0.1:{path.port}/v1/predict", seconds, connections, path.script
    )
    plane = self_cpu() - plane_before
    after = [cpu_seconds(p.pid) for p in path.proxies if p.pid]
    if result.non_2xx or result.socket_errors:
        raise RuntimeError(
            f"{path.host} on port {path.port}: {result.non_2xx} non-2xx answers, "
            f"{result.socket_errors} socket errors: the variant is refusing or failing "
            "requests, not just slower"
        )
    total = max(result.requests, 1)
    return Round(
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        proxy_cpu_us=(sum(after) - sum(before)) / total * 1e6,
        plane_cpu_us=plane / total * 1e6,
    )


def post(
    port: int, host: str, key: str | None = "key-1", path: str = "/v1/predict"
) -> tuple[int, bytes]:
    headers = {"content-type": "application/json", "host": host}
    if key:
        headers["x-api-key"] = key
    body = json.dumps({"instances": [[0.0] * 20 + [8.0] * 24 + [0.0] * 20]}).encode()
    status, _, answer = http_request("POST", f"http://127.0.0.1:{port}{path}", body, headers)
    return status, answer


def eventually_ok(port: int, host: str, timeout: float = 20) -> bytes:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = post(port, host)
            if status == 200:
                return body
            last = (status, body[:200])
        except OSError as err:
            last = err
        time.sleep(0.1)
    raise RuntimeError(f"port {port} ({host}): no 200 within {timeout}s, last {last!r}")


def check(
    variant: Variant, path: Path_, server: EnvoyProcess, server_port: int, timeout: float = 20
) -> None:
    """The variant enforces what it claims, or the benchmark stops."""
    body = eventually_ok(path.port, path.host, timeout)
    scores = json.loads(body)["predictions"][0]["probabilities"]
    hardened = sum(1 for s in scores if s) == 1
    if hardened != variant.hardened:
        raise RuntimeError(f"{variant.name}: hardened={hardened}, expected {variant.hardened}")
    dump = json.dumps(server.config_dump())
    missing = [text for text in variant.expect if text not in dump]
    if missing:
        raise RuntimeError(f"{variant.name}: sidecar config lacks {missing}")
    if variant.name in ("rbac", "native", "full"):
        status, _ = post(path.port, path.host, path="/admin/dump")
        if status != 403:
            raise RuntimeError(f"{variant.name}: /admin/* answered {status}, expected 403")
    if variant.name in ("apikey", "tenants") and post(path.port, path.host, key="wrong")[0] != 403:
        raise RuntimeError(f"{variant.name}: a wrong key was let through")
    if variant.hops == 2:
        try:
            status, _ = post(server_port, path.host)
        except OSError:
            status = 0
        if status == 200:
            raise RuntimeError(f"{variant.name}: plaintext reached a Strict sidecar")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--instructions",
        type=int,
        metavar="N",
        help="instead of wrk: count each proxy's instructions per request under callgrind "
        "(N requests per path after N of warm-up; insensitive to the machine's load)",
    )
    parser.add_argument(
        "--callgrind-dir",
        metavar="DIR",
        help="with --instructions: keep each path's callgrind dumps in DIR/<path>/ and its "
        "idle window's in DIR/<path>/idle/ (callgrind_annotate shows where the instructions go)",
    )
    parser.add_argument(
        "--idle-windows",
        type=int,
        default=IDLE_WINDOWS,
        metavar="K",
        help="with --instructions: average the timers' idle share over K windows, each as "
        f"long as the count (default {IDLE_WINDOWS})",
    )
    args = parser.parse_args()
    if args.instructions and shutil.which("valgrind") is None:
        sys.exit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    if not args.instructions and shutil.which("wrk") is None:
        sys.exit("wrk is required (make setup installs it)")
    chosen = [v for v in variants() if not args.only or v.name in args.only.split(",")]
    if not chosen:
        sys.exit(f"--only matches no variant of {[v.name for v in variants()]}")

    work = Path(tempfile.mkdtemp(prefix="modelguard-bench-tax-"))
    loop = Loop()
    envoys: list[EnvoyProcess] = []
    planes: dict[str, ControlPlane] = {}

    wrapper = callgrind_wrapper(work) if args.instructions else None
    ready = 300 if args.instructions else 30

    def envoy(config: dict[str, Any], admin: int, counted: bool = True) -> EnvoyProcess:
        process = EnvoyProcess(
            config,
            admin_port=admin,
            log_level="warn",
            concurrency=1,
            binary=wrapper if counted else None,
        )
        envoys.append(process)
        return process.start(timeout=ready)

    try:
        backend_port, admin = free_port(), free_port()
        envoy(backend_bootstrap(backend_port, admin), admin, counted=False).wait_ready(20)

        # Baselines: one bare router Envoy; two of them in a row.
        paths: dict[str, Path_] = {}
        bare_port, admin = free_port(), free_port()
        bare = envoy(router_bootstrap(bare_port, admin, backend_port), admin)
        pair_port, admin = free_port(), free_port()
        pair_front = envoy(router_bootstrap(pair_port, admin, bare_port), admin)
        for name, port, proxies in (
            ("bare", bare_port, [bare]),
            ("bare-pair", pair_port, [pair_front, bare]),
        ):
            script = work / f"{name}.lua"
            script.write_text(wrk_script(f"{name}.{NS}"))
            paths[name] = Path_(port, f"{name}.{NS}", proxies, script)

        for plane_name, (ca, telemetry) in PLANES.items():
            mine = [v for v in chosen if v.plane == plane_name]
            if not mine:
                continue
            folder = work / plane_name / "policies"
            folder.mkdir(parents=True)
            (folder / "policies.yaml").write_text("".join(v.policies for v in mine) or "")
            secrets = work / plane_name / "secrets"
            secrets.mkdir()
            (secrets / "keys.yaml").write_text(
                "---\n".join((API_KEYS_SECRET, TENANT_KEYS_SECRET, BOUND_KEYS_SECRET))
            )
            identity = (
                IdentityConfig(
                    directory=str(work / plane_name / "identity"), api_key_paths=(str(secrets),)
                )
                if ca
                else None
            )
            plane = ControlPlane(
                ControlPlaneConfig(
                    policy_paths=(str(folder),),
                    xds_port=0,
                    admin_port=0,
                    watch=False,
                    debounce_quiet=0.02,
                    debounce_max=0.2,
                    identity=identity,
                    telemetry=TelemetrySettings(enabled=telemetry),
                )
            )
            loop.run(plane.start())
            planes[plane_name] = plane
            for variant in mine:
                port, admin = free_port(), free_port()
                side = Sidecar(
                    node_id=variant.name,
                    service=variant.name,
                    namespace=NS,
                    identity=spiffe(NS, variant.name),
                    app_port=backend_port,
                    inbound_port=port,
                    inbound_address="127.0.0.1",
                )
                sides = [(side, admin)]
                client = None
                if variant.hops == 2:
                    mesh_port = free_port()
                    client = Sidecar(
                        node_id=f"client-{variant.name}",
                        service=f"client-{variant.name}",
                        namespace=CLIENT_NS,
                        identity=spiffe(CLIENT_NS, f"client-{variant.name}"),
                        app_port=backend_port,
                        inbound_port=free_port(),
                        inbound_address="127.0.0.1",
                        mesh_port=mesh_port,
                    )
                    sides.append((client, free_port()))
                started = []
                for s, a in sides:
                    creds = (
                        XdsCredentials.for_sidecar(s, work / plane_name / "identity")
                        if ca
                        else None
                    )
                    started.append(
                        envoy(
                            build_bootstrap(
                                s,
                                xds_host="127.0.0.1",
                                xds_port=plane.xds_port,
                                admin_port=a,
                                credentials=creds,
                            ),
                            a,
                        )
                    )
                for process in started:
                    process.wait_ready(ready)
                server = started[0]
                host = f"{variant.name}.{NS}"
                script = work / f"{variant.name}.lua"
                script.write_text(wrk_script(host))
                if client is not None:
                    assert client.mesh_port is not None
                    paths[variant.name] = Path_(client.mesh_port, host, started[::-1], script)
                else:
                    paths[variant.name] = Path_(port, host, [server], script)
                check(variant, paths[variant.name], server, port, timeout=ready)

        if args.instructions:
            bare.wait_ready(ready)
            pair_front.wait_ready(ready)
            keep = Path(args.callgrind_dir) if args.callgrind_dir else None
            count_instructions(chosen, paths, work, args.instructions, keep, args.idle_windows)
            return 0
        # Warm-up: connections, per-client buckets and their quota assignments, Wasm VMs.
        for path in paths.values():
            measure(path, 2, args.connections)
        rows = {
            v.name: Row(v.name, v.label, "bare" if v.hops == 1 else "bare-pair") for v in chosen
        }
        for r in range(args.rounds):
            order = list(rows.values())
            random.shuffle(order)
            for row in order:
                row.baselines.append(measure(paths[row.baseline], args.seconds, args.connections))
                row.rounds.append(measure(paths[row.name], args.seconds, args.connections))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        report(rows, planes, args)
    finally:
        for process in reversed(envoys):
            process.stop()
        for plane in planes.values():
            loop.run(plane.stop(grace=0))
        loop.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def count_instructions(
    chosen: list[Variant],
    paths: dict[str, Path_],
    work: Path,
    requests: int,
    keep: Path | None,
    idle_windows: int = IDLE_WINDOWS,
) -> None:
    """Each path's proxies under callgrind, one path at a time: instructions per request."""
    bodies = digits_bodies()
    counts, net = {}, {}
    for name in ["bare", "bare-pair", *(v.name for v in chosen)]:
        raw, idle = instructions(
            paths[name],
            work,
            requests,
            bodies,
            keep / name if keep is not None else None,
            idle_windows,
        )
        counts[name] = raw
        net[name] = [r - i for r, i in zip(raw, idle, strict=True)]
        print(
            f"{name}: {sum(raw):,.0f} instructions/request, {sum(net[name]):,.0f} net of "
            f"the idle share ({' + '.join(f'{i:,.0f}' for i in idle)})",
            file=sys.stderr,
        )
    print(
        "| sidecar carries | baseline | instructions/request (proxies on the path) | ratio "
        "| net of idle | ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")

    def row(label: str, base: str, name: str) -> str:
        mine, clean = counts[name], net[name]
        return (
            f"| {label} | {base} | {' + '.join(f'{c:,.0f}' for c in mine)} "
            f"| {sum(mine) / sum(counts[base or name]):.2f} "
            f"| {' + '.join(f'{c:,.0f}' for c in clean)} "
            f"| {sum(clean) / sum(net[base or name]):.2f} |"
        )

    for name, label in (("bare", "bare Envoy, router only"), ("bare-pair", "two bare Envoys")):
        print(row(label, "", name).replace("|  |", "| - |", 1))
    for variant in chosen:
        print(row(variant.label, "bare" if variant.hops == 1 else "bare-pair", variant.name))
    print(
        f"\n{requests} requests per path under callgrind after as many of warm-up, one "
        "keep-alive connection; two-hop paths list the client sidecar first. Net of idle: "
        "less what the proxies spend in the same wall time without requests (timers), "
        f"averaged over {idle_windows} such windows"
    )


def report(rows: dict[str, Row], planes: dict[str, ControlPlane], args: argparse.Namespace) -> None:
    med = statistics.median
    print(
        "| sidecar carries | baseline | req/s | ratio (median) | spread | p50 ms | p99 ms "
        "| proxy CPU/req | CPU ratio | control-plane CPU/req |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    out: dict[str, Any] = {
        "seconds": args.seconds,
        "rounds": args.rounds,
        "connections": args.connections,
        "variants": {},
    }
    for baseline in ("bare", "bare-pair"):
        base_rounds = [
            b for row in rows.values() if row.baseline == baseline for b in row.baselines
        ]
        if not base_rounds:
            continue
        label = "bare Envoy, router only" if baseline == "bare" else "two bare Envoys in a row"
        print(
            f"| {label} | - | {med(b.rps for b in base_rounds):,.0f} | 1.00 | - "
            f"| {med(b.p50_ms for b in base_rounds):.2f} "
            f"| {med(b.p99_ms for b in base_rounds):.2f} "
            f"| {med(b.proxy_cpu_us for b in base_rounds):.0f} µs | 1.00 | - |"
        )
        for row in rows.values():
            if row.baseline != baseline:
                continue
            ratios = [v.rps / b.rps for v, b in zip(row.rounds, row.baselines, strict=True)]
            cpu = [
                v.proxy_cpu_us / b.proxy_cpu_us
                for v, b in zip(row.rounds, row.baselines, strict=True)
            ]
            print(
                f"| {row.label} | {baseline} | {med(v.rps for v in row.rounds):,.0f} "
                f"| {med(ratios):.2f} | {min(ratios):.2f}–{max(ratios):.2f} "
                f"| {med(v.p50_ms for v in row.rounds):.2f} "
                f"| {med(v.p99_ms for v in row.rounds):.2f} "
                f"| {med(v.proxy_cpu_us for v in row.rounds):.0f} µs | {med(cpu):.2f} "
                f"| {med(v.plane_cpu_us for v in row.rounds):.0f} µs |"
            )
            out["variants"][row.name] = {
                "label": row.label,
                "baseline": baseline,
                "ratio_median": med(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "cpu_ratio_median": med(cpu),
                "rounds": [asdict(x) for x in row.rounds],
                "baselines": [asdict(x) for x in row.baselines],
            }
    for name, plane in planes.items():
        stats = plane.extraction.monitor.stats
        if stats.batches:
            print(
                f"\nmonitor ({name} plane): {stats.queries:,} queries in {stats.batches:,} "
                f"batches, {stats.unobserved:,} counted unobserved, verdicts "
                f"{dict(stats.verdicts) or 'none'}"
            )
            out.setdefault("monitor", {})[name] = {
                "queries": stats.queries,
                "batches": stats.batches,
                "unobserved": stats.unobserved,
                "verdicts": dict(stats.verdicts),
            }
        received = plane.telemetry.store.stats().received
        if plane.config.telemetry.enabled:
            print(f"telemetry ({name} plane): {received:,} records received")
            out.setdefault("telemetry_records", {})[name] = received
    print(
        f"\nrounds: {args.rounds} x {args.seconds:.0f} s per variant and per adjacent baseline, "
        f"wrk -t1 -c{args.connections}, Envoys with one worker"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
