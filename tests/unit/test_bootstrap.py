"""The sidecar bootstrap: Envoy accepts it, and the control plane can read back who it is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (Any type)
from google.protobuf import json_format, struct_pb2

from controlplane.app import bootstrap_cli
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.local.envoy import validate_config
from controlplane.sidecar.bootstrap import (
    XDS_CLUSTER,
    build_bootstrap,
    render_bootstrap,
    write_bootstrap,
)

SIDECAR = Sidecar(
    node_id="fraud-model-0.ml",
    service="fraud-model",
    namespace="ml",
    identity="spiffe://cluster.local/ns/ml/sa/fraud-model",
    app_port=8080,
    inbound_port=15006,
    labels=(("app", "fraud"), ("tier", "gold")),
)


def _bootstrap(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"xds_host": "127.0.0.1", "xds_port": 18000, "admin_port": 19000}
    args.update(overrides)
    return build_bootstrap(SIDECAR, **args)


@pytest.mark.envoy
@pytest.mark.parametrize("xds_host", ["127.0.0.1", "modelguard.modelguard-system.svc"])
def test_envoy_accepts_the_bootstrap(xds_host: str) -> None:
    ok, output = validate_config(_bootstrap(xds_host=xds_host))
    assert ok, output
    # Deprecated fields would break on the next Envoy upgrade.
    assert "Deprecated" not in output, output


@pytest.mark.envoy
def test_envoy_accepts_the_rendered_yaml() -> None:
    ok, output = validate_config(render_bootstrap(_bootstrap()))
    assert ok, output


def test_node_identifies_the_sidecar() -> None:
    node = _bootstrap()["node"]
    assert node["id"] == "fraud-model-0.ml"
    assert node["cluster"] == "fraud-model.ml"
    # The sidecar's description, and where its Envoy admin listens (for proxy-config).
    admin_port = _bootstrap()["admin"]["address"]["socket_address"]["port_value"]
    assert node["metadata"] == {
        **SIDECAR.to_metadata(),
        "modelguard.io/envoy-admin": f"127.0.0.1:{admin_port}",
    }
    assert _bootstrap(cluster="custom")["node"]["cluster"] == "custom"


def test_node_metadata_round_trips_through_envoys_proto() -> None:
    # What the xDS server receives: the node as a proto, its metadata a Struct
    # (numbers become floats on the way).
    message = json_format.ParseDict(_bootstrap(), bootstrap_pb2.Bootstrap())
    metadata = json_format.MessageToDict(message.node.metadata)
    assert isinstance(metadata["modelguard"]["app_port"], float)
    assert Sidecar.from_metadata(message.node.id, metadata) == SIDECAR

    struct = struct_pb2.Struct()
    struct.update(SIDECAR.to_metadata())
    again = json_format.MessageToDict(struct)
    assert Sidecar.from_metadata(SIDECAR.node_id, again) == SIDECAR


def test_ads_is_the_only_config_source() -> None:
    dynamic = _bootstrap()["dynamic_resources"]
    ads = dynamic["ads_config"]
    assert ads["api_type"] == "GRPC"
    assert ads["transport_api_version"] == "V3"
    assert ads["set_node_on_first_message_only"] is True
    [service] = ads["grpc_services"]
    assert service["envoy_grpc"]["cluster_name"] == XDS_CLUSTER
    # Reconnects to a restarted control plane within about a second, not Envoy's 30 s.
    back_off = service["envoy_grpc"]["retry_policy"]["retry_back_off"]
    assert back_off == {"base_interval": "0.25s", "max_interval": "1s"}
    for source in ("cds_config", "lds_config"):
        assert dynamic[source] == {"ads": {}, "resource_api_version": "V3"}


def test_xds_cluster_is_http2_to_the_control_plane() -> None:
    static = _bootstrap()["static_resources"]
    assert [c["name"] for c in static["clusters"]] == [XDS_CLUSTER]
    [cluster] = static["clusters"]
    assert cluster["type"] == "STATIC"
    assert cluster["connect_timeout"] == "1s"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert options["@type"] == (
        "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    )
    http2 = options["explicit_http_config"]["http2_protocol_options"]
    assert http2["connection_keepalive"] == {"interval": "5s", "timeout": "2s"}
    [locality] = cluster["load_assignment"]["endpoints"]
    [endpoint] = locality["lb_endpoints"]
    assert endpoint["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 18000,
    }


def test_xds_by_name_is_resolved_by_dns() -> None:
    [cluster] = _bootstrap(xds_host="modelguard.modelguard-system")["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"


def test_admin_listens_on_loopback_only() -> None:
    assert _bootstrap(admin_port=19123)["admin"] == {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 19123}}
    }


def test_rendered_yaml_is_the_same_config_without_anchors() -> None:
    text = render_bootstrap(_bootstrap())
    assert "&id" not in text and "*id" not in text
    assert yaml.safe_load(text) == _bootstrap()
    assert text.startswith("node:")  # built order kept, for readable diffs


def test_write_bootstrap(tmp_path: Path) -> None:
    path = write_bootstrap(
        tmp_path / "etc" / "envoy.yaml",
        SIDECAR,
        xds_host="127.0.0.1",
        xds_port=18000,
        admin_port=19000,
    )
    assert yaml.safe_load(path.read_text()) == _bootstrap()
    assert [p.name for p in path.parent.iterdir()] == ["envoy.yaml"]  # no temp file left


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bootstrap_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_writes_the_bootstrap(tmp_path: Path) -> None:
    out = tmp_path / "bootstrap.yaml"
    args = _cli(
        [
            "--service",
            "fraud-model",
            "--namespace",
            "ml",
            "--node-id",
            "fraud-model-0.ml",
            "--app-port",
            "8080",
            "--inbound-port",
            "15006",
            "--admin-port",
            "19000",
            "--xds",
            "127.0.0.1:18000",
            "--identity",
            "spiffe://cluster.local/ns/ml/sa/fraud-model",
            "--label",
            "tier=gold",
            "--label",
            "app=fraud",
            "-o",
            str(out),
        ]
    )
    assert bootstrap_cli.run(args) == 0
    assert yaml.safe_load(out.read_text()) == _bootstrap()


def test_cli_defaults_and_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli(
        [
            "--service",
            "digits",
            "--app-port",
            "8080",
            "--inbound-port",
            "15006",
            "--admin-port",
            "19000",
            "--xds",
            "localhost:18000",
        ]
    )
    assert bootstrap_cli.run(args) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    sidecar = Sidecar.from_metadata(config["node"]["id"], config["node"]["metadata"])
    assert sidecar.node_id == "digits.default"
    assert sidecar.identity == "spiffe://cluster.local/ns/default/sa/digits"
    assert sidecar.labels == ()
    json.dumps(config)  # JSON-serializable too


@pytest.mark.parametrize(
    "argv",
    [
        ["--xds", "nohost"],
        ["--xds", "host:notaport"],
        ["--xds", "host:70000"],
        ["--xds", "h:1", "--label", "novalue"],
        ["--xds", "h:1", "--app-port", "0"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str]) -> None:
    base = ["--service", "s", "--app-port", "1", "--inbound-port", "2", "--admin-port", "3"]
    with pytest.raises(SystemExit):
        _cli(base + argv)
