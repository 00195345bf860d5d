"""`tagpipe report`: one self-contained HTML file about a run's output.

Sections: run summary (images, errors by kind, throughput, model fingerprint), drift
from an earlier version (pipeline/corpus/drift.py: the tags, OOD and error rates that
moved beyond sampling noise), tag frequency per category, score distribution and the
tags the model is least sure of, OOD distance with the most out-of-distribution images
as thumbnails, the largest duplicate clusters as thumbnail strips, split sizes and
per-tag balance, and the error list. Charts are inline SVG and thumbnails inline JPEG
(data: URIs): the file needs no network and no script.

Memory is bounded for any table size: the tag table is read one part at a time, a few
columns at a time, into running counts (tag counts, fixed-bin histograms, a sketch and a
top-k of OOD distances, the first errors: pipeline/corpus/report_figures.py). Each part's
figures are kept beside the table, so the next report reads only the parts added since
(pipeline/corpus/report_scan.py). Only the thumbnails' images are read, a bounded number
of them. What is cut (the error list, the tags shown) says so in the page.

Why this module is long: one self-contained HTML page: the passes that gather its
figures (running counts over parts, a few columns at a time) and the inline SVG and
thumbnails that show them are written against each other; apart, each half would be
unreadable without the other.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
import pyarrow.compute as pc
from pydantic import Field

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel, StorageOptions
from pipeline.core.words import counted
from pipeline.corpus.drift import (
    DriftScan,
    DriftSettings,
    DriftSummary,
    RateChange,
    nothing_to_compare,
    previous_version,
    why_nothing_to_compare,
)
from pipeline.corpus.report_figures import BORDERLINE, ERROR_CHARS, SCORE_BINS, Figures, cut
from pipeline.corpus.report_scan import PartSummaries, ScanCounts, scan
from pipeline.storage.filesystem import filesystem_for, read_bytes, write_atomic
from pipeline.storage.outputs import mark_file
from pipeline.storage.writable import FILE, check_writable
from pipeline.table.input_kinds import expect
from pipeline.table.tag_table import CURRENT as _CURRENT

log = logging.getLogger(__name__)

TOP_TAGS = 25  # bars per category chart
TOP_CLUSTERS = 6  # duplicate clusters shown
CLUSTER_STRIP = 8  # thumbnails per cluster
THUMB_PX = 112
THUMB_MAX_BYTES = 64 * 1024**2
MIN_TAG_COUNT = 20  # tags rarer than this are not ranked by uncertainty


# ---- thumbnails ------------------------------------------------------------------
def thumbnail(uri: str, storage_options: dict | None) -> str | None:
    """A small JPEG of an image as a data: URI, or None when it cannot be read."""
    from PIL import Image, ImageOps

    try:
        data = read_bytes(uri, storage_options, max_bytes=THUMB_MAX_BYTES)
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
            upright = ImageOps.exif_transpose(image).convert("RGB")
            upright.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            upright.save(out, "JPEG", quality=70)
        return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
    except Exception as exc:  # a thumbnail is decoration: its absence is shown, not fatal
        log.debug("no thumbnail for %s: %s", uri, exc)
        return None


# ---- SVG charts ------------------------------------------------------------------
def bar_chart(labels: list[str], values: list[float], *, width: int = 640, unit: str = "") -> str:
    if not labels:
        return "<p class='muted'>nothing to show</p>"
    row, label_w = 18, 210
    height = row * len(labels) + 6
    top = max(values) or 1
    bars = []
    for i, (label, value) in enumerate(zip(labels, values)):
        y = i * row + 3
        w = max(1.0, (width - label_w - 70) * value / top)
        bars.append(
            f"<text x='{label_w - 6}' y='{y + 12}' text-anchor='end'>{html.escape(cut(label, 32))}</text>"
            f"<rect x='{label_w}' y='{y}' width='{w:.1f}' height='{row - 4}' rx='2'/>"
            f"<text x='{label_w + w + 4:.1f}' y='{y + 12}' class='v'>{_number(value)}{unit}</text>"
        )
    return (
        f"<svg class='bars' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img'>"
        f"{''.join(bars)}</svg>"
    )


def histogram(
    counts: np.ndarray,
    edges: np.ndarray,
    *,
    width: int = 640,
    height: int = 160,
    marker: float | None = None,
    label: str = "",
) -> str:
    counts = np.asarray(counts)
    if counts.sum() == 0:
        return "<p class='muted'>nothing to show</p>"
    top = counts.max()
    left, bottom = 40, 22
    plot_w, plot_h = width - left - 10, height - bottom - 8
    step = plot_w / len(counts)
    rects = "".join(
        f"<rect x='{left + i * step:.1f}' y='{8 + plot_h * (1 - c / top):.1f}' "
        f"width='{max(step - 1, 0.5):.1f}' height='{plot_h * c / top:.1f}'/>"
        for i, c in enumerate(counts)
        if c
    )
    axis = (
        f"<line x1='{left}' y1='{8 + plot_h}' x2='{left + plot_w}' y2='{8 + plot_h}' class='axis'/>"
        f"<text x='{left}' y='{height - 6}'>{_number(edges[0])}</text>"
        f"<text x='{left + plot_w}' y='{height - 6}' text-anchor='end'>{_number(edges[-1])}</text>"
        f"<text x='{left + plot_w / 2}' y='{height - 6}' text-anchor='middle' class='muted'>"
        f"{html.escape(label)}</text>"
        f"<text x='{left - 4}' y='16' text-anchor='end'>{_number(top)}</text>"
    )
    mark = ""
    if marker is not None and edges[0] <= marker <= edges[-1]:
        x = left + plot_w * (marker - edges[0]) / (edges[-1] - edges[0])
        mark = f"<line x1='{x:.1f}' y1='8' x2='{x:.1f}' y2='{8 + plot_h}' class='mark'/>"
    return (
        f"<svg class='hist' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img'>"
        f"{rects}{axis}{mark}</svg>"
    )


def _number(value: float) -> str:
    if isinstance(value, (int, np.integer)) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3g}"


def _table(header: list[str], rows: list[list], classes: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table class='{classes}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(uri: str, caption: str, storage_options) -> str:
    src = thumbnail(uri, storage_options)
    image = f"<img src='{src}' alt='' loading='lazy'>" if src else "<div class='noimg'>no preview</div>"
    return (
        f"<figure title='{html.escape(uri)}'>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


# ---- the page --------------------------------------------------------------------
@dataclass
class ReportSummary:
    output: str
    rows: int
    errors: int
    bytes: int
    thumbnails: int
    seconds: float
    drift: DriftSummary | None = None
    scan: ScanCounts | None = None  # a tag table's: parts read, part summaries reused and written

    def text(self) -> str:
        line = (
            f"report: {self.output} ({self.bytes / 1024:.0f} KiB, {counted(self.rows, 'rows')}, "
            f"{counted(self.errors, 'errors')}, "
            f"{counted(self.thumbnails, 'thumbnails')}, {self.seconds:.1f} s)"
        )
        if self.scan is not None:
            line += f"\n{self.scan.text()}"
        return line + ("\n" + self.drift.text() if self.drift else "")


def _read_json(uri: str, storage_options) -> dict | None:
    try:
        return json.loads(read_bytes(uri, storage_options))
    except Exception:
        return None


def build_report(
    tags: str,
    output: str,
    dedup: str | None = None,
    split: str | None = None,
    storage_options: dict | None = None,
    title: str | None = None,
    compare_version: int | None = None,
    drift_settings: DriftSettings | None = None,
    version: int | None = None,
    drift_note: str | None = None,
    keep_summaries: bool = True,
) -> ReportSummary:
    """The page for a tag table's version (default: current), with its drift from
    compare_version (default: the version before); drift_note: why not to compare
    (nightly: the run committed no version). A Parquet file or folder: no drift.
    keep_summaries: a tag table's parts' figures are taken from the summaries earlier
    reports kept, and kept for the parts read (pipeline/corpus/report_scan.py); False
    reads every part and keeps nothing."""
    started = time.monotonic()
    from pipeline.table.tag_table import RUNS_DIR, TagTable, is_tag_table

    expect(tags, "table", "--tags", storage_options)  # before any work: one line, nothing written
    if dedup:
        expect(dedup, "dedup", "--dedup", storage_options)
    if split:
        expect(split, "split", "--split", storage_options)
    check_writable(output, "--output", FILE)

    table, snapshot, run = None, None, None
    if is_tag_table(tags, storage_options):
        table = TagTable(tags, storage_options)
        snapshot = table.snapshot(version)
        run = _read_json(table.full_uri(posixpath.join(RUNS_DIR, f"{snapshot.run_id}.json")), storage_options)
    elif compare_version is not None or version is not None:
        raise TagpipeError(f"{tags}: not a tag table (no {_CURRENT}), so it has no versions to compare")
    drift_scan, drift = _drift_plan(tags, table, snapshot, compare_version, drift_note)
    threshold, assumed = _threshold(snapshot, run)
    summaries = PartSummaries(table, threshold) if table is not None and keep_summaries else None
    acc, counts = scan(tags, storage_options, threshold, table, snapshot, summaries, drift_scan)
    if drift_scan is not None:
        drift = drift_scan.finish(drift_settings or DriftSettings())
    thumbs = [0]

    def figure(uri, caption):
        thumbs[0] += 1
        return _figure(uri, caption, storage_options)

    sections = [
        _summary_section(tags, acc, snapshot, run),
        _drift_section(drift),
        _tags_section(acc),
        _scores_section(acc, threshold, assumed),
        _ood_section(acc, figure),
    ]
    if dedup:
        sections.append(_dedup_section(dedup, storage_options, figure))
    if split:
        sections.append(_split_section(split, storage_options, acc))
    sections.append(_errors_section(acc))
    page = _page(title or f"tagpipe report: {tags}", sections)
    mark_file(output, "report", storage_options)
    write_atomic(output, page.encode(), storage_options=storage_options if "://" in output else None)
    return ReportSummary(
        output=output,
        rows=acc.rows,
        errors=sum(acc.errors.values()),
        bytes=len(page.encode()),
        thumbnails=thumbs[0],
        seconds=round(time.monotonic() - started, 2),
        drift=drift,
        scan=counts if table is not None else None,
    )


def _drift_plan(tags: str, table, snapshot, compare_version: int | None, note: str | None):
    """(a DriftScan to feed while the page's pass reads the parts, or None with the
    summary that says why there is nothing to compare)."""
    if table is None:
        return None, nothing_to_compare(tags, "not a versioned tag table")
    if note:
        return None, nothing_to_compare(tags, note, snapshot.version)
    before = compare_version if compare_version is not None else previous_version(table, snapshot.version)
    if before is None:
        return None, nothing_to_compare(tags, why_nothing_to_compare(snapshot.version), snapshot.version)
    if before == snapshot.version:
        raise TagpipeError(f"{tags}: --compare-version {before} is the version reported: give another one")
    return DriftScan(table, table.snapshot(before), snapshot), None


def _threshold(snapshot, run) -> tuple[float, bool]:
    """(the run's global threshold, whether it had to be assumed): the committed rules',
    else the run's profile's default, else 0.5."""
    if snapshot is not None and snapshot.rules.default_threshold is not None:
        return float(snapshot.rules.default_threshold), False
    if run and run.get("profile"):
        from pipeline.model.profiles import load_profile

        try:
            return float(load_profile(run["profile"]).thresholds.default), False
        except Exception:
            pass
    return 0.5, True


def _section(key: str, title: str, body: str) -> str:
    return f"<section id='{key}'><h2>{html.escape(title)}</h2>{body}</section>"


def _summary_section(tags: str, acc: Figures, snapshot, run) -> str:
    errors = sum(acc.errors.values())
    cards = [
        ("images", f"{acc.rows:,}"),
        ("errors", f"{errors:,} ({errors / acc.rows:.2%})" if acc.rows else "0"),
        ("tags emitted", f"{sum(acc.tag_counts.values()):,}"),
    ]
    facts = [["tag table", tags]]
    if snapshot:
        facts += [
            ["version", snapshot.version],
            ["committed", snapshot.committed_at],
            ["model", snapshot.model_name or "-"],
            ["model sha256", snapshot.model_sha256],
        ]
    if run:
        summary = run.get("summary", {})
        fingerprint = run.get("fingerprint", {})
        cards.append(("throughput", f"{summary.get('images_per_second', 0):,} img/s"))
        facts += [
            ["calibration sha256", fingerprint.get("calibration_sha256", "-")],
            [
                "last run",
                f"{run.get('run_id')} ({summary.get('change', '-')}): "
                f"{counted(summary.get('images', 0), 'images', ',')} "
                f"tagged in {summary.get('seconds', 0):,} s",
            ],
            ["placement", summary.get("placement", "-")],
            ["busy", _busy_text(summary.get("busy"))],
        ]
    card_html = "".join(
        f"<div class='card'><div class='big'>{html.escape(v)}</div><div>{html.escape(k)}</div></div>"
        for k, v in cards
    )
    kinds = (
        _table(["error kind", "rows"], [[k, f"{n:,}"] for k, n in acc.errors.most_common()])
        if acc.errors
        else "<p>No errors.</p>"
    )
    return _section(
        "summary",
        "Run summary",
        f"<div class='cards'>{card_html}</div>{_table(['', ''], facts, 'facts')}"
        f"<h3>Errors by kind</h3>{kinds}",
    )


def _busy_text(busy: dict | None) -> str:
    """The run's busy fractions (pipeline/job/busy.py), as the summary line words them."""
    if not busy:
        return "-"
    tagger, decode = busy.get("tagger", 0.0), busy.get("decode", 0.0)
    verdict = busy.get("verdict", "-")
    gpus = "".join(f", GPU {gpu} {rate:.0%}" for gpu, rate in sorted(busy.get("gpus", {}).items()))
    actors = len(busy.get("tagger_actors", {}))
    return f"tagger busy {tagger:.0%}: {verdict} ({actors} actor(s)); decode busy {decode:.0%}{gpus}"


def change_chart(labels: list[str], changes: list[float], *, width: int = 640) -> str:
    """Horizontal bars either side of a zero line: rises right, falls left (red)."""
    row, label_w = 18, 210
    height = row * len(labels) + 6
    half = (width - label_w - 20) / 2
    zero = label_w + half
    top = max(abs(c) for c in changes) or 1
    bars = []
    for i, (label, change) in enumerate(zip(labels, changes)):
        y = i * row + 3
        w = max(1.0, (half - 60) * abs(change) / top)
        x, anchor, end = (zero, "start", zero + w + 4) if change >= 0 else (zero - w, "end", zero - w - 4)
        fall = "" if change >= 0 else " class='down'"
        bars.append(
            f"<text x='{label_w - 6}' y='{y + 12}' text-anchor='end'>{html.escape(cut(label, 32))}</text>"
            f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{row - 4}' rx='2'"
            f"{fall}/>"
            f"<text x='{end:.1f}' y='{y + 12}' text-anchor='{anchor}' class='v'>{change * 100:+.2f}</text>"
        )
    axis = f"<line x1='{zero:.1f}' y1='0' x2='{zero:.1f}' y2='{height}' class='axis'/>"
    return (
        f"<svg class='bars' width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img'>"
        f"{axis}{''.join(bars)}</svg>"
    )


def _rate_row(change: RateChange) -> list:
    return [
        change.name,
        f"{change.before:.2%} ({change.count_before:,} of {change.of_before:,})",
        f"{change.after:.2%} ({change.count_after:,} of {change.of_after:,})",
        f"{change.change * 100:+.2f}",
        f"{change.adjusted_p:.2g}",
        "moved" if change.moved else "within noise",
    ]


RATE_HEADER = ["", "before", "after", "change (points)", "adjusted p", ""]


def _drift_section(drift: DriftSummary | None) -> str:
    if drift is None:
        return ""
    if not drift.compared:
        return _section("drift", "Drift", f"<p>Nothing to compare with: {html.escape(drift.note)}.</p>")
    rule = drift.settings
    intro = (
        f"<p>Version {drift.after_version} ({counted(drift.rows_after, 'rows', ',')}, "
        f"{drift.decoded_after:,} decoded) "
        f"against version {drift.before_version} ({counted(drift.rows_before, 'rows', ',')}, "
        f"{drift.decoded_before:,} "
        "decoded). A rate moved when its change is beyond sampling noise (two-proportion z-test, "
        f"Benjamini-Hochberg adjusted p &le; {rule.significance:g} over the tags, and over the "
        f"error rates) and at least {rule.min_rate_change * 100:g} percentage points. Tag rates are "
        "shares of decoded rows; the OOD rate of rows with an OOD flag; error rates of all rows. "
        f"{counted(drift.parts_read, 'parts', ',')} counted, {drift.parts_shared:,} of them named "
        f"by both versions.</p>"
    )
    verdict = (
        "<p class='alert'><b>Drift</b> past the limits: " + html.escape("; ".join(drift.reasons)) + ".</p>"
        if drift.drift
        else "<p class='ok'>No drift past the limits.</p>"
    )
    if drift.movers:
        note = f" (the {len(drift.movers)} largest)" if drift.tag_movers > len(drift.movers) else ""
        movers = (
            f"<h3>Tags that moved: {drift.tag_movers:,} of {drift.tags_compared:,}{note}</h3>"
            + change_chart([m.name for m in drift.movers], [m.change for m in drift.movers])
            + _table(["tag", *RATE_HEADER[1:]], [_rate_row(m) for m in drift.movers], "num")
        )
    else:
        largest = drift.largest_change
        movers = f"<h3>No tag moved (of {drift.tags_compared:,} compared)</h3>" + (
            _table(["largest change", *RATE_HEADER[1:]], [_rate_row(largest)], "num") if largest else ""
        )
    rates = [drift.ood] if drift.ood else []
    ood_note = "" if drift.ood else "<p class='muted'>No OOD flags in one of the versions.</p>"
    table = _table(["rate", *RATE_HEADER[1:]], [_rate_row(r) for r in [*rates, *drift.errors]], "num")
    return _section(
        "drift", "Drift", intro + verdict + movers + "<h3>OOD and error rates</h3>" + ood_note + table
    )


def _tags_section(acc: Figures) -> str:
    parts = []
    groups = acc.by_category or {"all": acc.tag_counts}
    for category, counts in groups.items():
        if not counts:
            continue
        top = counts.most_common(TOP_TAGS)
        note = f" (top {TOP_TAGS} of {len(counts):,})" if len(counts) > TOP_TAGS else ""
        parts.append(
            f"<h3>{html.escape(category)}{note}</h3>" + bar_chart([t for t, _ in top], [n for _, n in top])
        )
    return _section("tags", "Tag frequency", "".join(parts) or "<p>No tags.</p>")


def _scores_section(acc: Figures, threshold: float, assumed: bool) -> str:
    label = (
        f"score of emitted tags (line: threshold {threshold:g}"
        f"{', assumed: the run records none' if assumed else ''})"
    )
    chart = histogram(acc.score_hist, SCORE_BINS, marker=threshold, label=label)
    ranked = [
        (t, acc.borderline[t] / n, n)
        for t, n in acc.tag_counts.items()
        if n >= MIN_TAG_COUNT and acc.borderline[t]
    ]
    ranked.sort(key=lambda r: (-r[1], -r[2], r[0]))
    table = (
        _table(
            ["tag", f"emitted with score < threshold + {BORDERLINE}", "emitted"],
            [[t, f"{share:.0%}", f"{n:,}"] for t, share, n in ranked[:20]],
        )
        if ranked
        else "<p>No tag is often near its threshold.</p>"
    )
    return _section(
        "scores",
        "Score distribution",
        chart
        + f"<h3>What the model is least sure of (tags emitted at least {MIN_TAG_COUNT} times)</h3>"
        + table,
    )


def _ood_section(acc: Figures, figure) -> str:
    if not acc.ood_count:
        return _section(
            "ood", "Out of distribution", "<p>No OOD distances (the bundle has no OOD reference).</p>"
        )
    top = acc.ood_quantile(0.999)
    edges = np.linspace(0.0, top * 1.05 if top > 0 else 1.0, 41)
    counts = acc.ood_histogram(edges)
    strip = "".join(figure(uri, f"{d:.2f}") for d, uri in sorted(acc.top_ood, reverse=True))
    text = (
        f"<p>{acc.ood_flagged:,} of {counted(acc.ood_count, 'images', ',')} flagged as OOD; "
        f"median distance {acc.ood_quantile(0.5):.2f}.</p>"
    )
    return _section(
        "ood",
        "Out of distribution",
        text
        + histogram(counts, edges, label="Mahalanobis distance")
        + "<h3>Most out-of-distribution images</h3>"
        + f"<div class='strip'>{strip}</div>",
    )


def _signals_paragraph(summary: dict) -> str:
    """Which signals joined images, what could not match, and the embedding threshold."""
    edges = ", ".join(f"{k} {v:,}" for k, v in summary.get("edges", {}).items()) or "not recorded"
    unmatched = (
        ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in summary.get("unmatched_hashes", {}).items() if v)
        or "none"
    )
    from pipeline.corpus.embedding_threshold import EmbeddingThreshold

    emb_text = html.escape(EmbeddingThreshold.from_record(summary.get("embedding")).text())
    # older summaries do not name the rule: they were written by best-copy
    first = "the copy first seen in the table, then " if summary.get("representative") == "first-seen" else ""
    return (
        f"<p>Edges by signal: {edges}. Hashes that match nothing: {unmatched}. {emb_text}. Kept copy "
        f"(marked <i>kept</i>): {first}the most pixels, then a lossless format, then the most bytes, "
        "then the smallest uri.</p>"
    )


