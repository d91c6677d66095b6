"""Issue 17: /metrics is the same set of instruments as OTLP (Prometheus' exporter is one
more reader of SelfTelemetry's provider), and the clients-by-fidelity gauge is a histogram's
cumulative buckets that never names a client."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from controlplane.app.server import ControlPlane, ControlPlaneConfig

REPO = Path(__file__).resolve().parents[2]


def _plane() -> ControlPlane:
    plane = ControlPlane(ControlPlaneConfig(policy_paths=(str(REPO / "policies"),), watch=False))
    plane.files.sync()
    return plane


def _samples(plane: ControlPlane) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = plane.telemetry.instrumentation.prometheus_text().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_prometheus_and_the_otlp_reader_see_the_same_instruments() -> None:
    plane = _plane()
    prometheus = {name.removesuffix("_total") for name in _samples(plane)}
    otlp = {name.replace(".", "_") for name, *_ in plane.telemetry.instrumentation.metric_points()}
    assert "modelguard_policies" in otlp and "modelguard_sidecars" in otlp
    assert otlp <= prometheus, otlp - prometheus
    policies = _samples(plane)["modelguard_policies"]
    assert {(labels["kind"], labels["state"]) for labels, _ in policies} == {
        ("AccessPolicy", "Accepted"), ("EgressPolicy", "Accepted"),
        ("ExtractionPolicy", "Accepted"), ("RatePolicy", "Accepted"),
    }  # fmt: skip
    # Every watched policy's verdict series exists from 0 (rate() sees the first verdict).
    verdicts = _samples(plane)["modelguard_extraction_verdicts_total"]
    assert {(labels["stage"], labels["action"]) for labels, _ in verdicts} >= {
        ("suspicion", "throttle"), ("detection", "quarantine"),
    }  # fmt: skip
    assert all(value == 0 for _, value in verdicts)


def test_clients_by_estimated_fidelity_are_cumulative_buckets_without_client_keys() -> None:
    plane = _plane()
    monitor = plane.extraction.monitor
    estimates = [("demo/digits-model", "mg_secret-key-1", 0.35, 400),
                 ("demo/digits-model", "acme", 0.92, 900),
                 ("demo/digits-model", "globex", 0.05, 80)]  # fmt: skip
    monitor.risks = lambda: estimates  # type: ignore[method-assign]  # as the monitor gives them
    buckets = {
        labels["le"]: value
        for labels, value in _samples(plane)["modelguard_extraction_fidelity_clients"]
    }
    assert buckets["0.1"] == 1 and buckets["0.4"] == 2 and buckets["0.9"] == 2
    assert buckets["0.95"] == 3 and buckets["+Inf"] == 3
    text = plane.telemetry.instrumentation.prometheus_text().decode()
    assert "mg_secret-key-1" not in text and "acme" not in text and "globex" not in text
