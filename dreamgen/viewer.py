"""`dreamgen view OUT`: a local, read-only web viewer of an output folder (aiohttp).

Pages: ``/`` records (filters, full-text search, keyset paging), ``/r/ID`` one record
(spans highlighted in place, listening and reflex side by side, lineage as links),
``/rejected`` the kept sample of rejected answers, ``/coverage`` the taxonomy heatmap
(reloads itself), ``/api/status`` the indexer's progress as JSON.

It never writes to OUT: the index (``dreamgen.viewindex``) lives in a cache folder, and
shards are opened read-only. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import orjson
from aiohttp import web
from pydantic import ValidationError

from dreamgen import viewpages
from dreamgen.errors import first_error
from dreamgen.record import Mode, Record, Split
from dreamgen.rejects import read_rejected, rejected_reasons
from dreamgen.store import MANIFEST, SHARDS
from dreamgen.taxonomy import CueKind, DistractorKind, Domain, Emotion, Momentum
from dreamgen.viewindex import ViewIndex, default_cache

PAGE_SIZE = 50
MATCH_CAP = 1000  # counts beyond this show as "1000+": exact counts of 1M cost too much


class ViewerError(Exception):
    """The viewer cannot start (not an output folder, port in use, cache not writable)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_manifest(out: Path) -> tuple[dict[str, Any], list[str]]:
    """The manifest (empty if missing or unreadable) and notes saying what is wrong."""
    path = out / MANIFEST
    if not path.exists():
        return {}, [f"{MANIFEST} is missing: records are shown, coverage and totals are not"]
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        return {}, [f"{MANIFEST} cannot be read ({exc}): coverage and totals are not shown"]
    return (data, []) if isinstance(data, dict) else ({}, [f"{MANIFEST} is not an object"])