def _dedup_section(dedup: str, storage_options, figure) -> str:
    import pyarrow.parquet as pq

    path = dedup.rstrip("/")
    summary = _read_json(f"{path}/_summary.json", storage_options) or {}
    fs, clusters_path = filesystem_for(f"{path}/clusters.parquet", storage_options)
    sizes = (
        pq.read_table(clusters_path, columns=["cluster_size"], filesystem=fs)
        .column("cluster_size")
        .to_numpy()
    )
    body = (
        f"<p>{counted(summary.get('clusters', 0), 'clusters', ',')} over "
        f"{counted(summary.get('images', len(sizes)), 'images', ',')}; "
        f"{counted(summary.get('duplicates', 0), 'duplicates', ',')} "
        f"({summary.get('duplicate_rate', 0):.2%}); "
        f"{counted(summary.get('exact_duplicate_images', 0), 'exact copies', ',')}; "
        f"largest cluster {summary.get('largest_cluster', int(sizes.max()) if len(sizes) else 0):,}.</p>"
    )
    body += _signals_paragraph(summary)
    big = sizes[sizes > 1]
    if not len(big):
        return _section("duplicates", "Duplicate clusters", body + "<p>No duplicates.</p>")
    # read only the rows of the largest clusters: the size reached by the TOP_CLUSTERS-th
    sizes_seen, rows_seen = np.unique(big, return_counts=True)
    clusters_from_largest = np.cumsum((rows_seen // sizes_seen)[::-1])
    cut = sizes_seen[::-1][
        min(int(np.searchsorted(clusters_from_largest, TOP_CLUSTERS)), len(sizes_seen) - 1)
    ]
    members = pq.read_table(
        clusters_path,
        columns=["uri", "cluster_id", "cluster_size", "is_representative"],
        filesystem=fs,
        filters=[("cluster_size", ">=", int(cut))],
    )
    rows = sorted(
        members.to_pylist(),
        key=lambda r: (-r["cluster_size"], r["cluster_id"], not r["is_representative"], r["uri"]),
    )
    strips: list = []
    shown: list = []
    for row in rows:
        if row["cluster_id"] not in shown:
            if len(shown) == TOP_CLUSTERS:
                break
            shown.append(row["cluster_id"])
            strips.append([row["cluster_size"], row["cluster_id"], []])
        if len(strips[-1][2]) < CLUSTER_STRIP:
            strips[-1][2].append(row)
    html_strips = "".join(
        f"<h3>{counted(size, 'images', ',')} <span class='muted'>cluster {html.escape(cid[:16])}</span></h3>"
        "<div class='strip'>"
        + "".join(
            figure(r["uri"], ("kept: " if r["is_representative"] else "") + posixpath.basename(r["uri"]))
            for r in items
        )
        + "</div>"
        for size, cid, items in strips
    )
    return _section("duplicates", "Duplicate clusters", body + html_strips)


def _split_section(split: str, storage_options, acc: Figures) -> str:
    path = split.rstrip("/")
    report = _read_json(f"{path}/_report.json", storage_options)
    if report is None:
        import pyarrow.parquet as pq

        fs, file = filesystem_for(f"{path}/splits.parquet", storage_options)
        names = pq.read_table(file, columns=["split"], filesystem=fs).column("split")
        counts = pc.value_counts(names)
        report = {
            "sizes": dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())),
            "positives": {},
        }
    sizes = report.get("sizes", {})
    total = sum(sizes.values()) or 1
    chart = bar_chart(list(sizes), [sizes[s] for s in sizes])
    positives = report.get("positives", {})
    splits = [s for s in sizes if sizes[s]]
    top = [t for t, _ in acc.tag_counts.most_common(20) if t in positives]
    rows = []
    for tag in top:
        overall = sum(positives[tag].values()) / total
        rows.append([tag, f"{overall:.1%}", *[f"{positives[tag].get(s, 0) / sizes[s]:.1%}" for s in splits]])
    deviation = report.get("label_deviation", {})
    text = "".join(
        f"<p>{html.escape(s)}: mean label-rate deviation from the whole {deviation[s]:.4f}</p>"
        for s in deviation
    )
    balance = (
        _table(["tag", "all", *splits], rows, "num")
        if rows
        else "<p>No per-tag counts in the split report.</p>"
    )
    return _section(
        "splits",
        "Splits",
        chart
        + f"<p>{counted(total, 'images', ',')}.</p>"
        + text
        + "<h3>Per-tag balance: share of each split carrying the tag (top tags)</h3>"
        + balance,
    )


