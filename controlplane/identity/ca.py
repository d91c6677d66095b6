"""The certificate authority: a root that signs short-lived workload certificates (SVIDs).

The root is either the user's own (``load``: bring your own CA, e.g. an intermediate of the
company PKI) or generated on first start and persisted (``load_or_create``), so sidecars keep
trusting the control plane across restarts. Workload certificates carry exactly one URI SAN,
the SPIFFE ID, as the X.509-SVID specification requires.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

# Certificates are valid a little before they are issued: a peer whose clock is slightly
# behind must not see a brand-new certificate as "not yet valid" during rotation.
CLOCK_SKEW = dt.timedelta(minutes=1)

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CAError(ValueError):
    """A CA certificate or key that cannot be used, with the file it came from."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its key, PEM-encoded, with what it was issued for."""

    spiffe_id: str
    certificate_pem: str
    private_key_pem: str = field(repr=False)
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: SigningKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


class CertificateAuthority:
    def __init__(self, certificate: x509.Certificate, key: SigningKey) -> None:
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise CAError("the CA key does not belong to the CA certificate")
        self.certificate = certificate
        self.key = key

    # -- where the root comes from --

    @classmethod
    def generate(cls, trust_domain: str, lifetime: dt.timedelta = dt.timedelta(days=3650)) -> (
        CertificateAuthority
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelguard"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"modelguard root CA ({trust_domain})"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> (
        CertificateAuthority
    ):
        """Bring your own CA: a PEM certificate (must be a CA) and its PEM private key."""
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        except (OSError, ValueError) as err:
            raise CAError(f"{cert_path}: not a PEM certificate: {err}") from err
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise CAError(f"{key_path}: not an unencrypted PEM private key: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CAError(f"{key_path}: only EC and RSA CA keys are supported")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise CAError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE missing)")
        try:
            return cls(cert, key)
        except CAError as err:
            raise CAError(f"{key_path}: {err}") from err

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], trust_domain: str) -> (
        CertificateAuthority
    ):
        """The CA persisted in ``directory``; generated and written there on first start."""
        folder = Path(directory)
        cert_path, key_path = folder / CA_CERT_FILE, folder / CA_KEY_FILE
        if cert_path.exists() or key_path.exists():
            return cls.load(cert_path, key_path)
        ca = cls.generate(trust_domain)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds the CA key
        _write_private(key_path, _pem_key(ca.key))
        cert_path.write_text(ca.root_pem)
        return ca

    # -- what it hands out --

    @property
    def root_pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def issue(
        self,
        spiffe_id: str,
        lifetime: dt.timedelta,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A leaf certificate for ``spiffe_id``, usable as TLS client and server."""
        now = now or _now()
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        not_before = now - CLOCK_SKEW
        # A leaf never outlives the root that vouches for it.
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "modelguard")]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # SPIFFE: the subject is empty-ish and the SAN carries the identity, so it is critical.
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return IssuedCertificate(
            spiffe_id=spiffe_id,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            private_key_pem=_pem_key(key),
            not_before=not_before,
            not_after=not_after,
            serial=serial,
        )


def _write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a leftover temporary file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def pem_key(key: SigningKey) -> str:
    """A private key as PEM (exporting the CA as a Secret: ``modelguard ca init``)."""
    return _pem_key(key)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600)."""
    _write_private(path, text)