class Viewer:
    """The request handlers over one output folder and its index."""

    def __init__(self, out: Path, index: ViewIndex) -> None:
        self.out = out
        self.index = index

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/", self.records),
                web.get("/r/{id}", self.record),
                web.get("/rejected", self.rejected),
                web.get("/coverage", self.coverage),
                web.get("/api/status", self.status),
            ]
        )
        return app

    def status_text(self) -> tuple[str, bool]:
        st = self.index.status
        building = st.building or st.shards_indexed < st.shards_seen
        text = f"{st.records} records indexed from {st.shards_indexed}/{st.shards_seen} shards"
        if building:
            text += " · indexing…"
        elif st.first_pass_s is not None:
            text += f" · first pass {st.first_pass_s:.1f}s · following new shards"
        return text, building

    def notes(self) -> list[str]:
        st = self.index.status
        notes = [st.error] if st.error else []
        if st.rebuilt:
            notes.append(f"index rebuilt: {st.rebuilt}")
        problems = self.index.problems()
        if problems:
            shown = "; ".join(f"{s}:{n}: {m}" for s, n, m in problems[:5])
            notes.append(f"{len(problems)}+ lines could not be read and are not shown ({shown})")
        return notes

    def choices(self) -> dict[str, list[Any]]:
        values = self.index.status.values
        return {
            "cue_kind": [k.value for k in CueKind],
            "distractor_kind": [k.value for k in DistractorKind],
            "domain": [k.value for k in Domain],
            "emotion": [k.value for k in Emotion],
            "momentum": [k.value for k in Momentum],
            "difficulty": [1, 2, 3, 4, 5],
            "mode": list(get_args(Mode)),
            "split": list(get_args(Split)),
            "card": values.get("card", []),
            "generation": values.get("generation", []),
        }

    async def records(self, request: web.Request) -> web.Response:
        q = request.query
        params = {k: q.get(k, "") for k in q}
        notes = self.notes()
        judge: tuple[str, float] | None = None
        if params.get("judge_min"):
            try:
                judge = (params.get("judge_field") or "judge_coherence", float(params["judge_min"]))
            except ValueError:
                notes.append(f"judge ≥ must be a number, not {params['judge_min']!r}: ignored")
        after, before = _int(params.get("after")), _int(params.get("before"))
        filters = {k: v for k, v in params.items() if v}
        text = params.get("q", "")
        rows = self.index.query(
            filters, text=text, judge=judge, after=after, before=before, limit=PAGE_SIZE
        )
        matches = self.index.matches(filters, text=text, judge=judge, cap=MATCH_CAP)
        status, building = self.status_text()
        html = viewpages.list_page(
            choices=self.choices(),
            judge_fields=self.index.status.values.get("judge", []),
            params=params,
            rows=rows,
            matches=matches,
            cap=MATCH_CAP,
            status=status,
            building=building,
            notes=notes,
        )
        return _html(html)

    async def record(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        try:
            line = self.index.read_line(rid)
        except OSError as exc:
            body = f"<div class='banner'>cannot read the shard: {viewpages.h(exc)}</div>"
            return _html(viewpages.page("record", body), status=500)
        if line is None:
            body = f"<div class='banner'>no record {viewpages.h(rid)} in this folder</div>"
            return _html(viewpages.page("not found", body), status=404)
        try:
            record = Record.model_validate_json(line)
        except ValidationError as exc:
            return _html(viewpages.invalid_record_page(rid, line, first_error(exc, "record")))
        others = [i for i in (record.parent_id, record.quality.pair_of) if i]
        known = {i for i in others if self.index.locate(i) is not None}
        pairs = self.index.ids_where("pair_of", record.id)
        # minimal pairs carry parent_id too: list them once, as pairs
        children = [i for i in self.index.ids_where("parent_id", record.id) if i not in pairs]
        html = viewpages.record_page(record, known=known, children=children, pairs=pairs)
        return _html(html)

    async def rejected(self, request: web.Request) -> web.Response:
        reason = request.query.get("reason", "")
        reasons = rejected_reasons(self.out)
        counts = {r: sum(1 for _ in read_rejected(self.out, r)) for r in reasons}
        entries = list(read_rejected(self.out, reason)) if reason in reasons else []
        return _html(viewpages.rejected_page(counts, reason, entries))

    async def coverage(self, request: web.Request) -> web.Response:
        manifest, notes = read_manifest(self.out)
        coverage = manifest.get("coverage") or []
        if manifest and not coverage:
            notes.append("the manifest has no coverage yet (a run writes it every 30 s)")
        return _html(viewpages.coverage_page(coverage, notes))

    async def status(self, request: web.Request) -> web.Response:
        text, building = self.status_text()
        st = self.index.status
        body = {"text": text, "building": building, "records": st.records}
        return web.Response(body=orjson.dumps(body), content_type="application/json")


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def open_index(out: Path, cache: Path | None) -> ViewIndex:
    """Check ``out`` is an output folder and open (or create) its index in ``cache``."""
    if not out.is_dir():
        raise ViewerError(f"{out}: no such folder")
    if not (out / SHARDS).is_dir():
        raise ViewerError(f"{out} is not a dreamgen output folder (it has no {SHARDS}/)")
    folder = cache if cache is not None else default_cache(out)
    try:
        try:
            return ViewIndex(out, folder)
        except sqlite3.DatabaseError:  # a damaged cache file: it is only a cache, start over
            (folder / "index.sqlite").unlink(missing_ok=True)
            return ViewIndex(out, folder)
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ViewerError(f"cannot write the index in {folder}: {reason}") from exc


async def serve(
    out: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    cache: Path | None = None,
    on_ready: Callable[[str], None] = print,
) -> None:
    """Serve the viewer until SIGINT/SIGTERM; ``on_ready`` gets the URL once listening."""
    index = open_index(out, cache)
    runner = web.AppRunner(Viewer(out, index).app(), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            reason = "is in use" if exc.errno == 98 else f"cannot be used: {exc.strerror or exc}"
            raise ViewerError(
                f"port {port} on {host} {reason}; pick another with --port (0: any free one)"
            ) from None
        index.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
        on_ready(f"http://{shown}:{bound[1]}/")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        index.close()
