"""Every `modelguard` command that calls the admin API sends the admin token.

Beyond loopback the admin API refuses calls without `authorization: Bearer <token>`; the
README promises that the commands send it from $MODELGUARD_ADMIN_TOKEN or the file named by
$MODELGUARD_ADMIN_TOKEN_FILE. `usage unthrottle` opened its own channel without it, so it was
refused where `usage` itself worked. Each command runs as a user runs it (a subprocess)
against a real control plane bound to this machine's own non-loopback address.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.netutil import free_port
from tests.integration.test_admin_auth import own_address

# Each command with the exit code it has when the call is served: the commands that name a
# client or a sidecar nobody has exit 1 with their own "not found" line.
COMMANDS = [
    (["status"], 0),
    (["usage"], 0),
    (["usage", "unthrottle", "nobody"], 1),
    (["quarantine", "list", "--all"], 0),
    (["quarantine", "release", "nobody"], 1),
    (["traces", "-n", "1"], 0),
    (["proxy-config", "nobody", "listeners"], 1),
]


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    token = tmp_path / "admin-token"
    token.write_text("s3cret-admin-token\n")
    host = own_address()
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(),
            xds_port=free_port(),
            admin_host=host,
            admin_port=0,
            watch=False,
            admin_token_file=str(token),
        )
    )
    await plane.start()
    try:
        yield f"{host}:{plane.admin_port}", token
    finally:
        await plane.stop(grace=0)


async def _modelguard(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "controlplane.app.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(("argv", "served"), COMMANDS, ids=[" ".join(a) for a, _ in COMMANDS])
async def test_every_admin_command_sends_the_admin_token(
    plane: tuple[str, Path], argv: list[str], served: int
) -> None:
    address, token_file = plane
    base = {k: v for k, v in os.environ.items() if not k.startswith("MODELGUARD_ADMIN")}
    base["MODELGUARD_ADMIN"] = address
    refused = await _modelguard(argv, base)
    assert refused.returncode == 1, refused.stderr
    assert "UNAUTHENTICATED" in refused.stderr and "MODELGUARD_ADMIN_TOKEN" in refused.stderr
    for env in (
        {**base, "MODELGUARD_ADMIN_TOKEN_FILE": str(token_file)},
        {**base, "MODELGUARD_ADMIN_TOKEN": "s3cret-admin-token"},
    ):
        result = await _modelguard(argv, env)
        assert "UNAUTHENTICATED" not in result.stderr, result.stderr
        assert result.returncode == served, f"{argv}: {result.stdout}\n{result.stderr}"
