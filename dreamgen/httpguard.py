"""A small HTTP server that a flood of clients cannot exhaust (the daemon's health port).

``GuardedServer`` is aiohttp's low-level ``web.Server`` with

- a cap on open connections: one over ``max_connections`` is closed at once (its file
  descriptor freed), so 20k idle sockets cannot take the descriptors the store needs;
- an idle deadline: a connection with no request started or finished for ``idle_s``
  (one that never sends a request, a slow-loris header trickle, an idle keep-alive) is
  closed;
- small request-line and header limits (these endpoints take no input).

Refusals are counted (``refused``, ``idle_closed``) and logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("dreamgen.http")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
LOG_EVERY_S = 60.0


class GuardedServer(web.Server):
    """``web.Server`` with a connection cap and an idle deadline (see the module docstring)."""

    def __init__(
        self, handler: Handler, *, max_connections: int = 64, idle_s: float = 10.0, **kw: Any
    ) -> None:
        super().__init__(
            self._wrap(handler),
            keepalive_timeout=idle_s,
            max_line_size=4096,
            max_field_size=4096,
            **kw,
        )
        self.max_connections = max_connections
        self.idle_s = idle_s
        self.refused = 0
        self.idle_closed = 0
        self._last: dict[RequestHandler, float] = {}
        self._busy: set[RequestHandler] = set()
        self._logged = -LOG_EVERY_S

    def _wrap(self, handler: Handler) -> Handler:
        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            self._busy.add(request.protocol)
            try:
                return await handler(request)
            finally:
                self._busy.discard(request.protocol)
                self._last[request.protocol] = time.monotonic()

        return handle

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self._last) >= self.max_connections:
            self.refused += 1
            self._log("connection limit (%d) reached: closing new connections (%d so far)",
                      self.max_connections, self.refused)  # fmt: skip
            transport.abort()
            return
        self._last[handler] = time.monotonic()
        self._arm(handler, transport)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self._last.pop(handler, None)
        self._busy.discard(handler)
        super().connection_lost(handler, exc)

    def _arm(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        def check() -> None:
            last = self._last.get(handler)
            if last is None or transport.is_closing():
                return
            idle = 0.0 if handler in self._busy else time.monotonic() - last
            if idle >= self.idle_s:
                self.idle_closed += 1
                self._last.pop(handler, None)  # frees its slot now, not when the loop gets to it
                transport.abort()
                return
            asyncio.get_running_loop().call_later(self.idle_s - idle, check)

        asyncio.get_running_loop().call_later(self.idle_s, check)

    def _log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.warning(msg, *args)
