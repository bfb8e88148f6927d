"""A cancellation-safe wait, shared by the server engine, the launcher and the pipeline."""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` up to ``timeout`` seconds; True if it was set.

    ``asyncio.timeout``, not ``wait_for``: on Python 3.11 a ``wait_for`` whose timeout
    fires as the task is cancelled can swallow the cancellation, and a loop around it
    then never ends.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
        return True
    except TimeoutError:
        return False
