"""The viewer's pages as HTML strings: server-rendered, every piece of data escaped.

Pure functions from data to HTML (no I/O), so what a page shows is decided here and what
it reads is decided in ``viewer.py``. Model text is untrusted: everything that came from
a record, a manifest or a rejected answer goes through ``h`` (``html.escape`` with
quotes), and spans are cut from the message text by their offsets and escaped piece by
piece, so a record holding ``<script>`` shows those characters and runs nothing.
"""

from __future__ import annotations

import html
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from dreamgen.record import Record, Span
from dreamgen.rejects import RejectedAnswer

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#23272e;color:#eee;padding:8px 16px;display:flex;gap:18px;align-items:center}
header a{color:#9cd2ff;text-decoration:none}header b{color:#fff}
main{padding:12px 16px}table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f0f0f0}form.filters{display:flex;flex-wrap:wrap;gap:6px;margin-bottom:8px}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#555}
.banner{background:#fff3cd;border:1px solid #e0c36c;padding:6px 10px;margin:6px 0}
.msg{background:#fff;border:1px solid #ddd;border-radius:6px;margin:6px 0;padding:6px 10px}
.msg.user{border-left:4px solid #3b82f6}.msg.assistant{border-left:4px solid #a855f7}
.msg.system{border-left:4px solid #999}.role{font-size:12px;color:#666}
.content{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}
mark.cue{background:#bbf7d0;outline:1px solid #16a34a}
mark.distractor{background:#fecaca;outline:1px solid #dc2626}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.cell{text-align:center;min-width:70px}pre{white-space:pre-wrap;background:#fff;
border:1px solid #ddd;padding:6px;max-height:420px;overflow:auto}
.muted{color:#777}.pager a{margin-right:12px}#records{width:100%}
td.preview{max-width:480px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#records td{white-space:nowrap}
"""

JS = """
document.querySelectorAll('form.filters select').forEach(function (s) {
  s.addEventListener('change', function () { s.form.submit(); });
});
var st = document.getElementById('status');
if (st && st.dataset.building === '1') {
  var poll = setInterval(function () {
    fetch('/api/status').then(function (r) { return r.json(); }).then(function (j) {
      st.textContent = j.text;
      if (!j.building) { clearInterval(poll); }
    });
  }, 2000);
}
"""


def h(value: object) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def rec_url(record_id: str) -> str:
    return "/r/" + quote(record_id, safe="")


def page(title: str, body: str, *, refresh_s: int | None = None) -> str:
    """A whole page: header with the navigation, then ``body`` (already escaped HTML)."""
    meta = f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{h(title)} · dreamgen view</title>{meta}<style>{CSS}</style></head><body>"
        "<header><b>dreamgen view</b><a href='/'>records</a><a href='/coverage'>coverage</a>"
        f"<a href='/rejected'>rejections</a></header><main>{body}</main>"
        f"<script>{JS}</script></body></html>"
    )


def banners(messages: Iterable[str]) -> str:
    return "".join(f"<div class='banner'>{h(m)}</div>" for m in messages)


def _select(name: str, values: Sequence[Any], current: str) -> str:
    opts = ["<option value=''>any</option>"] + [
        f"<option value='{h(v)}'{' selected' if str(v) == current else ''}>{h(v)}</option>"
        for v in values
    ]
    return f"<label>{h(name)}<select name='{h(name)}'>{''.join(opts)}</select></label>"


def list_page(
    *,
    choices: Mapping[str, Sequence[Any]],
    judge_fields: Sequence[str],
    params: dict[str, str],
    rows: Sequence[sqlite3.Row],
    matches: int,
    cap: int,
    status: str,
    building: bool,
    notes: Sequence[str],
) -> str:
    """Records, filtered and searched, one page at a time."""
    selects = "".join(_select(k, v, params.get(k, "")) for k, v in choices.items())
    if judge_fields:  # only when a judge scored the records
        field = params.get("judge_field", "")
        options = "".join(
            f"<option{' selected' if f == field else ''}>{h(f)}</option>" for f in judge_fields
        )
        selects += (
            f"<label>judge score<select name='judge_field'>{options}</select></label>"
            f"<label>≥<input name='judge_min' size='4' value='{h(params.get('judge_min', ''))}'>"
            "</label>"
        )
    form = (
        "<form class='filters' method='get' action='/'>"
        f"{selects}"
        f"<label>search<input name='q' size='24' value='{h(params.get('q', ''))}'></label>"
        "<label>&nbsp;<button type='submit'>filter</button></label></form>"
    )
    more = "+" if matches >= cap else ""
    head = (
        f"<p id='status' data-building='{int(building)}' class='muted'>{h(status)}</p>"
        f"<p><b id='matches'>{matches}{more}</b> matching records</p>"
    )
    cols = ("id", "cue_kind", "distractor_kind", "domain", "emotion", "momentum", "difficulty")
    cols2 = ("mode", "split", "card", "generation")
    header = "".join(f"<th>{c}</th>" for c in (*cols, *cols2, "judge", "decision turn"))
    body = []
    for r in rows:
        cells = [f"<td><a class='rec' href='{h(rec_url(r['id']))}'>{h(r['id'][:12])}</a></td>"]
        cells += [f"<td>{h(r[c])}</td>" for c in (*cols[1:], *cols2)]
        judged = orjson.loads(r["judge"]) if r["judge"] else {}
        scores = ", ".join(f"{k.removeprefix('judge_')} {v:g}" for k, v in judged.items())
        cells.append(f"<td class='judge'>{h(scores)}</td>")
        cells.append(f"<td class='preview' title='{h(r['preview'])}'>{h(r['preview'])}</td>")
        body.append(f"<tr data-rid='{int(r['rid'])}'>{''.join(cells)}</tr>")
    keep = {k: v for k, v in params.items() if v and k not in ("after", "before")}
    pager = []
    if rows and (params.get("after") or params.get("before")):
        pager.append(f"<a href='/?{h(urlencode({**keep, 'before': rows[0]['rid']}))}'>← prev</a>")
    if len(rows) and len(rows) >= int(params.get("limit") or 50):
        pager.append(
            f"<a id='next' href='/?{h(urlencode({**keep, 'after': rows[-1]['rid']}))}'>next →</a>"
        )
    table = f"<table id='records'><tr>{header}</tr>{''.join(body)}</table>"
    pages = f"<p class='pager'>{''.join(pager)}</p>"
    return page("records", banners(notes) + form + head + table + pages)


def highlight(content: str, spans: Sequence[tuple[Span, str]]) -> str:
    """``content`` escaped, with each span wrapped in ``<mark>`` at its exact offsets.

    A span overlapping one already drawn is left plain (it is still in the span table):
    nested marks would make "the element's text is the span" untrue.
    """
    out: list[str] = []
    pos = 0
    for span, cls in sorted(spans, key=lambda s: (s[0].start, s[0].end)):
        if span.start < pos or span.end > len(content):
            continue
        out.append(h(content[pos : span.start]))
        out.append(
            f"<mark class='{cls}' data-kind='{h(span.kind)}' data-message='{span.message}' "
            f"data-start='{span.start}' data-end='{span.end}' title='{cls}: {h(span.kind)}'>"
            f"{h(content[span.start : span.end])}</mark>"
        )
        pos = span.end
    out.append(h(content[pos:]))
    return "".join(out)


def _message(record: Record, index: int, role: str, label: str) -> str:
    spans = [(s, "cue") for s in record.cues if s.message == index]
    spans += [(s, "distractor") for s in record.distractors if s.message == index]
    text = highlight(record.content_of(index), spans)
    return (
        f"<div class='msg {h(role)}' data-message='{index}'><div class='role'>{h(label)}</div>"
        f"<div class='content'>{text}</div></div>"
    )


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{h(k)}</th><td>{h(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _links(ids: Sequence[str], known: set[str]) -> str:
    if not ids:
        return "<span class='muted'>none</span>"
    return ", ".join(
        f"<a class='lineage' href='{h(rec_url(i))}'>{h(i[:12])}</a>"
        if i in known
        else f"{h(i[:12])} <span class='muted'>(not in this folder)</span>"
        for i in ids
    )


def record_page(
    record: Record, *, known: set[str], children: Sequence[str], pairs: Sequence[str]
) -> str:
    """One record: the conversation with spans in place, both responses, lineage, metadata.

    ``known``: which of its parent / pair-of ids the folder holds (those become links).
    """
    last = len(record.messages) - 1
    convo = "".join(
        _message(record, i, m.role, f"{m.role} · message {i}" + (" · decision turn" * (i == last)))
        for i, m in enumerate(record.messages)
    )
    both = (
        "<div class='pair'><div><h3>listening (target)</h3>"
        f"{_message(record, record.target_index, 'assistant', 'target')}</div>"
        "<div><h3>reflex (contrast)</h3>"
        f"{_message(record, record.contrast_index, 'assistant', 'contrast')}</div></div>"
    )
    spans = "".join(
        f"<tr><td>{cls}</td><td>{h(s.kind)}</td><td>{s.message}</td><td>{s.start}–{s.end}</td>"
        f"<td>{h(s.text)}</td></tr>"
        for cls, group in (("cue", record.cues), ("distractor", record.distractors))
        for s in group
    )
    parent, pair_of = record.parent_id, record.quality.pair_of
    rows = [
        ("parent", _links([parent] if parent else [], known)),
        ("children", _links(children, set(children))),
        ("minimal pairs", _links(pairs, set(pairs))),
    ]
    if pair_of:
        rows.append(("pair of", _links([pair_of], known)))
    lineage = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    lineage += "</table>"
    axes = record.axes.model_dump()
    about = _kv(
        [
            ("id", record.id),
            *axes.items(),
            ("difficulty", record.difficulty),
            ("mode", record.mode),
            ("minimal_pair", record.minimal_pair or "—"),
            ("split", record.split),
            ("group_id", record.group_id),
            ("generation", record.generation),
        ]
    )
    prov = record.provenance.model_dump()
    sampling = prov.pop("sampling")
    body = (
        f"<h2>record <code>{h(record.id)}</code></h2>"
        f"<div class='pair'><div>{about}</div><div><h3>lineage</h3>{lineage}</div></div>"
        f"<h3>conversation</h3>{convo}{both}"
        "<h3>spans</h3><table id='spans'><tr><th>what</th><th>kind</th><th>message</th>"
        f"<th>offsets</th><th>text</th></tr>{spans}</table>"
        f"<div class='pair'><div><h3>provenance</h3>{_kv(prov.items())}"
        f"<h4>sampling</h4>{_kv(sampling.items())}</div>"
        f"<div><h3>quality</h3>{_kv(_quality(record))}</div></div>"
    )
    return page(f"record {record.id[:12]}", body)


def invalid_record_page(record_id: str, line: bytes, error: str) -> str:
    """A line the index found but that is not a valid Record: the error and the raw text."""
    body = (
        f"<h2>record <code>{h(record_id)}</code></h2>"
        f"<div class='banner'>this line is not a valid record: {h(error)}</div>"
        f"<pre>{h(line.decode('utf-8', errors='replace'))}</pre>"
    )
    return page("invalid record", body)


def rejected_page(counts: dict[str, int], reason: str, entries: Sequence[RejectedAnswer]) -> str:
    """The kept sample of rejected answers per reason; raw answers shown as text."""
    links = (
        "".join(
            f"<li><a href='/rejected?{h(urlencode({'reason': r}))}'>{h(r)}</a> ({n} kept)</li>"
            for r, n in counts.items()
        )
        or "<li class='muted'>no rejected answers kept (rejected/ is empty or missing)</li>"
    )
    items = []
    for e in reversed(entries):  # newest first
        clipped = f" (clipped from {e.raw_chars} chars)" if e.raw_chars > len(e.raw) else ""
        request = "".join(
            f"<div class='role'>{h(m.get('role'))}</div><pre>{h(m.get('content'))}</pre>"
            for m in e.request_messages
        )
        items.append(
            f"<div class='msg rejected'><div class='role'>{h(e.reason)} · card {h(e.card)} · "
            f"{h(e.mode)} · finish {h(e.finish_reason)}{h(clipped)}</div>"
            f"<div>{h(e.message)}</div><pre class='raw'>{h(e.raw)}</pre>"
            f"<details><summary>request</summary>{request}</details></div>"
        )
    title = f"<h2>rejected: {h(reason)}</h2>" if reason else "<h2>rejections</h2>"
    return page("rejections", f"{title}<ul>{links}</ul>{''.join(items)}")


def coverage_page(coverage: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    """Filled vs quota per (cue kind × distractor kind), one heatmap per difficulty."""
    cells = [c for c in coverage if c.get("difficulty") != "*"]
    extra = [c for c in coverage if c.get("difficulty") == "*"]
    cues = sorted({str(c["cue_kind"]) for c in cells})
    kinds = sorted({str(c["distractor_kind"]) for c in cells})
    by = {(str(c["cue_kind"]), str(c["distractor_kind"]), c["difficulty"]): c for c in cells}
    tables = []
    for d in sorted({c["difficulty"] for c in cells}, key=str):
        rows = []
        for cue in cues:
            tds = []
            for kind in kinds:
                c = by.get((cue, kind, d))
                if c is None:
                    tds.append("<td class='cell muted'>—</td>")
                    continue
                filled, quota = int(c.get("filled") or 0), c.get("quota")
                share = min(1.0, filled / quota) if quota else (1.0 if filled else 0.0)
                colour = f"hsl({int(120 * share)},70%,{92 - int(30 * share)}%)"
                label = f"{filled}/{quota}" if quota is not None else str(filled)
                tds.append(f"<td class='cell' style='background:{colour}'>{h(label)}</td>")
            rows.append(f"<tr><th>{h(cue)}</th>{''.join(tds)}</tr>")
        head = "".join(f"<th>{h(k)}</th>" for k in kinds)
        tables.append(
            f"<h3>difficulty {h(d)}</h3><table class='heat'><tr><th></th>{head}</tr>"
            f"{''.join(rows)}</table>"
        )
    more = "".join(
        f"<p>{h(c['cue_kind'])}: {h(c.get('filled'))} / {h(c.get('quota'))}</p>" for c in extra
    )
    body = banners(notes) + "<h2>coverage (filled / quota)</h2>" + "".join(tables) + more
    return page("coverage", body, refresh_s=10)


def _quality(record: Record) -> list[tuple[str, Any]]:
    """The record's quality fields; a record nobody judged shows no judge scores (its
    ``judge_*`` fields hold defaults, not a judge's zeros)."""
    fields = record.quality.model_dump()
    if not fields.get("judged"):
        fields = {k: v for k, v in fields.items() if not k.startswith("judge_")}
    return list(fields.items())
