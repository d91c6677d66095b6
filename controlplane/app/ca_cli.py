"""``modelguard ca init``: the CA every control-plane replica shares, as a Secret
(``identity.kubernetes.ca_secret``) for ``kubectl apply -f -``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from controlplane.identity.ca import CAError, CertificateAuthority, pem_key, write_private
from controlplane.identity.kubernetes import CA_SECRET, ca_secret


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ca_command", required=True)
    init = sub.add_parser(
        "init",
        help="generate the CA once, as a Secret for `kubectl apply -f -` (every replica loads it)",
    )
    init.add_argument(
        "--trust-domain", default="cluster.local", help="SPIFFE trust domain the CA signs for"
    )
    init.add_argument("--namespace", default="modelguard-system", help="of the control plane")
    init.add_argument("--name", default=CA_SECRET, help="Secret name")
    init.add_argument("--ca-cert", help="wrap this PEM CA certificate instead of generating one")
    init.add_argument("--ca-key", help="its PEM private key (with --ca-cert)")
    init.add_argument("-o", "--output", help="write to FILE (mode 0600) instead of stdout")


def run(args: argparse.Namespace) -> int:
    if bool(args.ca_cert) != bool(args.ca_key):
        print("modelguard ca init: --ca-cert and --ca-key go together", file=sys.stderr)
        return 2
    try:
        ca = (
            CertificateAuthority.load(args.ca_cert, args.ca_key)
            if args.ca_cert
            else CertificateAuthority.generate(args.trust_domain)
        )
    except CAError as err:
        print(f"modelguard ca init: {err}", file=sys.stderr)
        return 1
    secret = ca_secret(ca.root_pem, pem_key(ca.key), namespace=args.namespace, name=args.name)
    text = "# The modelguard CA: keep it like any private key. Apply once: every replica of\n"
    text += "# the control plane loads it, so sidecars trust whichever replica they reach.\n"
    text += yaml.safe_dump(secret, sort_keys=False)
    if args.output:
        write_private(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0
