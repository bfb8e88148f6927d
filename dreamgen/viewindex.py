"""The viewer's index of an output folder: one SQLite file in a cache folder, never in OUT.

``dreamgen view`` must open a million-record folder at once and never write to it, so it
keeps, outside the store, a table with one row per record (the fields the list filters
on, and where the line sits: shard, byte offset, length) and a full-text index. The index
is built shard by shard in a background thread (pages answer from what is indexed so
far), kept on disk between opens, and brought up to date as shards close (a live build or
daemon). Closed shards are immutable by the store's contract; if one changed anyway
(hand-edited, or the folder was rebuilt) the whole index is rebuilt.

Records are not validated here (pydantic on every line would make a first open of 1M
records minutes long); a line that is not JSON with an ``id`` is listed as a problem and
skipped. The record page validates the one record it shows.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from dreamgen.store import SHARDS, shard_index

INDEX_FORMAT = 2
FILTERS = (
    "cue_kind",
    "distractor_kind",
    "domain",
    "emotion",
    "momentum",
    "difficulty",
    "mode",
    "split",
    "card",
    "generation",
)
_INT_FILTERS = {"difficulty", "generation"}
_SHARD = re.compile(r"^part-\d+\.jsonl$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,
    records INTEGER, indexed_at REAL);
CREATE TABLE IF NOT EXISTS records (rid INTEGER PRIMARY KEY, id TEXT, shard TEXT,
    line INTEGER, offset INTEGER, length INTEGER, cue_kind TEXT, distractor_kind TEXT,
    domain TEXT, emotion TEXT, momentum TEXT, difficulty INTEGER, mode TEXT, split TEXT,
    card TEXT, generation INTEGER, parent_id TEXT, group_id TEXT, pair_of TEXT,
    minimal_pair TEXT, judge TEXT, preview TEXT);
CREATE INDEX IF NOT EXISTS records_id ON records(id);
CREATE INDEX IF NOT EXISTS records_parent ON records(parent_id);
CREATE INDEX IF NOT EXISTS records_pair ON records(pair_of);
CREATE TABLE IF NOT EXISTS problems (shard TEXT, line INTEGER, message TEXT);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(text, content='', detail=none);
"""


def default_cache(out: Path) -> Path:
    """Where the index of ``out`` lives: ``$DREAMGEN_CACHE`` or ``~/.cache/dreamgen``."""
    root = os.environ.get("DREAMGEN_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) / "dreamgen" if root else Path.home() / ".cache" / "dreamgen"
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]
    return base / f"view-{key}"


def judge_scores(quality: dict[str, Any]) -> dict[str, float] | None:
    """A judge's numeric scores (``quality.judge_*``), None if the record was not judged."""
    if not quality.get("judged", True):  # unjudged records carry default zeros
        return None
    scores = {
        k: float(v)
        for k, v in quality.items()
        if k.startswith("judge_") and isinstance(v, int | float) and not isinstance(v, bool)
    }
    return scores or None


@dataclass
class Status:
    """What the indexer has done; read by the pages, written by the indexer thread."""

    shards_seen: int = 0
    shards_indexed: int = 0
    records: int = 0
    building: bool = True
    rebuilt: str = ""  # why the index was thrown away and rebuilt, if it was
    error: str = ""
    first_pass_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    # values present, for the filter menus: card, generation, judge (score names); kept
    # while indexing because DISTINCT over a million rows costs a page load a second
    values: dict[str, list[Any]] = field(default_factory=dict)


