"""Listing counts everything: every file under a prefix is an input (one row), OS and
sync debris is skipped and counted, and files found = rows + skipped, always."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.job.settings import make_tag_config
from pipeline.job.tag_job import run_tag_job
from pipeline.storage.manifest import ListingRules, build_manifest
from pipeline.table.tag_table import read_current

# Files Pillow cannot read, as they turn up beside images in scraped and synced folders.
ODD = {
    "vector/logo.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
    "docs/scan.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n",
    "raw/photo.cr2": b"II*\x00\x10\x00\x00\x00CR\x02\x00" + b"\x00" * 64,
    "noext": b"\x00\x01\x02\x03",
}
SIDECARS = {  # a training set's own files beside its images
    "img0.txt": b"1girl, solo\n",
    "sub/img1.caption": b"a photo\n",
    "meta/img2.json": b"{}",
    "cache/img0.npz": b"PK",
    "dataset.toml": b"[general]\n",
}
DEBRIS = [
    ".DS_Store",
    "sub/._photo.jpg",  # AppleDouble
    ".git/HEAD",
    "@eaDir/photo.jpg@SynoEXIFDirectory",
    "__MACOSX/sub/._x.jpg",
    "sub/Thumbs.db",
    "desktop.ini",
    "sub/.hidden/inside.jpg",
]


def _corpus(root: Path) -> list[Path]:
    images = []
    for i, fmt in enumerate(
        ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "PCX"]
    ):
        path = root / ("sub" if i % 2 else ".") / f"img{i}.{fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 50, 3), 20 * i, np.uint8)).save(path, fmt)
        images.append(path)
    for name, data in ODD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name, data in SIDECARS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    for name in DEBRIS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"debris")
    return images


def test_every_file_is_an_input_and_debris_is_counted(tmp_path):
    images = _corpus(tmp_path)
    listing = build_manifest([str(tmp_path)], parallel=False)
    uris = set(listing.manifest.column("uri").to_pylist())
    assert uris == {str(p.resolve()) for p in images} | {str((tmp_path / n).resolve()) for n in ODD}
    assert listing.skipped == {"os_debris": len(DEBRIS), "sidecar": len(SIDECARS)}
    assert listing.found == len(images) + len(ODD) + len(DEBRIS) + len(SIDECARS)
    with_sidecars = build_manifest([str(tmp_path)], rules=ListingRules(skip_sidecars=False), parallel=False)
    assert with_sidecars.manifest.num_rows == len(images) + len(ODD) + len(SIDECARS)
    assert with_sidecars.skipped == {"os_debris": len(DEBRIS)}


def test_bad_extension_names_the_field_and_the_rule(tmp_path):
    import pytest

    from pipeline.core.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"field extensions has a bad value: \[''\] \(must be file extensions"
    ):
        make_tag_config(inputs=[str(tmp_path)], output="out", model="m", extensions=[""])


def test_extensions_narrow_the_listing_and_are_counted(tmp_path):
    images = _corpus(tmp_path)
    listing = build_manifest(
        [str(tmp_path)], rules=ListingRules(extensions=frozenset({"jpeg", "png"})), parallel=False
    )
    assert sorted(Path(u).suffix for u in listing.manifest.column("uri").to_pylist()) == [".jpeg", ".png"]
    assert listing.skipped == {
        "os_debris": len(DEBRIS),
        "extension": len(images) - 2 + len(ODD) + len(SIDECARS),
    }


def test_tag_run_reports_skipped_files_and_rows_add_up(ray_session, demo_bundle, tmp_path):
    """The output inside the input folder is not listed as input on the next run either."""
    root = tmp_path / "corpus"
    images = _corpus(root)
    out = root / "tagged"
    cfg = make_tag_config(inputs=[str(root)], output=str(out), model=str(demo_bundle))
    summary = run_tag_job(cfg)
    rows = read_current(str(out))
    assert summary.listed == rows.num_rows == len(images) + len(ODD)
    assert summary.files_found == summary.listed + sum(summary.skipped_files.values())
    assert summary.skipped_files == {"os_debris": len(DEBRIS), "sidecar": len(SIDECARS)}
    kinds = dict(zip(rows.column("uri").to_pylist(), rows.column("error_kind").to_pylist()))
    assert all(kinds[str(p.resolve())] is None for p in images)
    assert kinds[str((root / "vector/logo.svg").resolve())] == "unsupported"
    assert kinds[str((root / "docs/scan.pdf").resolve())] == "unsupported"
    assert kinds[str((root / "noext").resolve())] == "not_an_image"
    assert f"skipped: {len(DEBRIS)} os_debris, {len(SIDECARS)} sidecar" in summary.text()
    record = json.loads((out / "_runs" / f"{summary.run_id}.json").read_text())
    assert record["summary"]["skipped_files"] == {"os_debris": len(DEBRIS), "sidecar": len(SIDECARS)}
    assert record["counts"]["files_found"] == summary.files_found
    assert record["counts"]["skipped_files"] == {"os_debris": len(DEBRIS), "sidecar": len(SIDECARS)}
    assert sorted(record["skipped_examples"]["os_debris"]) == sorted(
        str((root / n).resolve()) for n in DEBRIS
    )
    assert record["settings"]["provider"] == "auto"  # enums are written by value
    snapshot = json.loads((out / "_current.json").read_text())
    assert snapshot["counts"]["rows"] == snapshot["rows"] == rows.num_rows

    again = run_tag_job(cfg)  # the table's own files are under the input now
    assert again.change == "no change" and again.listed == summary.listed
    assert again.skipped_files["tagpipe_output"] > 0
    assert again.files_found == again.listed + sum(again.skipped_files.values())


def test_an_input_inside_the_output_folder_is_listed(ray_session, demo_bundle, tmp_path):
    """-i project/images -o project: only the table's own files are left out."""
    project = tmp_path / "project"
    images = project / "images"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
    cfg = make_tag_config(inputs=[str(images)], output=str(project), model=str(demo_bundle))
    assert run_tag_job(cfg).rows == 3
    again = run_tag_job(make_tag_config(inputs=[str(project)], output=str(project), model=str(demo_bundle)))
    assert (
        again.listed == 3 and again.change == "no change" and again.skipped_files.get("tagpipe_output", 0) > 0
    )
