"""The identity box: admits sidecars, issues and rotates their SVIDs, serves xDS over TLS.

It feeds compile (``mesh_inputs``: certificates, API-key digests, mesh services) and never
reads compile's output. Rotation: a certificate is replaced once ``rotate_at`` of its
lifetime has passed (half, as SPIRE does), long before it expires; the new one reaches the
sidecar as an SDS update on its ADS stream. Envoy uses it for new handshakes and keeps
existing connections, so nothing fails or drops.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from controlplane.compile.inputs.inventory import Sidecar
from controlplane.compile.inputs.mesh import MeshInputs, mesh_services
from controlplane.identity import apikeys
from controlplane.identity.ca import CertificateAuthority, IssuedCertificate
from controlplane.identity.tokens import (
    AuthenticationError,
    BootstrapTokens,
    Caller,
    SidecarAuthenticator,
)
from controlplane.ir import WorkloadCertificate

log = logging.getLogger(__name__)

CONTROL_PLANE_NAMESPACE, CONTROL_PLANE_ACCOUNT = "modelguard-system", "modelguard"
TRUST_BUNDLE_FILE = "trust-bundle.pem"


def control_plane_id(trust_domain: str) -> str:
    """The SPIFFE ID the xDS server presents; sidecars accept no other."""
    return f"spiffe://{trust_domain}/ns/{CONTROL_PLANE_NAMESPACE}/sa/{CONTROL_PLANE_ACCOUNT}"


@dataclass(frozen=True)
class IdentityConfig:
    directory: str = ".modelguard/identity"  # CA and token key, generated on first start
    trust_domain: str = "cluster.local"
    ca_cert: str | None = None  # bring your own CA (both set): used instead of `directory`
    ca_key: str | None = None
    svid_lifetime: float = 3600.0  # seconds
    rotate_at: float = 0.5  # fraction of the lifetime after which a certificate is replaced
    server_lifetime: float = 24 * 3600.0  # the xDS server's own certificate
    server_names: Sequence[str] = ("localhost", "modelguard.modelguard-system.svc")
    api_key_paths: Sequence[str] = ()  # Secrets with API keys (files or folders)
    xds_tls: bool = True


@dataclass
class _Issued:
    sidecar: Sidecar
    certificate: IssuedCertificate
    ir: WorkloadCertificate = field(repr=False)


class IdentityService:
    def __init__(
        self,
        config: IdentityConfig,
        *,
        authenticator: SidecarAuthenticator | None = None,
        xds_host: str = "127.0.0.1",
    ) -> None:
        self.config = config
        if config.ca_cert and config.ca_key:
            self.ca = CertificateAuthority.load(config.ca_cert, config.ca_key)
        else:
            self.ca = CertificateAuthority.load_or_create(config.directory, config.trust_domain)
        self.tokens = BootstrapTokens.load_or_create(config.directory)
        # What `modelguard bootstrap` gives sidecars to trust (also with a CA of your own).
        (Path(config.directory) / TRUST_BUNDLE_FILE).write_text(self.ca.root_pem)
        self.authenticator: SidecarAuthenticator = authenticator or self.tokens
        self.xds_host = xds_host
        self._issued: dict[str, _Issued] = {}
        self._lock = threading.Lock()
        self._api_keys: apikeys.Digests = {}
        self._tenant_by_id: dict[str, str] = {}
        self._api_key_problems: list[str] = []
        self.rotations = 0
        self._server_cert: IssuedCertificate | None = None
        # More Secrets with API keys, already as digests (cluster mode: the Kubernetes
        # source's labelled Secrets). Joined with the files into compile's one input.
        self.api_key_sources: list[Callable[[], apikeys.Digests]] = []
        self.reload_api_keys()

    # -- sidecars --

    def authenticate(self, sidecar: Sidecar, metadata: Mapping[str, str]) -> None:
        """Raises AuthenticationError; the caller refuses the stream and sends nothing."""
        if sidecar.identity.removeprefix("spiffe://").split("/", 1)[0] != self.config.trust_domain:
            raise AuthenticationError(
                f"node {sidecar.node_id!r}: identity {sidecar.identity} is outside trust "
                f"domain {self.config.trust_domain}"
            )
        self.authenticator.authenticate(sidecar, metadata)

    def identify(self, metadata: Mapping[str, str]) -> Caller:
        """Who made a call other than ADS (it names no node); raises AuthenticationError."""
        caller = self.authenticator.identify(metadata)
        if caller.identity.removeprefix("spiffe://").split("/", 1)[0] != self.config.trust_domain:
            raise AuthenticationError(
                f"identity {caller.identity} is outside trust domain {self.config.trust_domain}"
            )
        return caller

    def ensure(self, sidecar: Sidecar) -> None:
        """Issue the sidecar's SVID if it has none valid for its current identity."""
        with self._lock:
            issued = self._issued.get(sidecar.node_id)
            if issued is not None and issued.sidecar.identity == sidecar.identity:
                issued.sidecar = sidecar
                return
            self._issued[sidecar.node_id] = self._issue(sidecar)

    def forget(self, node_id: str) -> None:
        with self._lock:
            self._issued.pop(node_id, None)

    def _issue(self, sidecar: Sidecar) -> _Issued:
        cert = self.ca.issue(sidecar.identity, dt.timedelta(seconds=self.config.svid_lifetime))
        log.info(
            "issued SVID %s to %s (serial %x, expires %s)",
            sidecar.identity, sidecar.node_id, cert.serial, cert.not_after.isoformat(),
        )
        return _Issued(
            sidecar,
            cert,
            WorkloadCertificate(
                spiffe_id=cert.spiffe_id,
                certificate_pem=cert.certificate_pem,
                private_key_pem=cert.private_key_pem,
                trust_bundle_pem=self.ca.root_pem,
            ),
        )

    def rotate_due(self, now: dt.datetime | None = None) -> int:
        """Replace every certificate past ``rotate_at`` of its lifetime; returns how many."""
        now = now or dt.datetime.now(dt.UTC)
        rotated = 0
        with self._lock:
            for node_id, issued in list(self._issued.items()):
                # From the expiry, not not_before: certificates are backdated for clock skew.
                lifetime = dt.timedelta(seconds=self.config.svid_lifetime)
                due = issued.certificate.not_after - lifetime * (1 - self.config.rotate_at)
                if now >= due:
                    self._issued[node_id] = self._issue(issued.sidecar)
                    rotated += 1
        self.rotations += rotated
        return rotated

    def certificate(self, node_id: str) -> IssuedCertificate | None:
        with self._lock:
            issued = self._issued.get(node_id)
            return issued.certificate if issued else None

    # -- API keys --

    def reload_api_keys(self) -> bool:
        """Re-read the key Secrets; True if the digests changed."""
        digests, problems = apikeys.load(self.config.api_key_paths)
        for source in self.api_key_sources:
            for ref, keys in source().items():
                if ref in digests:  # the first definition wins, as within the files
                    problems.append(f"Secret {ref[0]}/{ref[1]} is defined twice")
                    continue
                digests[ref] = keys
        if problems != self._api_key_problems:
            for problem in problems:
                log.error("API keys: %s", problem)
        self._api_key_problems = problems
        if digests == self._api_keys:
            return False
        self._api_keys = digests
        self._tenant_by_id = {k.id: k.tenant for keys in digests.values() for k in keys}
        log.info("API keys loaded: %d key set(s)", len(digests))
        return True

    def tenant_of(self, key_id: str) -> str | None:
        """The tenant of a registered key, by its id (the extraction monitor's per-tenant
        bound); None for anything else (a tenant, an address)."""
        return self._tenant_by_id.get(key_id)

    @property
    def api_key_problems(self) -> list[str]:
        return list(self._api_key_problems)

    # -- compile's input --

    def mesh_inputs(self, sidecars: tuple[Sidecar, ...]) -> MeshInputs:
        with self._lock:
            certificates = {n: i.ir for n, i in self._issued.items()}
        return MeshInputs(
            certificates=certificates,
            api_keys=dict(self._api_keys),
            services=mesh_services(sidecars),
        )

    # -- the control plane's own certificate --

    def _server_certificate(self) -> IssuedCertificate:
        names = [*self.config.server_names]
        ips = ["127.0.0.1"]
        try:
            ipaddress.ip_address(self.xds_host)
            if self.xds_host not in ips and self.xds_host not in ("0.0.0.0", "::"):
                ips.append(self.xds_host)
        except ValueError:
            names.append(self.xds_host)
        return self.ca.issue(
            control_plane_id(self.config.trust_domain),
            dt.timedelta(seconds=self.config.server_lifetime),
            dns_names=names,
            ip_addresses=ips,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS for the xDS port, renewed at half its lifetime for new connections."""

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            now = dt.datetime.now(dt.UTC)
            cert = self._server_cert
            half = dt.timedelta(seconds=self.config.server_lifetime / 2)
            if cert is not None and now < cert.not_after - half:
                return None  # keep the current one
            self._server_cert = self._server_certificate()
            return self._server_config(self._server_cert)

        self._server_cert = self._server_certificate()
        return grpc.dynamic_ssl_server_credentials(
            self._server_config(self._server_cert),
            fetch,  # type: ignore[arg-type]  # grpc documents None as "keep"; stubs omit it
            require_client_authentication=False,
        )

    def _server_config(self, cert: IssuedCertificate) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(cert.private_key_pem.encode(), cert.certificate_pem.encode())]
        )

    # -- the loop --

    async def run(self, changed: Callable[[], None], tick: float | None = None) -> None:
        """Rotate and reload until cancelled; ``changed`` asks for a rebuild."""
        every = tick or max(0.05, min(1.0, self.config.svid_lifetime / 20))
        while True:
            await asyncio.sleep(every)
            try:
                rotated = self.rotate_due()
                keys = await asyncio.to_thread(self.reload_api_keys)
            except Exception:
                log.exception("identity: rotation or key reload failed; will retry")
                continue
            if rotated or keys:
                changed()


def root_pem(directory: str | os.PathLike[str]) -> str:
    """The trust bundle the control plane wrote (what ``modelguard bootstrap`` puts into a
    sidecar's bootstrap)."""
    return (Path(directory) / TRUST_BUNDLE_FILE).read_text()


# --- CLI: the identity flags of `modelguard serve` and `modelguard run` -------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--identity-dir",
        help="where the CA and the bootstrap-token key are kept (generated on first start; "
        "default .modelguard/identity, or WORKDIR/identity for run)",
    )
    parser.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain")
    parser.add_argument("--ca-cert", help="bring your own CA: PEM certificate (with --ca-key)")
    parser.add_argument("--ca-key", help="bring your own CA: PEM private key (unencrypted)")
    parser.add_argument(
        "--svid-lifetime", type=float, default=3600.0, help="workload certificate lifetime, s"
    )
    parser.add_argument(
        "--api-keys",
        action="append",
        default=[],
        metavar="PATH",
        help="Secret files or folders with API keys of outside callers (repeatable)",
    )
    parser.add_argument(
        "--xff-num-trusted-hops",
        type=int,
        default=0,
        metavar="N",
        help="proxies in front of the sidecars (an ingress: 1) whose X-Forwarded-For entries "
        "name the caller's address; 0 (default) believes only the TCP peer",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no CA: plaintext xDS, no sidecar tokens, no mTLS (development only)",
    )


def config_from_args(args: argparse.Namespace, default_dir: str) -> IdentityConfig | None:
    if args.insecure:
        return None
    if bool(args.ca_cert) != bool(args.ca_key):
        raise SystemExit("--ca-cert and --ca-key go together")
    return IdentityConfig(
        directory=args.identity_dir or default_dir,
        trust_domain=args.trust_domain,
        ca_cert=args.ca_cert,
        ca_key=args.ca_key,
        svid_lifetime=args.svid_lifetime,
        api_key_paths=tuple(args.api_keys),
    )
