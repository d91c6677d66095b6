"""The admin API beyond loopback: refused without a bearer token, served with it.

The admin API is bound to this machine's own non-loopback address (not 127.0.0.1), which
is what "reachable from other workloads" means in a pod, and called there over real gRPC.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from controlplane.app.adminauth import AdminAuthError, is_loopback
from controlplane.app.server import ControlPlane, ControlPlaneConfig
from controlplane.gen.modelguard.admin.v1 import admin_pb2, admin_pb2_grpc
from controlplane.netutil import free_port


async def _status(address: str, token: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            await admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), metadata=metadata, timeout=5
            )
        except grpc.aio.AioRpcError as err:
            return err.code()
    return grpc.StatusCode.OK


async def test_admin_api_beyond_loopback_refuses_unauthenticated_calls(
    token_plane: tuple[ControlPlane, str, Path],
) -> None:
    _, address, token_file = token_plane
    assert await _status(address, None) == grpc.StatusCode.UNAUTHENTICATED
    assert await _status(address, "guess") == grpc.StatusCode.UNAUTHENTICATED
    assert await _status(address, "s3cret-admin-token") == grpc.StatusCode.OK
    # Releasing a quarantine (what an attacker would want) is refused the same way.
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin_pb2_grpc.QuarantinesStub(channel).ReleaseQuarantine(
                admin_pb2.ReleaseQuarantineRequest(client_key="mallory"), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A rotated Secret takes effect without a restart.
    time.sleep(0.01)
    token_file.write_text("rotated-token")
    os.utime(token_file, (time.time() + 5, time.time() + 5))
    assert await _status(address, "s3cret-admin-token") == grpc.StatusCode.UNAUTHENTICATED
    assert await _status(address, "rotated-token") == grpc.StatusCode.OK


async def test_the_cli_sends_the_token_from_its_environment(
    token_plane: tuple[ControlPlane, str, Path],
) -> None:
    _, address, token_file = token_plane
    argv = [sys.executable, "-m", "controlplane.app.cli", "status", "--admin", address, "--json"]
    without = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30, env=os.environ
    )
    assert without.returncode != 0
    assert "MODELGUARD_ADMIN_TOKEN" in without.stderr
    env = {**os.environ, "MODELGUARD_ADMIN_TOKEN_FILE": str(token_file)}
    with_token = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30, env=env
    )
    assert with_token.returncode == 0, with_token.stderr


async def test_no_unauthenticated_bind_beyond_loopback() -> None:
    plane = ControlPlane(
        ControlPlaneConfig(
            policy_paths=(), xds_port=free_port(), admin_host="0.0.0.0", admin_port=0, watch=False
        )
    )
    with pytest.raises(AdminAuthError, match="--admin-token-file"):
        await plane.start()
    await plane.stop(grace=0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.7")
