"""The admin service: what ``modelguard status`` shows. It only reads the other boxes, and is
handed only those it reads (never the control-plane object)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from controlplane.api import Policy
from controlplane.compile.inputs.inventory import Inventory, targets
from controlplane.compile.inputs.store import PolicyStore
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.grpcutil import decode_checked
from controlplane.telemetry.records import (
    EGRESS_DESTINATION_ATTRIBUTE,
    POLICY_ATTRIBUTE,
    Kind,
    Verdict,
)
from controlplane.telemetry.store import Query, TelemetryStore
from controlplane.xds import resources as rt
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.status import SyncStatus


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


EGRESS_BLOCKS_SHOWN = 20  # per sidecar: the most recent destinations


@dataclass
class _Blocked:
    count: int
    last_seen_nano: int


def egress_blocks(store: TelemetryStore) -> dict[str, list[admin_pb2.EgressBlock]]:
    """Blocked (and would-block) outside destinations per sidecar node id, most recent
    first, counted over the egress log records the telemetry store still holds."""
    seen: dict[tuple[str, str, str, str, str], _Blocked] = {}
    for verdict in (Verdict.BLOCKED, Verdict.WOULD_BLOCK):
        for record in store.query(Query(verdict=verdict, kind=Kind.LOG), store.max_records):
            attrs = dict(record.attributes)
            key = (
                record.node,
                attrs.get(EGRESS_DESTINATION_ATTRIBUTE, ""),
                attrs.get("modelguard.egress.protocol", ""),
                record.verdict,
                attrs.get(POLICY_ATTRIBUTE, ""),
            )
            entry = seen.setdefault(key, _Blocked(0, 0))
            entry.count += 1
            entry.last_seen_nano = max(entry.last_seen_nano, record.time_unix_nano)
    out: dict[str, list[admin_pb2.EgressBlock]] = {}
    for (node, destination, protocol, decided, policy), entry in sorted(
        seen.items(), key=lambda item: -item[1].last_seen_nano
    ):
        blocks = out.setdefault(node, [])
        if len(blocks) < EGRESS_BLOCKS_SHOWN:
            last_seen = timestamp_pb2.Timestamp()
            last_seen.FromNanoseconds(entry.last_seen_nano)
            blocks.append(
                admin_pb2.EgressBlock(
                    destination=destination,
                    protocol=protocol,
                    verdict=decided,
                    policy=policy,
                    count=entry.count,
                    last_seen=last_seen,
                )
            )
    return out


def unloaded_key_sets(
    policy: Policy, loaded: Collection[tuple[str, str]] | None
) -> list[str]:
    """Warnings for the rules of an AccessPolicy that name an API-key Secret no source has
    loaded: valid, accepted, and admitting no caller (compile fails closed), which a user
    who forgot ``--api-keys`` could otherwise only learn from a 403. ``loaded``: the
    (namespace, name) of every non-empty key set; None when none can be (``--insecure``)."""
    rules = getattr(policy.spec, "rules", None)
    if policy.kind != "AccessPolicy" or not rules:
        return []
    out = []
    for i, rule in enumerate(rules):
        keys = rule.from_.api_keys if rule.from_ is not None else None
        if keys is None:
            continue
        ref = (policy.metadata.namespace, keys.secret_ref)
        if loaded is None:
            why = "no API keys are loaded without the CA (--insecure)"
        elif ref not in loaded:
            why = (
                f"no keys of Secret {ref[0]}/{ref[1]} are loaded (serve --api-keys FILE; in "
                "a cluster, a Secret labelled modelguard.io/api-keys=true)"
            )
        else:
            continue
        out.append(f"spec.rules[{i}].from.apiKeys.secretRef: {why}: this rule admits no caller")
    return out


class AdminService(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        store: PolicyStore,
        inventory: Inventory,
        cache: SnapshotCache,
        sync_status: SyncStatus,
        telemetry_store: TelemetryStore,
        envoy_admins: Mapping[str, str],
        calibrated: Callable[[], Mapping[str, Any]],
        api_key_sets: Callable[[], Collection[tuple[str, str]]] | None = None,
    ) -> None:
        # calibrated: namespace/name of an ExtractionPolicy → its Calibrated condition.
        # api_key_sets: the loaded key Secrets; None when the control plane loads none.
        self.store, self.inventory, self.cache = store, inventory, cache
        self.sync_status, self.telemetry_store = sync_status, telemetry_store
        self.envoy_admins, self.calibrated = envoy_admins, calibrated
        self.api_key_sets = api_key_sets

    def add_to(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(self, decode_checked(server))

    def report(self, node_filter: str = "") -> admin_pb2.StatusReport:
        report = admin_pb2.StatusReport(generated_at=_timestamp(time.time()))
        blocked = egress_blocks(self.telemetry_store)
        for node in self.sync_status.nodes():
            if node_filter and node_filter not in node.node_id:
                continue
            sidecar = self.inventory.get(node.node_id)
            snapshot = self.cache.get(node.node_id)
            entry = report.sidecars.add(
                node_id=node.node_id,
                stream=str(node.kind),
                peer=node.peer,
                connected_at=_timestamp(node.connected_at),
                snapshot_version=snapshot.version if snapshot is not None else "",
                state=str(node.state),
                egress_blocked=blocked.get(node.node_id, []),
                envoy_admin=self.envoy_admins.get(node.node_id, ""),
            )
            for peer, since in node.replaced:
                entry.replaced_streams.add(peer=peer, connected_at=_timestamp(since))
            if sidecar is not None:
                entry.service, entry.namespace = sidecar.service, sidecar.namespace
                entry.identity = sidecar.identity
            for type_url in rt.PUSH_ORDER:
                ts = node.types.get(type_url)
                if ts is None:
                    continue
                item = entry.resources.add(
                    type=ts.short_name,
                    type_url=type_url,
                    latest_version=ts.target_version or "",
                    sent_version=ts.sent_version or "",
                    acked_version=ts.acked_version or "",
                    state=str(ts.state),
                )
                if ts.last_nack is not None:
                    item.last_nack_version = ts.last_nack.version
                    item.last_nack_error = ts.last_nack.message
                    item.last_nack_time.CopyFrom(_timestamp(ts.last_nack.at))
        policies: dict[tuple[str, str, str], Policy] = {
            p.ref: p
            for p in self.store.current().policies
        }
        sidecars = self.inventory.snapshot()
        calibrated = self.calibrated()
        key_sets = self.api_key_sets() if self.api_key_sets is not None else None
        for status in self.store.statuses():
            policy = policies.get(status.key)
            kind, namespace, name = status.key
            policy_entry = report.policies.add(
                kind=kind,
                namespace=namespace,
                name=name,
                source=status.source,
                generation=status.generation,
                state=status.state,
                errors=list(status.errors),
                serving=status.serving,
                warnings=[
                    *status.warnings,
                    *(unloaded_key_sets(policy, key_sets) if policy is not None else ()),
                ],
                sidecars=[s.node_id for s in sidecars if policy and targets(policy, s)],
            )
            condition = (
                calibrated.get(f"{namespace}/{name}") if kind == "ExtractionPolicy" else None
            )
            if condition is not None:
                policy_entry.conditions.add(
                    type="Calibrated",
                    status=condition.status,
                    reason=condition.reason,
                    message=condition.message,
                )
        for reason, count in self.sync_status.drops().items():
            report.refused[reason] = count
        named = {e for p in report.policies for e in p.errors}
        for errors in self.store.unit_errors().values():
            report.source_errors.extend(e for e in errors if e not in named)
        return report

    async def GetStatus(
        self,
        request: admin_pb2.GetStatusRequest,
        context: grpc.aio.ServicerContext[admin_pb2.GetStatusRequest, admin_pb2.StatusReport],
    ) -> admin_pb2.StatusReport:
        return self.report(request.node_filter)
