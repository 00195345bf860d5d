"""Listing by key ranges lists every key exactly once, whatever the keys, and in parallel:
fuzzed against a sorted list, then through build_manifest on the simulated store and
on a real S3 server (moto)."""

from __future__ import annotations

import bisect
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.storage.key_ranges import KeyRange, KeyRangeSettings, Page, S3KeyPages, list_keys, split_range
from pipeline.storage.manifest import ListingRules, build_manifest

SMALL = KeyRangeSettings(concurrency=8, pages_per_range=2, page_keys=3)


class SortedKeys:
    """A store as a sorted list, paged like S3 (keys after start_after, under a prefix);
    it counts requests and the most in flight at once."""

    def __init__(self, keys):
        self.keys = sorted(set(keys))
        self.requests = self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        self.gate = threading.Barrier(2, timeout=0.05)

    def list_page(self, prefix: str, start_after: str, max_keys: int) -> Page:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:  # wait briefly for a second caller, so overlap shows when there is any
            self.gate.wait()
        except threading.BrokenBarrierError:
            self.gate.reset()
        at = bisect.bisect_right(self.keys, start_after) if start_after else 0
        at = max(at, bisect.bisect_left(self.keys, prefix))
        chunk = [k for k in self.keys[at : at + max_keys + 1] if k.startswith(prefix)]
        with self.lock:
            self.in_flight -= 1
        shown = chunk[:max_keys]
        return Page(shown, [1] * len(shown), [None] * len(shown), [None] * len(shown), len(chunk) > max_keys)


KEY_TEXT = st.text(alphabet=st.sampled_from("0129ab/. _-zé~\u4e00"), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(KEY_TEXT, max_size=200), st.sampled_from(["", "p/", "p/q"]))
def test_every_key_once_whatever_the_keys(names, prefix):
    store = SortedKeys([prefix + n for n in names] + ["other/x", "p", "a"])
    listed = list_keys(store, prefix, SMALL)
    keys = listed.table.column("key").to_pylist()
    assert sorted(keys) == [k for k in store.keys if k.startswith(prefix)]
    assert len(keys) == len(set(keys))


PART = st.sampled_from(
    ["a", ".", "..", ".x", "Thumbs.db", "@eaDir", "__MACOSX", "out", "img.JPG", "c.txt", "d.Npz"]
)
RULES = [
    ListingRules(),
    ListingRules(skip_sidecars=False),
    ListingRules(frozenset({"jpg", "png"})),
    ListingRules(frozenset({"gif"})),
    ListingRules(excluded=("b/out", "b/a/out/")),
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(PART, min_size=1, max_size=4).map("/".join), min_size=1, max_size=20))
def test_the_vectorised_filter_never_misses_a_skipped_file(relatives):
    import pyarrow as pa

    paths = [f"b/{r}" for r in relatives]
    for rules in RULES:
        maybe = rules.may_skip(pa.array(paths))
        missed = [p for p, m in zip(paths, maybe, strict=True) if not m and rules.skip_reason("b/", p)]
        assert not missed, (rules, missed)


def test_dense_prefixes_fan_out_and_run_at_once():
    for names in (
        [f"img{i:05d}.jpg" for i in range(3000)],
        [f"{(i * 7919) % 4096:03x}" for i in range(3000)],
    ):
        store = SortedKeys(names)
        listed = list_keys(store, "", KeyRangeSettings(concurrency=8, pages_per_range=4, page_keys=20))
        assert sorted(listed.table.column("key").to_pylist()) == store.keys
        assert listed.ranges > 20 and store.most_in_flight > 1
        assert listed.requests < 3 * (len(store.keys) / 20)  # cuts cost some requests, not many


class IgnoresStartAfter(SortedKeys):
    """An S3-compatible server that ignores StartAfter: every request gets the first page."""

    def list_page(self, prefix: str, start_after: str, max_keys: int) -> Page:
        return super().list_page(prefix, "", max_keys)


def test_a_store_that_ignores_start_after_is_refused_not_trusted():
    from pipeline.storage.key_ranges import UnorderedListing

    with pytest.raises(UnorderedListing, match="asked for keys after"):
        list_keys(IgnoresStartAfter([f"k{i:03d}" for i in range(50)]), "", SMALL)


def test_split_covers_the_rest_of_the_range_in_order():
    span = KeyRange("img00019.jpg", None)
    pieces = split_range(span, "img00000.jpg", "img00019.jpg", "", "0123456789img.")
    assert pieces[0].after == "img00019.jpg" and pieces[-1].upto is None
    assert all(a.upto == b.after for a, b in zip(pieces, pieces[1:], strict=False))
    assert [p.upto for p in pieces[:-1]] == sorted(p.upto for p in pieces[:-1])
    assert "img001" in [p.upto for p in pieces] and "img1" in [p.upto for p in pieces]


def test_simulated_store_through_build_manifest():
    for layout in ("flat", "nested"):
        options = {"objects": 5000, "layout": layout, "names": "hashed"}
        listing = build_manifest(
            ["simstore://bucket/"], options, key_ranges=KeyRangeSettings(pages_per_range=2, page_keys=100)
        )
        uris = listing.manifest.column("uri").to_pylist()
        assert len(uris) == 5000 == len(set(uris)) and uris == sorted(uris)
        assert all(u.startswith("simstore://bucket/") and u.endswith(".jpg") for u in uris)
        assert (layout == "nested") == ("/d00004/" in uris[-1])


@pytest.fixture
def s3_bucket(s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("ranges")
    keys = [f"flat/{i:04d}.jpg" for i in range(250)] + [f"flat/{n}" for n in ("a b.jpg", "é.png", "~x.jpg")]
    keys += ["flat/.DS_Store", "flat/sub/deep.jpg", "flat/sub/", "flat/notes.txt", "other/y.jpg"]
    for key in keys:
        fs.pipe(f"ranges/{key}", b"x" * (len(key) % 7 + 1))
    yield fs
    fs.rm("ranges", recursive=True)


def test_s3_flat_prefix_by_key_ranges(s3_bucket):
    fs = s3_bucket
    listed = fs.find("ranges/flat/")  # s3fs lists the folder marker "flat/sub/" as a file; not an input
    expected = sorted(k for k in listed if "/." not in k and not k.endswith((".txt", "/")))
    listing = build_manifest(
        ["s3://ranges/flat"], key_ranges=KeyRangeSettings(concurrency=4, pages_per_range=2, page_keys=25)
    )
    assert listing.manifest.column("uri").to_pylist() == [f"s3://{k}" for k in expected]
    assert listing.skipped == {"os_debris": 1, "sidecar": 1}
    sizes = dict(
        zip(listing.manifest["uri"].to_pylist(), listing.manifest["source_size"].to_pylist(), strict=True)
    )
    assert sizes["s3://ranges/flat/a b.jpg"] == fs.info("ranges/flat/a b.jpg")["size"]
    etags = dict(zip(listing.manifest["uri"].to_pylist(), listing.manifest["etag"].to_pylist(), strict=True))
    assert etags["s3://ranges/flat/0007.jpg"] == fs.info("ranges/flat/0007.jpg")["ETag"].strip('"')
    raw = list_keys(S3KeyPages(fs, "ranges"), "flat/", KeyRangeSettings(pages_per_range=2, page_keys=25))
    assert raw.ranges > 3  # it fanned out
