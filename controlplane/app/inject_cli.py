"""``modelguard inject -f FILE``: the injection of ``controlplane.sidecar.inject`` over
manifests, offline (``kubectl apply -f <(modelguard inject -f deploy.yaml)``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from controlplane.app.cliutil import port_number
from controlplane.sidecar.bootstrap import STATS_PATH as STATS_PATH
from controlplane.sidecar.bootstrap import STATS_PORT as STATS_PORT
from controlplane.sidecar.bootstrap import (
    parse_hostport,
)
from controlplane.sidecar.inject import InjectConfig, InjectionError, inject_yaml

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = InjectConfig()
    parser.add_argument("-f", "--filename", required=True, help="manifest to inject ('-': stdin)")
    parser.add_argument("-o", "--output", help="write to FILE instead of stdout")
    parser.add_argument(
        "--xds",
        default=defaults.xds_address,
        metavar="HOST:PORT",
        help="control plane address as sidecars reach it",
    )
    parser.add_argument("--image", default=defaults.image, help="Envoy image of the sidecar")
    parser.add_argument(
        "--inbound-port",
        type=port_number,
        default=defaults.inbound_port,
        help=f"the sidecar's inbound port (mg-inbound; default {defaults.inbound_port})",
    )
    parser.add_argument(
        "--trust-domain",
        default=defaults.trust_domain,
        help="SPIFFE trust domain of the workloads (as the control plane's)",
    )
    parser.add_argument(
        "--outbound-port",
        type=port_number,
        default=defaults.outbound_port,
        help="egress port of sidecars in pods annotated modelguard.io/egress: enabled",
    )
    parser.add_argument(
        "--egress-image", default=defaults.egress_image, help="image of the egress init container"
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="for a control plane run --insecure: plaintext xDS, no service-account token",
    )


def config_from_args(args: argparse.Namespace) -> InjectConfig:
    parse_hostport(args.xds)  # a clear error now, not a broken sidecar later
    return InjectConfig(
        xds_address=args.xds,
        image=args.image,
        inbound_port=args.inbound_port,
        trust_domain=args.trust_domain,
        outbound_port=args.outbound_port,
        egress_image=args.egress_image,
        identity=not args.insecure,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
        out = inject_yaml(text, config)
    except (OSError, yaml.YAMLError, InjectionError, argparse.ArgumentTypeError) as err:
        print(f"modelguard inject: {args.filename}: {err}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(out)
    else:
        sys.stdout.write(out)
    return 0
