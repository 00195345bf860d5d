"""Model bundles: a directory holding an ONNX tagger and its side files.

One loader serves every family; the profile says which file holds what. Optional
files that are missing switch their feature off (said once in the log). Nothing is
unpickled: .npz files load with allow_pickle=False and JSON with the json module.

Why this module is long: a model folder holds many small file formats (five vocabulary
formats, tag metrics, calibration, OOD reference, metadata) and the order in which its
profile is found; each is a few lines and they share the folder's checks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from pipeline.core.errors import BundleError
from pipeline.core.words import counted
from pipeline.model.profile_import import find_config, import_profile
from pipeline.model.profiles import Profile, VocabularyFormat, load_profile

log = logging.getLogger(__name__)

# Category names are lower-case; WD's selected_tags.csv numbers them like Danbooru.
WD_CATEGORIES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta", 9: "rating"}
# Which shipped profile a directory's files point to, tried in this order.
LAYOUT_HINTS = [
    ("model_vocabulary.json", "cl_tagger_v2"),
    ("selected_tags.csv", "wd_v3"),
    ("top_tags.txt", "joytag"),
    ("tags.json", "jtp1"),
]
BUNDLE_PROFILE_FILE = "tagpipe_profile.toml"  # a bundle may carry its own profile
EMBEDDING_OUTPUT = "embedding"  # the output name `tagpipe model expose-embedding` adds


@dataclass(frozen=True)
class Vocabulary:
    """Tag names and their categories, index-aligned with the model's output."""

    tags: tuple[str, ...]
    categories: tuple[str, ...]  # one per tag

    def __len__(self) -> int:
        return len(self.tags)

    def category_names(self) -> list[str]:
        return sorted(set(self.categories))

    def counts_by_category(self) -> dict[str, int]:
        names, counts = np.unique(np.asarray(self.categories), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}


@dataclass(frozen=True)
class TagMetrics:
    best_thr: np.ndarray | None  # [T] per-tag thresholds maximising F1
    best_f1: np.ndarray | None
    calibration_table: np.ndarray | None  # [T, 100]


@dataclass(frozen=True)
class OodReference:
    mu: np.ndarray  # [D]
    cov_inv: np.ndarray  # [D, D]
    p50: float
    p95: float


@dataclass(frozen=True)
class Fingerprint:
    """sha256 digests identifying a bundle by content, never by name."""

    model_sha256: str  # graph, weights and vocabulary: a change means re-inference
    calibration_sha256: str  # tag metrics and OOD reference: a change means rethreshold
    files: dict[str, str] = field(default_factory=dict)  # relative name -> sha256


@dataclass(frozen=True)
class ModelBundle:
    directory: Path
    name: str
    profile: Profile
    model_path: Path
    data_files: tuple[Path, ...]  # external weight files the graph refers to
    vocabulary: Vocabulary
    tag_metrics: TagMetrics | None
    ood_reference: OodReference | None
    metadata: dict
    output_width: int | None  # from the graph; None if symbolic
    embedding_width: int | None  # the embedding output's width from the graph; None if symbolic or absent
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    fingerprint: Fingerprint

    @property
    def embedding_output(self) -> str | None:
        """The output holding the pooled embedding: the one the profile names, else one
        called `embedding` (what `tagpipe model expose-embedding` adds); None if neither."""
        for name in (self.profile.embedding_name, EMBEDDING_OUTPUT):
            if name is not None and name in self.output_names and name != self.profile.output_name:
                return name
        return None

    @property
    def has_embedding_output(self) -> bool:
        return self.embedding_output is not None

    def optional_files(self) -> dict[str, bool]:
        files = self.profile.files
        return {
            name: bool(path) and (self.directory / str(path)).is_file()
            for name, path in (
                ("tag_metrics", files.tag_metrics),
                ("ood_reference", files.ood_reference),
                ("metadata", files.metadata),
            )
        }