class ViewIndex:
    """The index over ``out``'s closed shards, stored at ``cache/index.sqlite``."""

    def __init__(self, out: Path, cache: Path) -> None:
        self.out = Path(out)
        self.shards_dir = self.out / SHARDS
        self.cache = Path(cache)
        self.path = self.cache / "index.sqlite"
        self.status = Status()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cache.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # pages read while the indexer writes
            fmt = self._format(db)
            if fmt not in (None, str(INDEX_FORMAT)):
                db.close()
                self._drop()
                db = self._connect()
                db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('format', ?), ('out', ?)",
                (str(INDEX_FORMAT), str(self.out.resolve())),
            )
            db.commit()
        finally:
            db.close()
        self.reader = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")  # a cache: losing the last commit is fine
        return db

    @staticmethod
    def _format(db: sqlite3.Connection) -> str | None:
        try:
            row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        except sqlite3.OperationalError:
            return None
        return row[0] if row else None

    def _drop(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    # -- building ----------------------------------------------------------------------

    def start(self, poll_s: float = 1.0) -> None:
        """Index in a background thread: a first pass, then new shards every ``poll_s``."""
        self._thread = threading.Thread(target=self._loop, args=(poll_s,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the indexer thread and close the reader."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.reader.close()

    def _loop(self, poll_s: float) -> None:
        db = self._connect()
        try:
            while not self._stop.is_set():
                try:
                    self.refresh(db)
                except (OSError, sqlite3.Error) as exc:
                    self.status.error = f"indexing failed: {exc}"
                if self.status.first_pass_s is None:
                    self.status.first_pass_s = time.monotonic() - self.status.started
                self.status.building = False
                self._stop.wait(poll_s)
        finally:
            db.close()

    def refresh(self, db: sqlite3.Connection | None = None) -> int:
        """Index closed shards not indexed yet; returns how many records were added."""
        own = db is None
        conn = db if db is not None else self._connect()
        try:
            return self._refresh(conn)
        finally:
            if own:
                conn.close()

    def _refresh(self, db: sqlite3.Connection) -> int:
        on_disk = _closed(self.shards_dir)
        known = {
            name: (size, mtime)
            for name, size, mtime in db.execute("SELECT name, size, mtime_ns FROM shards")
        }
        changed = [n for n, sm in known.items() if on_disk.get(n) != sm]
        if changed:
            # Closed shards never change by contract; contentless full-text rows cannot be
            # deleted one by one, so start again rather than keep stale rows.
            self.status.rebuilt = f"{changed[0]} changed or vanished since it was indexed"
            for table in ("shards", "records", "problems", "fts"):
                db.execute(f"DELETE FROM {table}")
            db.execute("DELETE FROM meta WHERE key = 'values'")
            db.commit()
            known = {}
            self.status.values = {}
        if not self.status.values:
            row = db.execute("SELECT value FROM meta WHERE key = 'values'").fetchone()
            self.status.values = orjson.loads(row[0]) if row else {}
        todo = sorted((n for n in on_disk if n not in known), key=shard_index)
        self.status.shards_seen = len(on_disk)
        self.status.shards_indexed = len(known)
        added = 0
        (self.status.records,) = db.execute("SELECT count(*) FROM records").fetchone()
        for name in todo:
            if self._stop.is_set():
                break
            n = self._index_shard(db, name, *on_disk[name])
            added += n
            self.status.records += n  # moves during a first pass: the pages say how far
            self.status.shards_indexed += 1
        (self.status.records,) = db.execute("SELECT count(*) FROM records").fetchone()
        return added

    def _index_shard(self, db: sqlite3.Connection, name: str, size: int, mtime: int) -> int:
        path = self.shards_dir / name
        data = path.read_bytes()
        rows: list[tuple[Any, ...]] = []
        texts: list[str] = []
        problems: list[tuple[str, int, str]] = []
        (next_rid,) = db.execute("SELECT coalesce(max(rid), 0) + 1 FROM records").fetchone()
        offset = 0
        for n, line in enumerate(data.split(b"\n"), 1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            try:
                d = orjson.loads(line)
                row, text = _row(d)
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, IndexError):
                problems.append((name, n, "not a record (invalid JSON or no id)"))
                continue
            rows.append((next_rid + len(rows), row[0], name, n, start, len(line), *row[1:]))
            texts.append(text)
        values = {k: set(v) for k, v in self.status.values.items()}
        for col, at in (("card", 14), ("generation", 15)):
            values.setdefault(col, set()).update(r[at] for r in rows if r[at] is not None)
        judged = {k for r in rows if r[20] for k in orjson.loads(r[20])}
        values.setdefault("judge", set()).update(judged)
        merged = {k: sorted(v) for k, v in values.items()}
        with db:
            db.executemany(f"INSERT INTO records VALUES ({','.join('?' * 22)})", rows)
            db.executemany(
                "INSERT INTO fts(rowid, text) VALUES (?, ?)",
                ((r[0], t) for r, t in zip(rows, texts, strict=True)),
            )
            db.executemany("INSERT INTO problems VALUES (?, ?, ?)", problems)
            db.execute(
                "INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?)",
                (name, size, mtime, len(rows), time.time()),
            )
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('values', ?)", (orjson.dumps(merged).decode(),)
            )
        self.status.values = merged  # replaced whole: the pages' thread never sees it half-made
        return len(rows)

    # -- reading -----------------------------------------------------------------------

    def count(self) -> int:
        (n,) = self.reader.execute("SELECT count(*) FROM records").fetchone()
        return int(n)

    def problems(self, limit: int = 20) -> list[tuple[str, int, str]]:
        """Lines the index could not read (torn or hand-edited shards)."""
        return list(
            self.reader.execute("SELECT shard, line, message FROM problems LIMIT ?", (limit,))
        )

    def query(
        self,
        filters: dict[str, str],
        *,
        text: str = "",
        judge: tuple[str, float] | None = None,
        after: int = 0,
        before: int = 0,
        limit: int = 50,
    ) -> list[sqlite3.Row]:
        """One page of matching rows (keyset paging on ``rid``: fast at any depth)."""
        source, key, where, args = self._where(filters, text, judge)
        if before:
            where.append(f"{key} < ?")
            args.append(before)
            order = "DESC"
        else:
            where.append(f"{key} > ?")
            args.append(after)
            order = "ASC"
        sql = (
            "SELECT rid, id, cue_kind, distractor_kind, domain, emotion, momentum, difficulty,"
            f" mode, split, card, generation, judge, preview FROM {source}"
            f" WHERE {' AND '.join(where)} ORDER BY {key} {order} LIMIT ?"
        )
        self.reader.row_factory = sqlite3.Row
        try:
            rows = list(self.reader.execute(sql, (*args, limit)))
        finally:
            self.reader.row_factory = None
        return rows[::-1] if before else rows

    def matches(
        self,
        filters: dict[str, str],
        *,
        text: str = "",
        judge: tuple[str, float] | None = None,
        cap: int,
    ) -> int:
        """How many rows match, counted up to ``cap`` (an exact count of 1M costs too much)."""
        source, _, where, args = self._where(filters, text, judge)
        sql = f"SELECT count(*) FROM (SELECT 1 FROM {source} WHERE {' AND '.join(where)} LIMIT ?)"
        (n,) = self.reader.execute(sql, (*args, cap)).fetchone()
        return int(n)

    def _where(
        self, filters: dict[str, str], text: str, judge: tuple[str, float] | None
    ) -> tuple[str, str, list[str], list[Any]]:
        """FROM clause, the rowid to order by, WHERE terms and their arguments.

        A search walks the full-text matches in rowid order and looks each row up by key,
        so a page stops after ``limit`` hits instead of collecting every match first.
        """
        source, key = "records", "rid"
        where: list[str] = ["1"]
        args: list[Any] = []
        for column in FILTERS:
            value = filters.get(column, "")
            if value == "":
                continue
            where.append(f"{column} = ?")
            numeric = column in _INT_FILTERS and value.lstrip("-").isdigit()
            args.append(int(value) if numeric else value)
        if judge is not None and re.fullmatch(r"judge_\w+", judge[0]):
            where.append("json_extract(judge, ?) >= ?")  # unjudged rows (NULL) never match
            args += [f"$.{judge[0]}", judge[1]]
        terms = fts_terms(text)
        if terms:
            source, key = "fts JOIN records ON records.rid = fts.rowid", "fts.rowid"
            where.append("fts MATCH ?")
            args.append(terms)
        return source, key, where, args

    def locate(self, record_id: str) -> tuple[str, int, int] | None:
        """(shard, offset, length) of a record id, or None."""
        row = self.reader.execute(
            "SELECT shard, offset, length FROM records WHERE id = ? ORDER BY rid LIMIT 1",
            (record_id,),
        ).fetchone()
        return (row[0], int(row[1]), int(row[2])) if row else None

    def read_line(self, record_id: str) -> bytes | None:
        """The raw JSON line of a record, read from its shard (opened read-only)."""
        where = self.locate(record_id)
        if where is None:
            return None
        shard, offset, length = where
        with open(self.shards_dir / shard, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def ids_where(self, column: str, value: str, limit: int = 100) -> list[str]:
        """Ids of records whose ``parent_id`` or ``pair_of`` is ``value`` (lineage links)."""
        if column not in ("parent_id", "pair_of"):
            raise ValueError(column)
        sql = f"SELECT id FROM records WHERE {column} = ? ORDER BY rid LIMIT ?"
        return [v for (v,) in self.reader.execute(sql, (value, limit))]


def fts_terms(text: str) -> str:
    """A user's search text as an FTS5 query: every word must occur (quoted: no syntax)."""
    words = re.findall(r"\w+", text)[:16]
    return " AND ".join('"' + w + '"' for w in words)


def _closed(folder: Path) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if _SHARD.match(entry.name):
            st = entry.stat()
            found[entry.name] = (st.st_size, st.st_mtime_ns)
    return found


def _row(d: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    """The indexed fields of one record (as parsed JSON) and its full-text text."""
    axes = d.get("axes") or {}
    prov = d.get("provenance") or {}
    quality = d.get("quality") or {}
    messages: Sequence[dict[str, Any]] = d["messages"]
    everything: Iterable[dict[str, Any]] = [*messages, d["target"], d["contrast"]]
    decision = messages[-1]["content"] if messages else ""
    row = (
        str(d["id"]),
        axes.get("cue_kind"),
        axes.get("distractor_kind"),
        axes.get("domain"),
        axes.get("emotion"),
        axes.get("momentum"),
        d.get("difficulty"),
        d.get("mode"),
        d.get("split"),
        prov.get("card"),
        d.get("generation"),
        d.get("parent_id") or "",
        d.get("group_id") or "",
        quality.get("pair_of") or "",
        d.get("minimal_pair") or "",
        orjson.dumps(scores).decode() if (scores := judge_scores(quality)) else None,
        str(decision)[:240],
    )
    return row, "\n".join(str(m["content"]) for m in everything)
