"""Issue 17: the optional ServiceMonitor component and the scrape-config example name the
ports and annotations that the control plane's Service and the sidecar injector really use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controlplane.app import cli
from controlplane.sidecar import inject

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_the_servicemonitor_component_scrapes_the_control_plane_and_the_sidecars() -> None:
    component = yaml.safe_load(
        (K8S / "observability/servicemonitor/kustomization.yaml").read_text()
    )
    assert component["kind"] == "Component"
    assert "observability/servicemonitor" not in (K8S / "kustomization.yaml").read_text()
    objects = [
        o for r in component["resources"] for o in _docs(K8S / "observability/servicemonitor" / r)
    ]
    monitor = next(o for o in objects if o["kind"] == "ServiceMonitor")
    pods = next(o for o in objects if o["kind"] == "PodMonitor")
    (service,) = _docs(K8S / "control-plane/service.yaml")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port = next(
        p for p in service["spec"]["ports"] if p["name"] == monitor["spec"]["endpoints"][0]["port"]
    )
    (deployment,) = _docs(K8S / "control-plane/deployment.yaml")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    target = next(p for p in container["ports"] if p["name"] == port["targetPort"])
    args = cli.build_parser().parse_args(
        [a.replace("$(POD_NAMESPACE)", "ns").replace("$(POD_NAME)", "p") for a in container["args"]]
    )
    assert args.metrics_port == target["containerPort"]  # the process serves what is scraped
    assert args.metrics_host == "0.0.0.0"  # reachable by Prometheus (the page: loopback only)
    endpoint = pods["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["port"], endpoint["path"]) == (inject.STATS_PORT_NAME, inject.STATS_PATH)


def test_the_scrape_config_example_keeps_what_the_injector_and_service_name() -> None:
    config = yaml.safe_load((K8S / "observability/prometheus-scrape.yaml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert set(jobs) == {"modelguard-control-plane", "modelguard-sidecars"}
    keep = [
        r for r in jobs["modelguard-control-plane"]["relabel_configs"] if r.get("action") == "keep"
    ]
    assert keep[0]["regex"] == "modelguard;http-metrics"
    sidecar_rules = jobs["modelguard-sidecars"]["relabel_configs"]
    regexes = {tuple(r["source_labels"]): r.get("regex") for r in sidecar_rules}
    assert regexes[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"
    assert regexes[("__meta_kubernetes_pod_container_port_name",)] == inject.STATS_PORT_NAME
    assert inject.SCRAPE_ANNOTATIONS["prometheus.io/scrape"] == "true"