def detect_profile(directory: Path) -> Profile:
    """A bundle's own tagpipe_profile.toml wins; then side files that name a shipped
    family (its profile describes that family's ONNX export, which may take other
    pixels than the PyTorch config beside it: WD v3 takes BGR 0-255); then a profile
    imported from the model's own config (timm or Hugging Face), said in the log."""
    own = directory / BUNDLE_PROFILE_FILE
    if own.is_file():
        return load_profile(own)
    for hint, profile_name in LAYOUT_HINTS:
        if (directory / hint).is_file():
            return load_profile(profile_name)
    config = find_config(directory)
    if config is not None:
        profile = import_profile(directory, config)
        log.info(
            "profile: imported from %s (`tagpipe model profile --from %s` writes it to a file)",
            config,
            directory,
        )
        return profile
    if not any(directory.glob("*.onnx")):  # no model at all: --profile would not help
        raise BundleError(f"{directory}: no ONNX model (*.onnx) here: is this a model folder?")
    raise BundleError(
        f"{directory}: cannot tell the model family "
        "(no model_vocabulary.json, selected_tags.csv, top_tags.txt, "
        f"tags.json, {BUNDLE_PROFILE_FILE}, preprocessor_config.json or timm config.json); pass --profile"
    )


def load_bundle(directory: str | Path, profile: Profile | str | Path | None = None) -> ModelBundle:
    """Load and cross-check a bundle. Raises BundleError before any image is touched."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"model directory not found: {directory}")
    if profile is None:
        profile = detect_profile(directory)
    elif not isinstance(profile, Profile):
        profile = load_profile(profile)
    model_path = _find_model(directory, profile.files.model)
    try:
        graph = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others
        raise BundleError(f"{model_path}: not a readable ONNX model ({exc})") from None
    data_files = _external_data_files(graph, model_path.parent)
    input_names = tuple(
        i.name for i in graph.graph.input if i.name not in {t.name for t in graph.graph.initializer}
    )
    output_names = tuple(o.name for o in graph.graph.output)
    output_name = profile.output_name or output_names[0]
    if output_name not in output_names:
        raise BundleError(
            f"{model_path}: profile {profile.name} expects output {output_name!r}; "
            f"model has {list(output_names)}"
        )
    input_name = profile.input_name or input_names[0]
    if input_name not in input_names:
        raise BundleError(
            f"{model_path}: profile {profile.name} expects input {input_name!r}; "
            f"model has {list(input_names)}"
        )
    output_width = _static_last_dim(graph, output_name)
    _check_input_size(graph, input_name, profile, model_path)

    vocabulary = load_vocabulary(directory / profile.files.vocabulary, profile.files.vocabulary_format)
    if output_width is not None and output_width != len(vocabulary):
        raise BundleError(
            f"{directory}: the model's output {output_name!r} has {counted(output_width, 'tags')} but "
            f"{profile.files.vocabulary} lists {len(vocabulary)}: model and vocabulary do not belong together"
        )
    tag_metrics = _load_tag_metrics(directory, profile, len(vocabulary))
    ood_reference = _load_ood_reference(directory, profile)
    metadata = _load_metadata(directory, profile)
    side_files = [directory / p for p in (profile.files.vocabulary,)]
    calibration_files = [
        directory / p
        for p in (profile.files.tag_metrics, profile.files.ood_reference)
        if p and (directory / p).is_file()
    ]
    fingerprint = compute_fingerprint(directory, [model_path, *data_files, *side_files], calibration_files)
    return ModelBundle(
        directory=directory,
        name=str(metadata.get("name") or metadata.get("model_name") or directory.name),
        profile=profile,
        model_path=model_path,
        data_files=tuple(data_files),
        vocabulary=vocabulary,
        tag_metrics=tag_metrics,
        ood_reference=ood_reference,
        metadata=metadata,
        output_width=output_width,
        embedding_width=_embedding_width(graph, profile, output_names),
        input_names=input_names,
        output_names=output_names,
        fingerprint=fingerprint,
    )


def _check_input_size(graph: onnx.ModelProto, input_name: str, profile: Profile, model_path: Path) -> None:
    """A model with a fixed input size must get the profile's: otherwise the in-graph
    path feeds it other sizes and gets answers, and the numpy path fails every row."""
    value = next(i for i in graph.graph.input if i.name == input_name)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
    if len(dims) != 4:
        return
    nhwc = profile.preprocess.layout.value == "NHWC"
    height, width = (dims[1], dims[2]) if nhwc else (dims[2], dims[3])
    channels = dims[3] if nhwc else dims[1]
    if channels not in (None, 3):
        raise BundleError(_layout_mismatch(dims, nhwc, input_name, profile, model_path))
    want = profile.input_size
    if (width and width != want[0]) or (height and height != want[1]):
        raise BundleError(
            f"{model_path}: input {input_name!r} takes {width}x{height} but profile {profile.name} "
            f"gives {want[0]}x{want[1]} (preprocess.input_size): model and profile do not belong together"
        )


def _layout_mismatch(dims: list, nhwc: bool, input_name: str, profile: Profile, model_path: Path) -> str:
    """A model whose channels sit where the other layout puts them was given a profile
    made for another model (`--profile wd_v3` on a CL bundle): say so, naming the profile,
    not the layout setting inside it; only a model that fits neither layout is the layout's."""
    layout = profile.preprocess.layout.value
    other_channels = dims[1] if nhwc else dims[3]
    if other_channels != 3:
        return (
            f"{model_path}: input {input_name!r} has {dims[3] if nhwc else dims[1]} channels where the "
            f"profile's {layout} layout puts them; check preprocess.layout"
        )
    model_layout = "NCHW" if nhwc else "NHWC"
    return (
        f"{model_path}: profile {profile.name} does not fit this model: it feeds {layout} images, the "
        f"model's input {input_name!r} takes {model_layout}; give the model's own profile (--profile, "
        "or none to detect it)"
    )


