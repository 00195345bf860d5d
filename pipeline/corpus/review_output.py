"""What `tagpipe review` writes: the queue file (JSONL or CSV) and its page (HTML), and
reading a queue file back with a reviewer's decisions (for `tagpipe export --supplement`).

A queue row: rank, uri, kind, score (the ranking's own number: expected wrong or missing
tags, |score - threshold|, or OOD distance), tags and tag_scores (the evidence, parallel),
thresholds (uncertain), reason (the same in words), label_quality and source_tags
(likely-*), and `decision`, empty, for the reviewer: `accept` (the row's tags belong on
the image), `reject` (they do not), or per tag a JSON object {"tag": "accept"|"reject"}.
In CSV the list fields are JSON lists and a per-tag decision is the JSON object's text.

The page is self-contained like the report (pipeline/corpus/report.py): inline style,
thumbnails as data: URIs, no script.
"""

from __future__ import annotations

import csv
import html
import io
import json
import posixpath

from pipeline.core.errors import TagpipeError
from pipeline.core.words import counted
from pipeline.corpus.report import STYLE, thumbnail
from pipeline.storage.filesystem import filesystem_for, read_bytes, write_atomic
from pipeline.storage.outputs import mark_file

QUEUE_FIELDS = (
    "rank",
    "uri",
    "kind",
    "score",
    "tags",
    "tag_scores",
    "thresholds",
    "reason",
    "label_quality",
    "source_tags",
    "decision",
)
LIST_FIELDS = ("tags", "tag_scores", "thresholds", "source_tags")
DECISIONS = ("accept", "reject")


def page_path(queue: str) -> str:
    """The page beside a queue file: its name with .html for its extension."""
    stem, extension = posixpath.splitext(queue)
    if extension.lower() == ".html":
        raise TagpipeError(f"--out {queue}: the queue file is JSONL or CSV; the page is written beside it")
    return stem + ".html"


def check_free(paths: list[str], storage_options: dict | None) -> None:
    """Refuse, writing nothing, when an output is already there (as export does)."""
    for path in paths:
        fs, local = filesystem_for(path, storage_options)
        if fs.exists(local):
            raise TagpipeError(f"{path} exists; nothing was written: pass --overwrite to replace it")


def _options(path: str, storage_options: dict | None) -> dict | None:
    return storage_options if "://" in path else None


def write_queue(records: list[dict], path: str, fmt: str, storage_options: dict | None) -> None:
    rows = [{name: record.get(name) for name in QUEUE_FIELDS} for record in records]
    if fmt == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        out = io.StringIO()
        writer = csv.DictWriter(out, QUEUE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: json.dumps(v, ensure_ascii=False) if k in LIST_FIELDS and v is not None else v
                    for k, v in row.items()
                }
            )
        text = out.getvalue()
    mark_file(path, "review queue", storage_options)
    write_atomic(path, text.encode(), storage_options=_options(path, storage_options))


def read_queue(path: str, storage_options: dict | None = None) -> list[dict]:
    """A queue file's rows (JSONL, or CSV when it ends .csv), list fields as lists."""
    try:
        text = read_bytes(path, _options(path, storage_options)).decode("utf-8")
    except FileNotFoundError:
        raise TagpipeError(f"{path}: no such decisions file") from None
    if path.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        for line, row in enumerate(rows, start=2):
            for name in LIST_FIELDS:
                if row.get(name):
                    try:
                        row[name] = json.loads(row[name])
                    except json.JSONDecodeError:
                        raise TagpipeError(f"{path}:{line}: {name} is not a JSON list") from None
        return [dict(row, _line=line) for line, row in enumerate(rows, start=2)]
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                rows.append(dict(json.loads(raw), _line=line))
            except json.JSONDecodeError:
                raise TagpipeError(
                    f"{path}:{line}: not a JSON object (a queue file is JSONL or .csv)"
                ) from None
    return rows


def row_decisions(row: dict, path: str) -> dict[str, bool]:
    """One queue row's decision as tag -> belongs on the image (True) or not (False)."""
    where = f"{path}:{row.get('_line')}"
    value = row.get("decision")
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TagpipeError(f"{where}: decision {value!r} is not a JSON object") from None
    tags = [t for t in (row.get("tags") or []) if isinstance(t, str)]
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        word = value.strip().lower()
        if word not in DECISIONS:
            raise TagpipeError(f"{where}: decision {value!r}: write accept, reject, or leave it empty")
        return {t: word == "accept" for t in tags}
    if not isinstance(value, dict):
        raise TagpipeError(f"{where}: decision {value!r}: write accept, reject, or a JSON object per tag")
    decided = {}
    for tag, word in value.items():
        if tag not in tags:
            raise TagpipeError(f"{where}: decision names {tag!r}, which is not one of the row's tags {tags}")
        if str(word).strip().lower() not in DECISIONS:
            raise TagpipeError(f"{where}: decision for {tag!r} is {word!r}: write accept or reject")
        decided[tag] = str(word).strip().lower() == "accept"
    return decided


