"""The monitor's client table is bounded per tenant as well as in total (issue 14): many
keys of one tenant evict that tenant's own state, never another tenant's, and evictions
are counted per tenant."""

from __future__ import annotations

from controlplane.extraction.monitor import ExtractionMonitor
from controlplane.extraction.verdicts import VerdictStore


class _Sink:
    def emit(self, verdict: object) -> None:  # pragma: no cover - no verdicts here
        pass


def _monitor(tenant_of: dict[str, str]) -> ExtractionMonitor:
    return ExtractionMonitor(
        lambda: (),
        VerdictStore(None),
        _Sink(),  # type: ignore[arg-type]
        profile=lambda _: None,
        max_clients=20,
        max_clients_per_tenant=5,
        tenant_of=tenant_of.get,
    )


def test_a_tenant_with_many_keys_evicts_only_its_own_clients() -> None:
    tenants = {f"victim-{i}": f"victim-{i}" for i in range(10)}
    tenants |= {f"mallory-{i}": "mallory" for i in range(1000)}
    monitor = _monitor(tenants)
    for i in range(10):
        monitor._tracked("demo/p", f"victim-{i}", 64, now=1.0)
    # The attacker registers (or was given) a thousand keys of one tenant.
    for i in range(1000):
        monitor._tracked("demo/p", f"mallory-{i}", 64, now=2.0 + i)
    kept = {key for _, key in monitor._clients}
    assert {f"victim-{i}" for i in range(10)} <= kept  # no victim lost its state
    assert sum(1 for k in kept if k.startswith("mallory-")) == 5
    stats, tracked = monitor.counters()
    assert tracked == 15
    assert stats.evicted_by_tenant == {"mallory": 995} and stats.evicted == 995


def test_the_total_bound_still_holds_and_names_the_evicted_tenants() -> None:
    monitor = _monitor({})  # no registered keys: every client is its own tenant
    for i in range(30):
        monitor._tracked("demo/p", f"addr:10.0.0.{i}", 64, now=float(i))
    stats, tracked = monitor.counters()
    assert tracked == 20
    assert stats.evicted == 10
    assert set(stats.evicted_by_tenant) == {f"addr:10.0.0.{i}" for i in range(10)}
    # Released and expired clients leave the per-tenant index too.
    monitor.release("addr:10.0.0.29")
    assert ("demo/p", "addr:10.0.0.29") not in monitor._tenants
    monitor._expire(now=10_000.0)
    assert monitor.client_count() == 0 and not monitor._tenants