def _embedding_width(graph: onnx.ModelProto, profile: Profile, output_names: tuple[str, ...]) -> int | None:
    for name in (profile.embedding_name, EMBEDDING_OUTPUT):
        if name is not None and name in output_names and name != profile.output_name:
            return _static_last_dim(graph, name)
    return None


def _find_model(directory: Path, preferred: str) -> Path:
    path = directory / preferred
    if path.is_file():
        return path
    candidates = sorted(directory.glob("*.onnx"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise BundleError(f"{directory}: no ONNX model ({preferred} or any *.onnx)")
    raise BundleError(
        f"{directory}: several ONNX files and none named {preferred}: {[c.name for c in candidates]}"
    )


def _external_data_files(graph: onnx.ModelProto, base: Path) -> list[Path]:
    locations = set()
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    paths = []
    for location in sorted(locations):
        path = (base / location).resolve()
        if base.resolve() not in path.parents:
            raise BundleError(f"{base}: external data location {location!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"{base}: the model's external weights {location!r} are missing")
        paths.append(path)
    return paths


def _static_last_dim(graph: onnx.ModelProto, name: str) -> int | None:
    for output in graph.graph.output:
        if output.name == name:
            dims = output.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    return None


def load_vocabulary(path: Path, fmt: VocabularyFormat) -> Vocabulary:
    if not path.is_file():
        raise BundleError(f"vocabulary file missing: {path}")
    try:
        if fmt is VocabularyFormat.WD_CSV:
            return _wd_csv(path)
        if fmt is VocabularyFormat.LINES:
            tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return Vocabulary(tuple(tags), ("general",) * len(tags))
        data = json.loads(path.read_text(encoding="utf-8"))
        if fmt is VocabularyFormat.CONFIG_LABELS:
            return _config_labels(data, path)
        if fmt is VocabularyFormat.TAG_INDEX_JSON:
            return _from_index_map({str(k): int(v) for k, v in data.items()}, {}, path)
        return _cl_json(data, path)
    except BundleError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{path}: unreadable {fmt.value} vocabulary ({exc})") from None


def _wd_csv(path: Path) -> Vocabulary:
    tags, categories = [], []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            tags.append(row["name"])
            categories.append(WD_CATEGORIES.get(int(row["category"]), f"category_{row['category']}"))
    return Vocabulary(tuple(tags), tuple(categories))


def _config_labels(data: dict, path: Path) -> Vocabulary:
    """Class names from a model's config.json: Hugging Face's id2label {"0": name} or
    timm's label_names [name, ...]. No categories: every class is `general`."""
    if isinstance(data.get("id2label"), dict):
        index = {str(name): int(i) for i, name in data["id2label"].items()}
        return _from_index_map(index, {}, path)
    if isinstance(data.get("label_names"), list):
        return _from_index_map({str(name): i for i, name in enumerate(data["label_names"])}, {}, path)
    raise BundleError(f"{path}: no id2label (Hugging Face) or label_names (timm) to name the classes")


def _cl_json(data: dict, path: Path) -> Vocabulary:
    """CL Tagger v2 vocabulary; idx_to_tag may be a list or {"0": tag}, categories names or ids."""
    raw = data.get("idx_to_tag")
    if raw is None and "tag_to_idx" in data:
        index = {str(k): int(v) for k, v in data["tag_to_idx"].items()}
    elif isinstance(raw, list):
        index = {str(tag): i for i, tag in enumerate(raw)}
    elif isinstance(raw, dict):
        index = {str(tag): int(i) for i, tag in raw.items()}
    else:
        raise BundleError(f"{path}: no idx_to_tag or tag_to_idx")
    names = data.get("categories")

    def category_name(value) -> str:
        if isinstance(value, dict):  # {"name": ..., ...}
            value = value.get("name", "general")
        if isinstance(names, list) and isinstance(value, int) and 0 <= value < len(names):
            value = names[value]
        elif isinstance(names, dict) and str(value) in names:
            value = names[str(value)]
        if isinstance(value, dict):
            value = value.get("name", "general")
        return str(value).strip().lower().replace("-", "_") or "general"

    tag_to_category = {tag: category_name(c) for tag, c in data.get("tag_to_category", {}).items()}
    return _from_index_map(index, tag_to_category, path)


def _from_index_map(index: dict[str, int], tag_to_category: dict[str, str], path: Path) -> Vocabulary:
    width = len(index)
    slots: list[str | None] = [None] * width
    for tag, i in index.items():
        if not 0 <= i < width or slots[i] is not None:
            raise BundleError(
                f"{path}: tag indices are not 0..{width - 1} without gaps or repeats (at {tag!r} -> {i})"
            )
        slots[i] = tag
    tags = tuple(t for t in slots if t is not None)  # every slot is filled: width = len(index), no repeats
    return Vocabulary(tags, tuple(tag_to_category.get(t, "general") for t in tags))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise BundleError(f"{path}: refused ({exc}); side files must hold plain numeric arrays") from None
    except Exception as exc:
        raise BundleError(f"{path}: not a readable .npz ({exc})") from None


def _optional(directory: Path, name: str | None, feature: str) -> Path | None:
    if not name:
        return None
    path = directory / name
    if not path.is_file():
        log.info("%s: %s not present; %s is off", directory, name, feature)
        return None
    return path


def _load_tag_metrics(directory: Path, profile: Profile, width: int) -> TagMetrics | None:
    path = _optional(directory, profile.files.tag_metrics, "calibration and per-tag thresholds")
    if path is None:
        return None
    arrays = _load_npz(path)
    table = arrays.get("calibration_table")
    if table is not None and table.shape != (width, 100):
        raise BundleError(f"{path}: calibration_table has shape {table.shape}, expected ({width}, 100)")
    for key in ("best_thr", "best_f1"):
        if key in arrays and arrays[key].shape != (width,):
            raise BundleError(f"{path}: {key} has shape {arrays[key].shape}, expected ({width},)")
    return TagMetrics(
        best_thr=arrays.get("best_thr", None),
        best_f1=arrays.get("best_f1", None),
        calibration_table=None if table is None else table.astype(np.float32),
    )


def _load_ood_reference(directory: Path, profile: Profile) -> OodReference | None:
    path = _optional(directory, profile.files.ood_reference, "OOD distance")
    if path is None:
        return None
    arrays = _load_npz(path)
    missing = {"mu", "cov_inv", "p50", "p95"} - set(arrays)
    if missing:
        raise BundleError(f"{path}: missing arrays {sorted(missing)}")
    mu, cov_inv = arrays["mu"].astype(np.float32), arrays["cov_inv"].astype(np.float32)
    if mu.ndim != 1 or cov_inv.shape != (mu.size, mu.size):
        raise BundleError(f"{path}: mu {mu.shape} and cov_inv {cov_inv.shape} do not fit together")
    return OodReference(mu=mu, cov_inv=cov_inv, p50=float(arrays["p50"]), p95=float(arrays["p95"]))


def _load_metadata(directory: Path, profile: Profile) -> dict:
    path = _optional(directory, profile.files.metadata, "model metadata")
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def compute_fingerprint(
    directory: Path, model_files: list[Path], calibration_files: list[Path]
) -> Fingerprint:
    files = {
        str(p.resolve().relative_to(directory.resolve())): file_sha256(p)
        for p in [*model_files, *calibration_files]
    }

    def combine(paths: list[Path]) -> str:
        digest = hashlib.sha256()
        for p in sorted(paths, key=lambda q: str(q.resolve())):
            name = str(p.resolve().relative_to(directory.resolve()))
            digest.update(f"{name}\0{files[name]}\n".encode())
        return digest.hexdigest()

    return Fingerprint(
        model_sha256=combine(model_files), calibration_sha256=combine(calibration_files), files=files
    )
