"""What serving /metrics and the live page costs the control plane (issue 17: ≤ 2 % CPU).

Runs the embedded default (`modelguard run`: the control plane in one process, a real Envoy
sidecar and the demo model) on free ports, fills its state the way the policy-tax load does
(``wrk``, 16 connections, real digits queries with every demo key, until the telemetry
store holds its maximum of access-log records and the monitor tracks its clients), then
measures the control-plane process's CPU (user + system, /proc/PID/stat) over N requests of
each kind, against the same wall time idle right before (the difference is the cost):

  scrape  GET /metrics     (Prometheus: every instrument, every series)
  poll    GET /ui/state    (the page's poll: status report, ranked clients, denials, egress)
  page    GET /ui          (a page load: the same state rendered into HTML)

and extrapolates to one Prometheus scraping every 15 s and one open page polling every 2 s:
CPU share = scrape cost / 15 s + poll cost / 2 s, as a fraction of one core.

    .venv/bin/python bench/observability.py [--requests 200] [--fill-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controlplane.netutil import free_port  # noqa: E402

MODELGUARD = str(Path(sys.executable).parent / "modelguard")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return bytes(response.read())


def wrk_script(keys: list[str]) -> str:
    from controlplane.local.model import load_digits_data

    digits, _ = load_digits_data()
    bodies = ", ".join(
        json.dumps(json.dumps({"instances": [[float(v) for v in row]]})) for row in digits[:200]
    )
    key_list = ", ".join(json.dumps(k) for k in keys)
    return (
        f"local bodies = {{{bodies}}}\nlocal keys = {{{key_list}}}\nlocal n = 0\n"
        "request = function()\n  n = n + 1\n"
        "  return wrk.format('POST', '/v1/predict', {['content-type'] = 'application/json',\n"
        f"    ['x-api-key'] = keys[(n % {len(keys)}) + 1]}}, bodies[(n % 200) + 1])\nend\n"
    )


def measure(pid: int, url: str, n: int) -> tuple[float, float]:
    """(CPU seconds per request above idle, wall seconds per request)."""
    started, cpu = time.monotonic(), cpu_seconds(pid)
    for _ in range(n):
        get(url)
    wall = time.monotonic() - started
    used = cpu_seconds(pid) - cpu
    time.sleep(0.2)
    idle_cpu = cpu_seconds(pid)
    time.sleep(wall)  # the same wall time, nothing asked: the control plane's own work
    idle = cpu_seconds(pid) - idle_cpu
    return max(used - idle, 0.0) / n, wall / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="of each kind")
    parser.add_argument("--fill-seconds", type=float, default=30.0, help="wrk load first")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mg-bench-obs-"))
    ports = {name: free_port() for name in ("listen", "outbound", "xds", "admin", "metrics")}
    argv = [MODELGUARD, "run", "--policies", str(REPO / "policies"), "--workdir", str(work),
            "--listen-port", str(ports["listen"]), "--outbound-port", str(ports["outbound"]),
            "--xds-port", str(ports["xds"]), "--admin-port", str(ports["admin"]),
            "--metrics-port", str(ports["metrics"])]  # fmt: skip
    log = (work / "run.log").open("wb")
    run = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "modelguard is running" not in (work / "run.log").read_text(errors="replace"):
            if run.poll() is not None or time.monotonic() > deadline:
                print((work / "run.log").read_text(errors="replace"), file=sys.stderr)
                return 1
            time.sleep(0.2)
        web = f"http://127.0.0.1:{ports['metrics']}"
        keys = [line.split(" ", 1)[1] for line in (work / "demo-keys.txt").read_text().split("\n")
                if " " in line]  # fmt: skip
        (work / "load.lua").write_text(wrk_script(keys))
        fill = subprocess.run(
            [shutil.which("wrk") or "wrk", "-t1", "-c16", f"-d{int(args.fill_seconds)}s",
             "-s", str(work / "load.lua"), f"http://127.0.0.1:{ports['listen']}/v1/predict"],
            capture_output=True, text=True, timeout=args.fill_seconds + 60,
        )  # fmt: skip
        lines = fill.stdout.splitlines()
        rps = next((ln.split()[1] for ln in lines if "Requests/sec" in ln), "?")
        time.sleep(3)  # the last access logs and feed batches arrive
        state = json.loads(get(f"{web}/ui/state"))
        metrics_bytes = len(get(f"{web}/metrics"))
        summary = state["summary"]
        results = {}
        for name, path in (("scrape", "/metrics"), ("poll", "/ui/state"), ("page", "/ui")):
            get(web + path)  # warm
            cpu, wall = measure(run.pid, web + path, args.requests)
            results[name] = {"cpu_ms": cpu * 1000, "wall_ms": wall * 1000}
        share = results["scrape"]["cpu_ms"] / 1000 / 15 + results["poll"]["cpu_ms"] / 1000 / 2
        print(f"state after wrk ({rps} req/s for {args.fill_seconds:.0f} s): "
              f"{summary['clients']} clients tracked, {summary['observed']} queries observed, "
              f"telemetry store {state_records(web)} records; /metrics {metrics_bytes} bytes")
        for name, figures in results.items():
            print(f"  {name:<7} {figures['cpu_ms']:7.2f} ms CPU per request "
                  f"({figures['wall_ms']:.2f} ms wall)")  # fmt: skip
        print(f"one scrape every 15 s + one page polling every 2 s: {share:.3%} of one core")
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "share": share}, indent=2))
        return 0
    finally:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(15)
        except subprocess.TimeoutExpired:
            run.kill()
        log.close()


def state_records(web: str) -> int:
    for line in get(f"{web}/metrics").decode().splitlines():
        if line.startswith("modelguard_telemetry_stored_records"):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