def _errors_section(acc: Figures) -> str:
    errors = sum(acc.errors.values())
    if not errors:
        return _section("errors", "Errors", "<p>No errors.</p>")
    rows = [[r["uri"], r["error_kind"], cut(r["error"] or "", ERROR_CHARS)] for r in acc.first_errors]
    more = (
        f"<p class='muted'>The first {len(rows)} of {errors:,} error rows.</p>" if errors > len(rows) else ""
    )
    return _section("errors", "Errors", more + _table(["uri", "kind", "message"], rows, "errors"))


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;\
color:#1d232a;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:18px 28px}header h1{margin:0;font-size:20px}\
header p{margin:4px 0 0;opacity:.8}
nav{padding:8px 28px;background:#e9edf3}nav a{margin-right:14px;color:#1d3557}
section{background:#fff;margin:16px 28px;padding:8px 20px 16px;border-radius:8px;\
box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:17px;border-bottom:1px solid #e3e6ea;padding-bottom:6px}h3{font-size:14px;margin:14px 0 6px}
.cards{display:flex;gap:12px;flex-wrap:wrap}\
.card{background:#f1f4f8;border-radius:6px;padding:10px 16px;min-width:120px}
.big{font-size:20px;font-weight:600}.muted{color:#6b7480}
table{border-collapse:collapse;margin:6px 0}\
td,th{padding:3px 10px;border-bottom:1px solid #eceff2;text-align:left;vertical-align:top}
table.facts td:first-child{color:#6b7480}table.errors td{font-size:12px;word-break:break-all;max-width:520px}
svg text{font-size:11px;fill:#333}svg rect{fill:#457b9d}svg text.v{fill:#6b7480}svg .axis{stroke:#999}\
svg .mark{stroke:#e63946;stroke-width:2}svg rect.down{fill:#e63946}
.alert{color:#b00020}.ok{color:#2a7d2e}
.strip{display:flex;gap:8px;flex-wrap:wrap}figure{margin:0;width:112px;text-align:center}
figure img,.noimg{width:112px;height:112px;object-fit:cover;border-radius:4px;background:#ddd;display:block}
.noimg{line-height:112px;font-size:11px;color:#666}figcaption{font-size:11px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
"""


def _page(title: str, sections: list[str]) -> str:
    links = "".join(
        f"<a href='#{key}'>{name}</a>"
        for key, name in [
            ("summary", "Summary"),
            ("drift", "Drift"),
            ("tags", "Tags"),
            ("scores", "Scores"),
            ("ood", "OOD"),
            ("duplicates", "Duplicates"),
            ("splits", "Splits"),
            ("errors", "Errors"),
        ]
        if f"id='{key}'" in "".join(sections)
    )
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<header><h1>{html.escape(title)}</h1><p>made {made} by tagpipe</p></header><nav>{links}</nav>"
        + "".join(sections)
        + "</body></html>\n"
    )


class _ReportInputs(SettingsModel):
    tags: Annotated[
        str, Field(min_length=1, description="a tag output (tag table or Parquet)"), Setting(KeyRole.NONE)
    ]
    output: Annotated[
        str,
        Field(min_length=1, description="the HTML file to write (local path or `s3://...`)"),
        Setting(KeyRole.NONE, flags=("--output", "-o")),
    ] = "report.html"
    dedup: Annotated[
        str | None,
        Field(description="a dedup output directory: the largest duplicate clusters"),
        Setting(KeyRole.NONE, default_text="none"),
    ] = None
    split: Annotated[
        str | None,
        Field(description="a split output directory: sizes and per-tag balance"),
        Setting(KeyRole.NONE, default_text="none"),
    ] = None
    title: Annotated[
        str | None,
        Field(description="the page title"),
        Setting(KeyRole.NONE, default_text="names the tag output"),
    ] = None
    compare_version: Annotated[
        int | None,
        Field(ge=0, description="drift from this version of the table to the current one"),
        Setting(KeyRole.NONE, default_text="the version before"),
    ] = None
    storage_options: StorageOptions


class ReportSettings(DriftSettings, _ReportInputs):
    """What `tagpipe report` takes (its options come from these fields): the page's inputs,
    then when a change is drift (DriftSettings, the nightly's [nightly.drift])."""

    def drift(self) -> DriftSettings:
        return DriftSettings(**{name: getattr(self, name) for name in DriftSettings.model_fields})

    def build(self) -> ReportSummary:
        return build_report(
            self.tags,
            self.output,
            self.dedup,
            self.split,
            self.storage_options,
            self.title,
            self.compare_version,
            self.drift(),
        )
