"""Reading a server's answer with a size cap: a misbehaving server cannot fill our memory.

A response body is read in chunks and refused as soon as it passes ``cap`` bytes (a
``Content-Length`` over the cap is refused before reading). Compressed bodies (``gzip``,
``deflate``) are decoded here, not by aiohttp (sessions use ``auto_decompress=False``),
with the output of each step bounded and a cap on the compression ratio, so a gzip bomb
stops after at most ``cap`` decoded bytes. Token counts from a server are clamped.
"""

from __future__ import annotations

import math
import zlib

import aiohttp

from dreamgen.engines.base import TransientError

ACCEPT_ENCODING = "gzip, deflate"  # what read_capped can decode (never br/zstd)
CHUNK = 64 * 1024
# Ratios of real JSON and Prometheus text stay well under this; a bomb is ~1000:1.
MAX_RATIO = 100.0
RATIO_FLOOR = 1 << 20  # small bodies may compress better than MAX_RATIO: no ratio check
BYTES_PER_TOKEN = 64  # a token's text JSON-escaped, worst case (\uXXXX for each byte)
SLACK_BYTES = 4 << 20  # the envelope: usage, logprobs, a proxy's error page
METRICS_CAP = 2 << 20  # vLLM's /metrics is ~0.1 MB; the Prometheus parser is pure Python
SMALL_CAP = 1 << 20  # /health, /v1/models
TOKEN_CAP = 1 << 24  # no single request's token count is larger (16M)


class BodyTooLarge(TransientError):
    """A response body over its cap (or a compression bomb): read no further."""


def response_cap(max_tokens: int | None, override: int | None = None) -> int:
    """The body cap for a completion: ``override``, or a few MB past ``max_tokens``' worst case."""
    if override is not None:
        return override
    return SLACK_BYTES + BYTES_PER_TOKEN * max(0, max_tokens or 0)


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The (decoded) body of ``resp``, at most ``cap`` bytes; BodyTooLarge past that.

    On refusal the connection is closed, so the rest is never read.
    """
    try:
        return await _read(resp, cap)
    except BodyTooLarge:
        resp.close()
        raise


async def _read(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    length = resp.content_length
    if length is not None and length > cap:
        raise BodyTooLarge(f"response body of {length} bytes is over the {cap}-byte cap")
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    decoder = None
    if encoding in ("gzip", "x-gzip"):
        decoder = zlib.decompressobj(wbits=31)
    elif encoding == "deflate":
        decoder = zlib.decompressobj(wbits=47)  # zlib-wrapped (as HTTP says) or gzip
    elif encoding not in ("identity", ""):
        raise BodyTooLarge(f"response body in an encoding we did not ask for ({encoding!r})")
    out = bytearray()
    raw = 0
    async for chunk in resp.content.iter_chunked(CHUNK):
        raw += len(chunk)
        if decoder is None:
            out += chunk
        else:
            try:
                # At most one byte past the cap per step: the bomb is never inflated.
                out += decoder.decompress(chunk, cap + 1 - len(out))
            except zlib.error as exc:
                raise TransientError(f"corrupt {encoding} body: {exc}") from exc
            if len(out) > RATIO_FLOOR and len(out) > MAX_RATIO * raw:
                raise BodyTooLarge(
                    f"{encoding} body decodes at over {MAX_RATIO:g}:1 (a compression bomb?)"
                )
        if len(out) > cap or raw > cap:
            raise BodyTooLarge(f"response body is over the {cap}-byte cap")
    return bytes(out)


def token_count(value: object, cap: int = TOKEN_CAP) -> int:
    """A server's token count as an int in ``[0, cap]``; 0 when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return max(0, min(int(value), cap))
