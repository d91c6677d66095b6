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
from pathlib import Path

import pytest

from controlplane.app.server import ControlPlane

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
    token_plane: tuple[ControlPlane, str, Path], argv: list[str], served: int
) -> None:
    _, address, token_file = token_plane
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