# ---- the page -----------------------------------------------------------------------------
EXPLAIN = {
    "likely-wrong": "Human tags the model is confident are absent. Ranked by the expected number of wrong "
    "tags, the sum of (1 - p) over the flagged tags, then the strongest single one.",
    "likely-missing": "Tags the model is confident are present that the humans did not give. Ranked by the "
    "expected number of missing tags, the sum of p, then the strongest single one.",
    "uncertain": "Tags whose score lies near their threshold, as the run decided them. Ranked by the "
    "smallest distance between score and threshold, then by how many tags are that close.",
    "ood": "Images flagged out of distribution. Ranked by Mahalanobis distance, highest first.",
}
PAGE_STYLE = (
    STYLE
    + """
.queue{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:12px}
.item{display:flex;gap:10px;border:1px solid #e3e6ea;border-radius:6px;padding:8px}
.item .text{font-size:12px;min-width:0;flex:1}.item .rank{font-weight:600;font-size:14px}
.item .uri{word-break:break-all;color:#6b7480}.item p{margin:4px 0}
.item table{width:100%;table-layout:fixed}
.item td,.item th{padding:1px 4px;font-size:12px;word-break:break-all}
.item th{color:#6b7480;font-weight:normal}
"""
)


def _item(record: dict, storage_options: dict | None) -> tuple[str, bool]:
    """One queued image: thumbnail, rank, name, and its evidence (a table of the tags when
    it has tags, else the reason in words)."""
    src = thumbnail(record["uri"], storage_options)
    image = f"<img src='{src}' alt=''>" if src else "<div class='noimg'>no preview</div>"
    tags, scores = record.get("tags") or [], record.get("tag_scores") or []
    thresholds = record.get("thresholds") or []
    reason = record.get("reason") or ""
    evidence = f"<p>{html.escape(reason)}</p>"
    if scores:
        named = "<th>score</th><th>threshold</th>" if thresholds else "<th>model p</th>"
        head = f"<tr><th>tag</th>{named}</tr>"
        rows = "".join(
            f"<tr><td>{html.escape(t)}</td><td>{s:.3f}</td>"
            + (f"<td>{thresholds[i]:.3f}</td>" if i < len(thresholds) else "")
            + "</tr>"
            for i, (t, s) in enumerate(zip(tags, scores))
        )
        evidence = f"<p>{html.escape(reason.split(':')[0])}:</p><table>{head}{rows}</table>"
    uri = html.escape(record["uri"])
    body = (
        f"<figure>{image}</figure><div class='text'><div class='rank'>#{record['rank']}"
        f" <span class='muted'>{record.get('score')}</span></div>"
        f"<div class='uri' title='{uri}'>{html.escape(posixpath.basename(record['uri']))}</div>"
        f"{evidence}</div>"
    )
    return f"<div class='item'>{body}</div>", src is not None


def review_page(
    records: list[dict], kind: str, tag: str | None, sources: tuple[str, str], storage_options: dict | None
) -> int:
    """Write the page to sources[1] (beside the queue file); sources: (the tag table, the
    queue file). Returns how many thumbnails it holds."""
    (tags_uri, out), path = sources, page_path(sources[1])
    title = f"tagpipe review: {kind}" + (f", tag {tag}" if tag else "")
    items = [_item(r, storage_options) for r in records]
    queue = "".join(text for text, _ in items) or "<p>No images in this queue.</p>"
    intro = (
        f"<p>{html.escape(EXPLAIN[kind])}</p><p>{counted(len(records), 'images')} from "
        f"{html.escape(tags_uri)}; "
        f"queue file {html.escape(out)}: fill its <code>decision</code> field with accept (the "
        "row's tags belong on the image) or reject, and pass it to <code>tagpipe export --supplement "
        "--decisions</code>.</p>"
    )
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>made by tagpipe review</p></header>"
        f"<section id='about'><h2>What this queue holds</h2>{intro}</section>"
        f"<section id='queue'><h2>Queue</h2><div class='queue'>{queue}</div></section>"
        "</body></html>\n"
    )
    mark_file(path, "review page", storage_options)
    write_atomic(path, page.encode(), storage_options=_options(path, storage_options))
    return sum(shown for _, shown in items)
