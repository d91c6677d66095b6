"""``modelguard bootstrap``: write a sidecar's Envoy bootstrap (``sidecar.bootstrap``) for
a workload outside a cluster, with its token files when the control plane has an identity."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.sidecar.bootstrap import (
    TOKEN_SDS_SUFFIX,
    TOKEN_SUFFIX,
    XdsCredentials,
    build_bootstrap,
    parse_hostport,
    render_bootstrap,
    write_bootstrap,
)


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return int(value)


def _label(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key, val


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``modelguard bootstrap``."""
    parser.add_argument("--service", required=True, help="service the workload implements")
    parser.add_argument("--namespace", default="default", help="namespace of the workload")
    parser.add_argument(
        "--app-port", type=_port, required=True, help="port the workload listens on"
    )
    parser.add_argument("--app-address", default="127.0.0.1", help="address of the workload")
    parser.add_argument(
        "--inbound-port", type=_port, required=True, help="port the sidecar accepts traffic on"
    )
    parser.add_argument(
        "--inbound-address", default="0.0.0.0", help="address the sidecar accepts traffic on"
    )
    parser.add_argument(
        "--admin-port", type=_port, required=True, help="Envoy admin port (on 127.0.0.1)"
    )
    parser.add_argument(
        "--outbound-port",
        type=_port,
        help="port (on 127.0.0.1) where the sidecar takes the workload's outbound traffic "
        "(egress control: EgressPolicy); without it outbound traffic bypasses the sidecar",
    )
    parser.add_argument(
        "--xds",
        type=parse_hostport,
        required=True,
        metavar="HOST:PORT",
        help="address of the modelguard control plane (ADS)",
    )
    parser.add_argument(
        "--identity",
        help="SPIFFE ID of the workload (default spiffe://cluster.local/ns/NS/sa/SERVICE)",
    )
    parser.add_argument(
        "--node-id", help="Envoy node id (default SERVICE.NAMESPACE; must be unique per sidecar)"
    )
    parser.add_argument("--cluster", help="Envoy node cluster (default SERVICE.NAMESPACE)")
    parser.add_argument(
        "--label",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload label, repeatable (policies select sidecars by them)",
    )
    parser.add_argument(
        "--delta", action="store_true", help="incremental (Delta) xDS instead of state-of-the-world"
    )
    parser.add_argument(
        "--mesh-port",
        type=_port,
        help="port (on 127.0.0.1) where the workload reaches other mesh services over mTLS "
        "(Host: SERVICE.NAMESPACE)",
    )
    parser.add_argument(
        "--identity-dir",
        help="the control plane's identity folder (its CA and bootstrap-token key): the "
        "bootstrap then carries this sidecar's token and reaches the control plane over TLS",
    )
    parser.add_argument("-o", "--output", help="write to FILE instead of stdout")


def sidecar_from_args(args: argparse.Namespace) -> Sidecar:
    service: str = args.service
    namespace: str = args.namespace
    return Sidecar(
        node_id=args.node_id or f"{service}.{namespace}",
        service=service,
        namespace=namespace,
        identity=args.identity or f"spiffe://cluster.local/ns/{namespace}/sa/{service}",
        app_port=args.app_port,
        inbound_port=args.inbound_port,
        app_address=args.app_address,
        inbound_address=args.inbound_address,
        labels=tuple(sorted(dict(args.label).items())),
        outbound_port=args.outbound_port,
        mesh_port=args.mesh_port,
    )


def missing_identity(identity_dir: str) -> str | None:
    """Why ``--identity-dir`` cannot give a sidecar its credentials, or None. Checked before
    anything is read: a folder without the control plane's files is not one, and reading it
    would create a token key there that no control plane knows (and then fail on the CA)."""
    from controlplane.identity.service import TRUST_BUNDLE_FILE
    from controlplane.identity.tokens import TOKEN_KEY_FILE

    folder = Path(identity_dir)
    absent = [f for f in (TRUST_BUNDLE_FILE, TOKEN_KEY_FILE) if not (folder / f).is_file()]
    if not absent:
        return None
    return (
        f"modelguard bootstrap: --identity-dir {identity_dir} holds no control-plane identity "
        f"({' and '.join(absent)} missing). `modelguard serve --identity-dir {identity_dir}` "
        "creates it on its first start: start that first, or name the folder your control "
        "plane uses (serve: .modelguard/identity; run: WORKDIR/identity)."
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``modelguard bootstrap``; returns the exit code."""
    sidecar = sidecar_from_args(args)
    xds_host, xds_port = args.xds
    credentials = None
    if args.identity_dir:
        if (missing := missing_identity(args.identity_dir)) is not None:
            print(missing, file=sys.stderr)
            return 1
        credentials = XdsCredentials.for_sidecar(sidecar, args.identity_dir)
    if args.output:
        write_bootstrap(
            args.output,
            sidecar,
            xds_host=xds_host,
            xds_port=xds_port,
            admin_port=args.admin_port,
            cluster=args.cluster,
            delta=args.delta,
            credentials=credentials,
        )
        # Say what landed on disk: two of the files hold or point at a secret.
        base = Path(args.output).with_suffix("")
        print(f"wrote {args.output} (the bootstrap: envoy -c {args.output})")
        if credentials is not None:
            token = base.with_name(base.name + TOKEN_SUFFIX)
            sds = base.with_name(base.name + TOKEN_SDS_SUFFIX)
            print(f"wrote {token} (the sidecar's token, mode 0600: keep it out of git)")
            print(f"wrote {sds} (how Envoy reads the token: file SDS)")
    else:
        bootstrap = build_bootstrap(
            sidecar,
            xds_host=xds_host,
            xds_port=xds_port,
            admin_port=args.admin_port,
            cluster=args.cluster,
            delta=args.delta,
            credentials=credentials,
        )
        sys.stdout.write(render_bootstrap(bootstrap))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelguard bootstrap", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
