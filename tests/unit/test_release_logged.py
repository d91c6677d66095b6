"""Quarantine releases are logged (issue 19), by an admin request or by expiry, naming the
client by its fingerprint, never its key."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from controlplane.extraction.admin import QuarantineAdmin
from controlplane.extraction.feed import Extraction
from controlplane.extraction.verdicts import ClientRef, Enforcement
from controlplane.gen.modelguard.admin.v1 import admin_pb2


def _quarantine(key: str, until: float) -> Enforcement:
    client = ClientRef.of("demo/digits-model", key, "header", "x-api-key")  # digested
    return Enforcement("quarantine", client, time.time() - 1, until, "prada")


async def test_a_release_by_request_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    extraction = Extraction(lambda: ())
    enforcement = _quarantine("secret-key-1", time.time() + 3600)
    extraction.verdicts.put(enforcement)
    with caplog.at_level(logging.INFO):
        await QuarantineAdmin(extraction.monitor).ReleaseQuarantine(
            admin_pb2.ReleaseQuarantineRequest(client_key="secret-key-1"), None
        )
    lines = [r.getMessage() for r in caplog.records if "released" in r.getMessage()]
    assert lines == [
        f"quarantine of {enforcement.client.fingerprint} (demo/digits-model) released by an "
        "admin request"
    ]
    assert "secret-key-1" not in caplog.text


async def test_an_expiry_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    extraction = Extraction(lambda: ())
    enforcement = _quarantine("secret-key-2", time.time() + 0.3)
    extraction.verdicts.put(enforcement)
    with caplog.at_level(logging.INFO):
        await extraction.feed.start()
        try:
            for _ in range(100):
                if extraction.verdicts.active() == () and "expired" in caplog.text:
                    break
                await asyncio.sleep(0.05)
        finally:
            await extraction.feed.stop()
    assert f"quarantine of {enforcement.client.fingerprint} (demo/digits-model) expired" in (
        caplog.text
    )
    assert "secret-key-2" not in caplog.text
