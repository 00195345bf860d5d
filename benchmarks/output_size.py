"""Output bytes per image at CL Tagger v2's real width: 108k tags, 1152-d embedding.

    python benchmarks/output_size.py [--images 64] [--tags 108000]

No real model can be downloaded here, so this builds one with the real contract: the
demo tagger's pooled features -> a 1152-d tanh embedding -> a 108k-wide head whose
logit distribution is set like a tagger's (most tags far below 1%, ~100 frequent tags
around the threshold). Rows are produced by the real TaggerStage from real photos and
written as the job writes parts (Parquet, zstd). Prints bytes per image for the
default sparse logits and for --dense-logits, and what each row holds on average.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

from pipeline.demo.model import (
    build_graph,
    fit_ood_reference,
    reference_pixels,
    save_with_external_data,
)
from pipeline.image.decode import DecodeStage
from pipeline.model.runtime import ProviderChoice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/sample_photos.py
from sample_photos import large_variants  # noqa: E402

from pipeline.model.tagger import TaggerSettings, TaggerStage


def wide_bundle(directory: Path, tags: int, dim: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    model = build_graph(with_embedding_output=False)
    graph = model.graph
    head = {"head_out", "logits"}
    nodes = [n for n in graph.node if n.output[0] not in head]
    inits = [t for t in graph.initializer if t.name not in ("head.weight", "head.bias")]
    features = 21
    proj = rng.normal(0, 1.0, (features, dim)).astype(np.float32)
    weight = rng.normal(0, 1.5 / np.sqrt(0.8 * dim), (dim, tags)).astype(
        np.float32
    )  # tanh output: E[e^2] ~ 0.8, so emb @ W ~ N(0, 1.5^2)
    bias = np.full(tags, -8.7, np.float32)  # P(p >= 0.01) ~ 0.3% of tags per image
    frequent = rng.choice(tags, 120, replace=False)
    bias[frequent] = rng.uniform(-4.0, 1.5, frequent.size)  # tags most images get, around the threshold
    inits += [
        numpy_helper.from_array(proj, "wide.proj"),
        numpy_helper.from_array(weight, "wide.weight"),
        numpy_helper.from_array(bias, "wide.bias"),
    ]
    nodes += [
        helper.make_node("MatMul", ["pooled_features", "wide.proj"], ["proj_out"]),
        helper.make_node("Tanh", ["proj_out"], ["embedding"]),
        helper.make_node("MatMul", ["embedding", "wide.weight"], ["head_out"]),
        helper.make_node("Add", ["head_out", "wide.bias"], ["logits"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", tags]),
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim]),
    ]
    wide = helper.make_graph(nodes, "wide", list(graph.input), outputs, inits)
    model = helper.make_model(wide, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    save_with_external_data(model, directory / "model.onnx")

    names = [f"tag_{i:06d}" for i in range(tags)]
    categories = ["General"] * tags
    for i, rating in enumerate(["general", "sensitive", "questionable", "explicit"]):
        names[i], categories[i] = rating, "Rating"
    for i in range(4, 3000):
        categories[i] = "Character"
    vocab = {
        "tag_to_idx": {t: i for i, t in enumerate(names)},
        "idx_to_tag": {str(i): t for i, t in enumerate(names)},
        "tag_to_category": dict(zip(names, categories)),
        "categories": sorted(set(categories)),
    }
    (directory / "model_vocabulary.json").write_text(json.dumps(vocab))
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    embeddings = session.run(["embedding"], {"pixel_values": reference_pixels(256, seed + 2)})[0]
    np.savez(directory / "model_ood_ref.npz", **fit_ood_reference(embeddings))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tags", type=int, default=108_000)
    parser.add_argument("--dim", type=int, default=1152)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = wide_bundle(Path(tmp) / "model", args.tags, args.dim)
        files = {}
        for i, (_name, data) in enumerate(large_variants(args.images, seed=5, long_side=(800, 1600))):
            files[f"{tmp}/img_{i:04d}.jpg"] = data
            Path(f"{tmp}/img_{i:04d}.jpg").write_bytes(data)
        uris = np.array(sorted(files), object)
        for dense in (False, True):
            stage = TaggerStage(TaggerSettings(str(bundle), provider=ProviderChoice.CPU, dense_logits=dense))
            decode = DecodeStage(stage.bundle.profile.preprocess)
            table = stage(decode({"uri": uris}))
            path = Path(tmp) / f"part-{dense}.parquet"
            pq.write_table(table, path, compression="zstd")
            size = path.stat().st_size / len(uris)
            kept = np.mean([len(v) for v in table.column("logit_indices").to_pylist()])
            tags = np.mean([len(v) for v in table.column("tags").to_pylist()])
            per_column = {
                c: table.column(c).nbytes / len(uris)
                for c in ("embedding", "logit_indices", "logit_values", "tags", "scores")
            }
            label = "dense logits" if dense else "sparse logits (default, p >= 0.01)"
            print(
                f"{label}: {size:,.0f} bytes/image on disk (zstd); "
                f"{tags:.1f} tags and {kept:,.0f} logits kept per image; "
                "in memory per image: " + ", ".join(f"{k} {v:,.0f} B" for k, v in per_column.items())
            )
        print(f"({len(uris)} images, {args.tags:,} tags, {args.dim}-d float16 embedding)")


if __name__ == "__main__":
    main()
