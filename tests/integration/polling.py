"""Polling for the integration tests: wait for a real system to reach a state, never sleep
a fixed time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    check: Callable[[], Any],
    timeout: float = 15.0,
    every: float = 0.1,
    retry_on: tuple[type[BaseException], ...] = (OSError,),
) -> Any:
    """Poll a sync or async ``check`` until it returns something truthy, and return that.

    ``retry_on`` errors (by default OSError: a listener not there yet, a refused
    connection) count as "not yet"; the last value or error is in the failure message.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
        except retry_on as err:
            last = err
        else:
            if last:
                return last
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
