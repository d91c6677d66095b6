"""Envoy resources as stable YAML (goldens, `modelguard` debug output) and as a bootstrap
that ``envoy --mode validate`` can check."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from controlplane.xds import resources as rt

FILE_NAMES = {
    rt.CLUSTER: "clusters",
    rt.ENDPOINT: "endpoints",
    rt.LISTENER: "listeners",
    rt.ROUTE: "routes",
    rt.SECRET: "secrets",
    rt.EXTENSION_CONFIG: "extension_configs",
}


def to_dict(message: Message) -> dict[str, Any]:
    # Through JSON: MessageToDict leaves OrderedDicts inside Any fields, which YAML refuses.
    result: dict[str, Any] = json.loads(
        json_format.MessageToJson(message, preserving_proto_field_name=True)
    )
    return result


def to_yaml(messages: Sequence[Message]) -> str:
    return yaml.safe_dump([to_dict(m) for m in messages], sort_keys=True, default_flow_style=False)


def validation_bootstrap(resources: Mapping[str, Sequence[Message]]) -> dict[str, Any]:
    """A bootstrap that carries the resources statically, for ``envoy --mode validate``.

    EDS clusters get their assignment inline and RDS listeners their route configuration
    inline, so Envoy checks every field we generate without an xDS server.
    """
    assignments = {a["cluster_name"]: a for a in map(to_dict, resources.get(rt.ENDPOINT, ()))}
    routes = {r["name"]: r for r in map(to_dict, resources.get(rt.ROUTE, ()))}
    extensions = {
        e["name"]: e["typed_config"] for e in map(to_dict, resources.get(rt.EXTENSION_CONFIG, ()))
    }
    clusters = []
    for cluster in map(to_dict, resources.get(rt.CLUSTER, ())):
        if cluster.get("type") == "EDS":
            cluster["type"] = "STATIC"
            cluster.pop("eds_cluster_config", None)
            cluster["load_assignment"] = assignments[cluster["name"]]
        clusters.append(cluster)
    listeners = []
    for listener in map(to_dict, resources.get(rt.LISTENER, ())):
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                config = f.get("typed_config", {})
                if "rds" in config:
                    config["route_config"] = routes[config.pop("rds")["route_config_name"]]
                # ECDS filters get their extension config inline.
                for http_filter in config.get("http_filters", []):
                    if "config_discovery" in http_filter:
                        del http_filter["config_discovery"]
                        http_filter["typed_config"] = extensions[http_filter["name"]]
        listeners.append(listener)
    static: dict[str, Any] = {"listeners": listeners, "clusters": clusters}
    secrets = [to_dict(s) for s in resources.get(rt.SECRET, ())]
    if secrets:
        # SDS secrets become static ones: references without a config source name them.
        static["secrets"] = secrets
        _drop_sds_sources(static)
    return {
        "static_resources": static,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }


def _drop_sds_sources(node: Any) -> None:
    if isinstance(node, dict):
        if "name" in node and "sds_config" in node:
            del node["sds_config"]
        for value in node.values():
            _drop_sds_sources(value)
    elif isinstance(node, list):
        for value in node:
            _drop_sds_sources(value)
