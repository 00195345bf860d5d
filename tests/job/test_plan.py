"""plan_run, table-driven: what a run tags, reuses, keeps, rewrites and how it names the
change, for every case a nightly run meets. No Ray, no files: tables in memory.

The base table has two parts: p0 holds a.jpg and b.jpg, p1 holds c.jpg and d.jpg.
"""

from __future__ import annotations

import collections

import numpy as np
import pyarrow as pa
import pytest

from pipeline.core.errors import TagpipeError
from pipeline.core.schemas import MANIFEST_SCHEMA
from pipeline.job.changes import StoredSources, classify
from pipeline.job.incremental import RETRY_ERROR_KINDS, Keys
from pipeline.job.plan import Change, Counts, PartRewrite, empty_view, plan_run
from pipeline.table.tag_table import Snapshot

KEYS = Keys("inference-1", "rules-1")
SOURCES = {u: (100 + i, f"etag-{u}", 1.0) for i, u in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])}
PARTS = {"p0": ["a.jpg", "b.jpg"], "p1": ["c.jpg", "d.jpg"]}


def _manifest(sources: dict) -> pa.Table:
    rows = [{"uri": u, "source_size": s, "etag": e, "mtime": m} for u, (s, e, m) in sorted(sources.items())]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _view(errors: dict | None = None) -> pa.Table:
    rows = []
    for index, (_part, uris) in enumerate(PARTS.items()):
        for u in uris:
            size, etag, mtime = SOURCES[u]
            rows.append({"uri": u, "source_size": size, "etag": etag, "mtime": mtime, "sha256": "s" + u,
                         "error_kind": (errors or {}).get(u), "_file": index})  # fmt: skip
    return pa.Table.from_pylist(rows, schema=empty_view().schema)


def _base(keys=KEYS) -> Snapshot:
    return Snapshot(1, tuple(PARTS), 4, "m", keys.inference, keys.rules, "r0", "2026-12-01T00:00:00+00:00")


def _plan(sources=None, base=True, keys=KEYS, errors=None, candidates=None, max_delete_fraction=1.0):
    manifest = _manifest(SOURCES if sources is None else sources)
    status = classify(manifest, _view(errors) if base else empty_view())
    parts = candidates or {}
    return plan_run(
        status,
        _base() if base else None,
        keys,
        list(parts),
        lambda file, columns=None: parts[file].select(columns) if columns else parts[file],
        max_delete_fraction,
    )


def _uris(table: pa.Table) -> list[str]:
    return sorted(table.column("uri").to_pylist())


def _changed(uri: str) -> dict:
    size, etag, mtime = SOURCES[uri]
    return {**SOURCES, uri: (size + 1, etag + "-new", mtime)}


def _without(uri: str) -> dict:
    return {u: s for u, s in SOURCES.items() if u != uri}


