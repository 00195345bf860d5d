"""Edited copies of real photos, found by a real CNN's embedding at `auto`: recall per edit kind.

    pip download nudenet==3.4.2 --no-deps -d /tmp/wheels     # a YOLOv8n ONNX ships in the wheel
    python benchmarks/real_cnn_copies.py --wheel /tmp/wheels/nudenet-3.4.2-py3-none-any.whl

The model: NudeNet 3.4.2's `320n.onnx` (YOLOv8n, a real CNN with trained weights, from
PyPI; nothing else is downloaded). Its SPPF block's output (256 channels at 1/32 of the
input) is global-average-pooled into a 256-d embedding, the way taggers pool theirs.
Input: the photo letterboxed to 320x320, RGB / 255, as NudeNet feeds it.

The corpus: the photos scikit-image and scikit-learn ship (tests/sample_photos.py) and
12 edited copies of each (pipeline/image/edits.py: crops of 5/10/20% at other offsets
than calibration's, a corner crop, flip, half size, JPEG q30, border, text band,
greyscale, brightness, a 5-degree turn), written as a tag table through the table API
(uri, sha256, phash and its flag as tagpipe computes them, embedding). The table's
calibration file holds each photo's 12 standard edits at calibration's own offsets, as a
tag run writes it. Then `run_dedup(..., "auto")`: for each edit kind, the copies whose
cluster holds their original (planted recall) and the copies joined to it by an
embedding edge; clusters that hold two different photos (false merges); for phash alone
the same counts. Also at a cosine chosen by hand (--by-hand).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
SIDE = 320
POOLED = "/model.9/cv2/act/Mul_output_0"  # SPPF: the backbone's last block


def embedding_model(wheel: str) -> bytes:
    import onnx
    from onnx import helper

    with zipfile.ZipFile(wheel) as archive:
        model = onnx.load_from_string(archive.read("nudenet/320n.onnx"))
    graph = model.graph
    graph.node.append(helper.make_node("GlobalAveragePool", [POOLED], ["pooled"]))
    graph.node.append(helper.make_node("Flatten", ["pooled"], ["embedding"], axis=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT, ["batch", 256]))
    return model.SerializeToString()


def letterbox(image) -> np.ndarray:
    from PIL import Image

    rgb = image.convert("RGB")
    scale = SIDE / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    canvas = Image.new("RGB", (SIDE, SIDE))
    canvas.paste(rgb.resize(size, Image.Resampling.BILINEAR), (0, 0))
    return np.asarray(canvas, np.float32).transpose(2, 0, 1) / 255


def corpus(seed_offset: int) -> list[tuple[str, str, bytes]]:
    """(photo name, edit or 'original', file bytes): the photos and 12 edited copies each."""
    from PIL import Image
    from sample_photos import photo_paths

    from pipeline.image import edits

    items = []
    for path in photo_paths():
        with Image.open(path) as opened:
            image = edits.editable(opened.copy())
        items.append((path.stem, "original", Path(path).read_bytes()))
        for name, edit in edits.STANDARD_EDITS.items():
            edited = edit(image, seed=seed_offset) if name.startswith("crop_") else edit(image)
            items.append((path.stem, name, edits.edited_bytes(name, edited)))
    return items


def embed(session, items) -> np.ndarray:
    from PIL import Image

    out = []
    for _, _, data in items:
        with Image.open(io.BytesIO(data)) as image:
            out.append(session.run(None, {"images": letterbox(image)[None]})[0][0])
    return np.asarray(out, np.float32)


def write_table(folder: str, items, vectors: np.ndarray, calibration) -> list[str]:
    import pyarrow as pa
    from PIL import Image

    from pipeline.core.schemas import embedding_type
    from pipeline.image.phash import phash_with_fragile_bits
    from pipeline.table.tag_table import TagTable, commit_version

    uris, hashes, flags = [], [], []
    for photo, edit, data in items:
        uris.append(f"/corpus/{photo}/{edit}.png")
        with Image.open(io.BytesIO(data)) as image:
            value, fragile = phash_with_fragile_bits(image)
        hashes.append(value)
        flags.append(fragile > 24)
    flat = pa.array(vectors.astype(np.float16).reshape(-1), pa.float16())
    rows = pa.table(
        {
            "uri": uris,
            "sha256": [hashlib.sha256(d).hexdigest() for _, _, d in items],
            "phash": pa.array(hashes, pa.uint64()),
            "phash_degenerate": flags,
            "error": pa.nulls(len(uris), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]).cast(embedding_type(256)),
        }
    )
    table = TagTable(folder)
    part = table.write_part("data/real/part-0.parquet", rows)
    snapshot = commit_version(
        table, None, [part], model_sha256="nudenet-320n-sppf", inference_key="nudenet-320n-sppf",
        rules_key="r", run_id="real", model_name="nudenet-320n-sppf",
    )  # fmt: skip
    table.write_edit_calibration(snapshot.inference_key, calibration)
    return uris


def calibration_table(items, vectors):
    """Each photo's standard edits at calibration's offsets: cosine to its original."""
    import pyarrow as pa

    from pipeline.core.schemas import EDIT_CALIBRATION_SCHEMA

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    originals = {p: i for i, (p, e, _) in enumerate(items) if e == "original"}
    rows = [
        (f"/corpus/{p}/original.png", e, float(unit[i] @ unit[originals[p]]))
        for i, (p, e, _) in enumerate(items)
        if e != "original"
    ]
    return pa.table(
        {
            "uri": [r[0] for r in rows],
            "edit": [r[1] for r in rows],
            "cosine": pa.array([r[2] for r in rows], pa.float32()),
            "error": pa.nulls(len(rows), pa.string()),
        },
        schema=EDIT_CALIBRATION_SCHEMA,
    )


def score(folder: str, items, signals: tuple[str, ...]) -> dict:
    import pyarrow.parquet as pq

    clusters = pq.read_table(f"{folder}/clusters.parquet").to_pylist()
    cluster = {r["uri"]: r["cluster_id"] for r in clusters}
    edges = pq.read_table(f"{folder}/edges.parquet").to_pylist()
    joined = {(e["uri_a"], e["uri_b"]) for e in edges if e["signal"] in signals}
    joined |= {(b, a) for a, b in joined}
    recall: dict[str, list] = {}
    for photo, edit, _ in items:
        if edit == "original":
            continue
        copy, original = f"/corpus/{photo}/{edit}.png", f"/corpus/{photo}/original.png"
        recall.setdefault(edit, []).append(cluster[copy] == cluster[original])
    photos_of: dict[str, set] = {}
    for uri, cid in cluster.items():
        photos_of.setdefault(cid, set()).add(uri.split("/")[2])
    return {
        "by_edit": {k: round(float(np.mean(v)), 3) for k, v in recall.items()},
        "all": round(float(np.mean([x for v in recall.values() for x in v])), 3),
        "false_merges": sum(len(p) > 1 for p in photos_of.values()),
        "edges": len(joined) // 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", required=True, help="nudenet-3.4.2-py3-none-any.whl (pip download)")
    parser.add_argument("--by-hand", type=float, default=0.85)
    args = parser.parse_args()
    import onnxruntime as ort

    from pipeline.corpus.dedup import run_dedup

    session = ort.InferenceSession(embedding_model(args.wheel), providers=["CPUExecutionProvider"])
    items, calibration_items = corpus(seed_offset=7), corpus(seed_offset=0)
    vectors, calibration_vectors = embed(session, items), embed(session, calibration_items)
    work = tempfile.mkdtemp(prefix="tagpipe-real-cnn-")
    write_table(
        os.path.join(work, "tags"), items, vectors, calibration_table(calibration_items, calibration_vectors)
    )
    photos = len({p for p, _, _ in items})
    print(f"{photos} photos x 12 edited copies, embedding: NudeNet 320n SPPF pooled (256-d)")
    for name, threshold in (("auto", "auto"), ("by hand", args.by_hand), ("phash only", None)):
        out = os.path.join(work, f"dedup-{name.replace(' ', '-')}")
        summary = run_dedup(os.path.join(work, "tags"), out, embedding_threshold=threshold)
        result = score(out, items, ("sha256", "phash", "embedding"))
        emb = summary.embedding
        print(
            f"\n{name}: threshold {emb.threshold}; copies in their original's cluster "
            f"{result['all']}; false merges {result['false_merges']}"
        )
        print("  by edit: " + ", ".join(f"{k} {v}" for k, v in result["by_edit"].items()))
        if name == "auto":
            print(f"  auto's own figures: {summary.text()}")


if __name__ == "__main__":
    main()
