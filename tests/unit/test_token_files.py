"""Files that hold a token or a key are the owner's only, and a token names its workload
(issue 18, item 5)."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

from controlplane.app import bootstrap_cli
from controlplane.compile.inputs.inventory import Sidecar
from controlplane.identity.service import IdentityConfig, IdentityService
from controlplane.identity.tokens import AuthenticationError, BootstrapTokens


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_bootstrap_o_writes_the_bootstrap_and_its_token_0600(tmp_path: Path) -> None:
    identity = tmp_path / "identity"
    IdentityService(IdentityConfig(directory=str(identity), trust_domain="cluster.local"))
    parser = argparse.ArgumentParser()
    bootstrap_cli.add_arguments(parser)
    out = tmp_path / "sidecar.yaml"
    args = parser.parse_args(
        [
            "--service", "fraud-model", "--namespace", "ml", "--node-id", "fraud-model-0",
            "--app-port", "8080", "--inbound-port", "15006", "--admin-port", "19000",
            "--xds", "127.0.0.1:18000", "--identity-dir", str(identity), "-o", str(out),
        ]
    )
    assert bootstrap_cli.run(args) == 0
    token_file = tmp_path / "sidecar.token"
    assert _mode(out) == 0o600 and _mode(token_file) == 0o600
    token = token_file.read_text().strip()
    assert token not in out.read_text()
    keys = [p for p in identity.iterdir() if p.suffix == ".key"]
    assert keys and {_mode(p) for p in keys} == {0o600}
    # The token names the workload it was issued for, not only the node and identity.
    caller = BootstrapTokens.load_or_create(identity).identify({"authorization": f"Bearer {token}"})
    assert caller.workload == ("fraud-model", "ml")


def test_a_token_cannot_claim_another_service_of_its_own_identity(tmp_path: Path) -> None:
    tokens = BootstrapTokens.load_or_create(tmp_path)
    identity = "spiffe://cluster.local/ns/ml/sa/shared"
    token = tokens.issue("web-0", identity, "web", "ml")
    web = Sidecar("web-0", "web", "ml", identity, 8080, 15006)
    tokens.authenticate(web, {"authorization": f"Bearer {token}"})
    for claimed in (
        Sidecar("web-0", "fraud-model", "ml", identity, 8080, 15006),
        Sidecar("web-0", "web", "other", identity, 8080, 15006),
    ):
        try:
            tokens.authenticate(claimed, {"authorization": f"Bearer {token}"})
        except AuthenticationError as err:
            assert "not valid" in str(err)
        else:
            raise AssertionError(f"{claimed.service}.{claimed.namespace} was accepted")


def test_a_key_secret_over_the_limit_is_refused_with_its_path(tmp_path: Path) -> None:
    from controlplane.api.limits import MAX_KEYS_PER_SECRET
    from controlplane.identity import apikeys

    keys = "".join(f"  k{i}: key-{i}\n" for i in range(MAX_KEYS_PER_SECRET + 1))
    path = tmp_path / "keys.yaml"
    path.write_text(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: partner-keys, namespace: ml}\n"
        "stringData:\n" + keys
    )
    digests, problems = apikeys.load([path])
    assert digests == {("ml", "partner-keys"): ()}  # no key of it is accepted
    assert problems == [
        f"{path}[0] Secret ml/partner-keys: stringData/data: {MAX_KEYS_PER_SECRET + 1:,} keys, "
        f"over the limit of {MAX_KEYS_PER_SECRET:,} per Secret"
    ]