CASES = {
    # name: (plan_run inputs, change, to_tag, kept parts, rewrites, rethreshold, counts)
    "first run": (dict(base=False), Change.FIRST_RUN, list(SOURCES), (), (), True, Counts(new=4)),
    "no change": (dict(), Change.NO_CHANGE, [], ("p0", "p1"), (), False, Counts(skipped=4)),
    "new image": (
        dict(sources={**SOURCES, "e.jpg": (5, "etag-e", 1.0)}),
        Change.INCREMENTAL,
        ["e.jpg"],
        ("p0", "p1"),
        (),
        False,
        Counts(new=1, skipped=4),
    ),
    "changed image": (
        dict(sources=_changed("a.jpg")),
        Change.INCREMENTAL,
        ["a.jpg"],
        ("p1",),
        (PartRewrite("p0", ("a.jpg",)),),
        False,
        Counts(changed=1, skipped=3),
    ),
    "deleted image": (
        dict(sources=_without("d.jpg")),
        Change.INCREMENTAL,
        [],
        ("p0",),
        (PartRewrite("p1", ("d.jpg",)),),
        False,
        Counts(deleted=1, skipped=3),
    ),
    "transient error retried": (
        dict(errors={"c.jpg": "read_error"}),
        Change.INCREMENTAL,
        ["c.jpg"],
        ("p0",),
        (PartRewrite("p1", ("c.jpg",)),),
        False,
        Counts(skipped=3, retried=1),
    ),
    "lasting error kept": (
        dict(errors={"c.jpg": "not_an_image"}),
        Change.NO_CHANGE,
        [],
        ("p0", "p1"),
        (),
        False,
        Counts(skipped=4),
    ),
    "model change": (
        dict(keys=Keys("inference-2", "rules-1"), sources=_without("d.jpg")),
        Change.INFERENCE_CHANGED,
        ["a.jpg", "b.jpg", "c.jpg"],
        (),
        (),
        True,
        Counts(deleted=1, reinferred=3),
    ),
    "rules change": (
        dict(keys=Keys("inference-1", "rules-2")),
        Change.RULES_CHANGED,
        [],
        (),
        (PartRewrite("p0", ()), PartRewrite("p1", ())),
        True,
        Counts(skipped=4),
    ),
    "rules change and a deletion": (
        dict(keys=Keys("inference-1", "rules-2"), sources=_without("a.jpg")),
        Change.RULES_CHANGED,
        [],
        (),
        (PartRewrite("p0", ("a.jpg",)), PartRewrite("p1", ())),
        True,
        Counts(deleted=1, skipped=3),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_plan(name):
    inputs, change, to_tag, keep, rewrites, rethreshold, counts = CASES[name]
    plan = _plan(**inputs)
    assert plan.change is change
    assert _uris(plan.to_tag) == sorted(to_tag)
    assert plan.keep == keep
    assert plan.rewrites == rewrites
    assert plan.rethreshold is rethreshold
    assert plan.counts == counts
    assert plan.commits is (change is not Change.NO_CHANGE)


def _part(uris: list[str], sources=SOURCES) -> pa.Table:
    table = _manifest({u: sources[u] for u in uris})
    return table.append_column("error_kind", pa.nulls(len(uris), pa.string()))


def test_an_interrupted_run_s_parts_are_reused():
    """A part a killed first run wrote, with the same sources: its rows are not tagged again."""
    plan = _plan(base=False, candidates={"killed": _part(["a.jpg", "b.jpg"])})
    assert plan.reuse.files == ["killed"] and plan.reuse.rows == 2
    assert _uris(plan.to_tag) == ["c.jpg", "d.jpg"]
    assert plan.change is Change.FIRST_RUN and plan.commits


def test_a_part_whose_sources_changed_since_is_not_reused():
    stale = _part(["a.jpg", "b.jpg"], _changed("a.jpg"))
    plan = _plan(base=False, candidates={"killed": stale})
    assert plan.reuse.rows == 0 and _uris(plan.to_tag) == sorted(SOURCES)


def test_a_mass_deletion_is_refused_before_any_work():
    with pytest.raises(TagpipeError, match=r"would delete 3 of the table's 4 rows \(75%\)"):
        _plan(sources={"a.jpg": SOURCES["a.jpg"]}, max_delete_fraction=0.2)
    assert _plan(sources={"a.jpg": SOURCES["a.jpg"]}, max_delete_fraction=1.0).counts.deleted == 3


@pytest.mark.parametrize("seed", range(4))
def test_classifying_by_uri_range_is_one_join(seed):
    """Ranges of a few rows (cut at listed uris, the view read from overlapping batches)
    give the rows a single join gives: same uris, statuses, parts, hashes, in uri order."""
    rng = np.random.default_rng(seed)
    uris = sorted({f"s3://b/{rng.integers(0, 10**6):06d}.jpg" for _ in range(900)})
    listed = [u for u in uris if rng.random() < 0.8]
    listed[40:40] = [listed[39]] * 9  # a uri listed ten times falls across cuts
    sources = {}
    for u in listed:  # etag known, or only size+mtime, or nothing (unknown)
        kind = rng.integers(0, 3)
        sources[u] = (int(rng.integers(1, 4)), None if kind else "e", None if kind == 2 else 1.0)
    manifest = pa.Table.from_pylist(
        [dict(zip(MANIFEST_SCHEMA.names, (u, *sources[u]), strict=True)) for u in listed],
        schema=MANIFEST_SCHEMA,
    )
    stored = [u for u in uris if rng.random() < 0.7]
    parts = np.array_split(np.array(stored, object), 5)  # each part sorted; parts overlap none
    batches = []
    for index in rng.permutation(len(parts)):  # the view's batches in any order
        rows = [{"uri": u, "source_size": int(rng.integers(1, 4)),
                 "etag": "e" if rng.random() < 0.5 else None, "mtime": 1.0, "sha256": f"h{u}",
                 "error_kind": "read_error" if rng.random() < 0.1 else None,
                 "_file": int(index)} for u in parts[index]]  # fmt: skip
        batches.append(pa.Table.from_pylist(rows, schema=empty_view().schema))
    view = pa.concat_tables(batches)
    by_index = {b["_file"][0].as_py(): b for b in batches if b.num_rows}
    spans = [  # a footer without statistics (None) is read for its span
        None
        if i % 2 or i not in by_index
        else (min(by_index[i]["uri"].to_pylist()), max(by_index[i]["uri"].to_pylist()))
        for i in range(len(parts))
    ]
    from_parts = StoredSources(spans, lambda i: by_index.get(i, empty_view()))
    shuffled = manifest.take(pa.array(rng.permutation(manifest.num_rows)))
    whole = classify(manifest, view, range_rows=10**9).as_table()

    def rows(changes) -> list:  # repeats of a uri may come in any order
        table = changes if isinstance(changes, pa.Table) else changes.as_table()
        return sorted(table.to_pylist(), key=lambda row: [str(v) for v in row.values()])

    for range_rows in (1, 7, 50):
        assert rows(classify(shuffled, view, range_rows=range_rows)) == rows(whole)
        assert rows(classify(shuffled, from_parts, range_rows=range_rows)) == rows(whole)
    assert sorted(set(whole.column("uri").to_pylist())) == sorted(set(listed) | set(stored))
    assert set(whole.column("status").to_pylist()) >= {"new", "deleted", "unchanged", "changed"}


def _status_by_rules(listed: tuple | None, stored: tuple | None) -> str:
    """The classification rules written out for one uri, plainly, as the oracle."""
    if stored is None or listed is None:
        return "new" if stored is None else "deleted"
    (size, etag, mtime), (v_size, v_etag, v_mtime, error_kind, _file) = listed, stored[:5]
    etag_known, mtime_known = (
        etag is not None and v_etag is not None,
        mtime is not None and v_mtime is not None,
    )
    same_source = (etag == v_etag if etag_known else mtime == v_mtime) and size == v_size
    status = "unchanged" if same_source else "changed"
    if not (etag_known or mtime_known) and not (size is not None and v_size is not None and size != v_size):
        status = "unknown"
    return "retry" if status == "unchanged" and error_kind in RETRY_ERROR_KINDS else status


def _plan_by_rules(listed: dict, stored: dict, files: tuple, keys: Keys) -> tuple:
    """What plan_run must answer, from per-uri Python dicts: to_tag, keep, rewrites, counts."""
    status = {u: _status_by_rules(listed.get(u), stored.get(u)) for u in set(listed) | set(stored)}
    tally = collections.Counter(status.values())
    if keys.inference != KEYS.inference:
        counts = Counts(tally["new"], tally["changed"], tally["deleted"],
                        reinferred=tally["unchanged"] + tally["retry"])  # fmt: skip
        return sorted(listed), (), (), counts
    counts = Counts(*(tally[s] for s in ("new", "changed", "deleted", "unchanged", "retry")))
    to_tag = sorted(u for u, s in status.items() if s in ("new", "changed", "retry"))
    dropped = collections.defaultdict(list)
    for u in sorted(u for u, s in status.items() if s in ("changed", "retry", "deleted")):
        dropped[stored[u][4]].append(u)
    same_rules = keys.rules == KEYS.rules
    keep = tuple(f for i, f in enumerate(files) if same_rules and i not in dropped)
    rewrites = tuple(PartRewrite(f, tuple(dropped[i])) for i, f in enumerate(files) if f not in keep)
    return to_tag, keep, rewrites, counts


@pytest.mark.parametrize("seed", range(3))
def test_plans_by_position_are_the_rules_applied_uri_by_uri(seed):
    """Statuses kept as positions into the listing (ranges of a few rows) give the plan
    the classification rules give, uri by uri: what to tag, keep and rewrite, the counts;
    for the same settings, new rules and a new model."""
    rng = np.random.default_rng(seed)
    pool = sorted({f"s3://b/{rng.integers(0, 10**5):05d}.jpg" for _ in range(400)})

    def source():  # etag and mtime each known or not; a size that may differ
        return (
            int(rng.integers(1, 3)),
            ["e1", "e2", None][rng.integers(3)],
            [1.0, 2.0, None][rng.integers(3)],
        )

    listed = {u: source() for u in pool if rng.random() < 0.8}
    kept = [u for u in pool if rng.random() < 0.7]
    files = tuple(f"p{i}" for i in range(6))
    stored = {}
    for index, part in enumerate(np.array_split(np.array(kept, object), len(files))):
        for u in part:
            same = listed.get(u) if rng.random() < 0.6 else None
            stored[u] = (
                *(same or source()),
                [None, None, "read_error", "decode_error"][rng.integers(4)],
                index,
            )
    manifest = pa.Table.from_pylist(
        [dict(zip(MANIFEST_SCHEMA.names, (u, *v), strict=True)) for u, v in listed.items()],
        schema=MANIFEST_SCHEMA,
    )
    view = pa.Table.from_pylist(
        [{"uri": u, "source_size": v[0], "etag": v[1], "mtime": v[2], "sha256": "h", "error_kind": v[3],
          "_file": v[4]} for u, v in sorted(stored.items())], schema=empty_view().schema,
    )  # fmt: skip
    base = Snapshot(1, files, len(stored), "m", KEYS.inference, KEYS.rules, "r0", "2026-12-01T00:00:00+00:00")
    changes = classify(manifest.take(pa.array(rng.permutation(manifest.num_rows))), view, range_rows=7)
    for keys in (KEYS, Keys(KEYS.inference, "rules-2"), Keys("inference-2", KEYS.rules)):
        plan = plan_run(changes, base, keys)
        got = (plan.to_tag.column("uri").to_pylist(), plan.keep, plan.rewrites, plan.counts)
        assert got == _plan_by_rules(listed, stored, files, keys)
    assert {"new", "changed", "unchanged", "deleted", "unknown", "retry"} <= set(changes.tally())


def test_a_listing_row_without_uri_is_refused(tmp_path):
    from pipeline.core.errors import ConfigError
    from pipeline.storage.manifest import build_manifest

    listing = pa.table({"uri": ["s3://b/a.jpg", None]}).cast(pa.schema([("uri", pa.string())]))
    no_uri = [{"uri": None, "source_size": 1, "etag": "e", "mtime": 1.0}]
    with pytest.raises(ValueError, match="no uri"):
        classify(pa.Table.from_pylist(no_uri, schema=MANIFEST_SCHEMA), empty_view())
    import pyarrow.parquet as pq

    pq.write_table(listing, tmp_path / "list.parquet")
    with pytest.raises(ConfigError, match=r"list.parquet: 1 row\(s\) with no uri"):
        build_manifest([str(tmp_path / "list.parquet")])


@pytest.mark.parametrize("chunk", [256, 1], ids=["in the driver", "in Ray tasks"])
def test_sources_without_etag_or_mtime_are_compared_by_content(tmp_path, ray_session, chunk):
    """A manifest file gives neither etag nor mtime: the bytes' sha256 decides (a few
    hashed in the driver, so planning needs no Ray; more in Ray tasks)."""
    import hashlib

    from pipeline.job.changes import resolve_unknown

    same, edited = tmp_path / "same.jpg", tmp_path / "edited.jpg"
    same.write_bytes(b"same bytes")
    edited.write_bytes(b"new bytes")
    listed = [{"uri": str(p), "source_size": 10, "etag": None, "mtime": None} for p in (edited, same)]
    manifest = pa.Table.from_pylist(listed, schema=MANIFEST_SCHEMA)
    stored = [{**row, "sha256": hashlib.sha256(b"same bytes").hexdigest(), "error_kind": None, "_file": 0}
              for row in listed]  # fmt: skip
    status = classify(manifest, pa.Table.from_pylist(stored, schema=empty_view().schema))
    assert status.as_table().column("status").to_pylist() == ["unknown", "unknown"]
    resolved = resolve_unknown(status, None, chunk=chunk).as_table()
    assert dict(zip(resolved["uri"].to_pylist(), resolved["status"].to_pylist(), strict=True)) == {
        str(edited): "changed",
        str(same): "unchanged",
    }
