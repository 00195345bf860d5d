"""`tagpipe export`: tag outputs as the files training tools read.

  captions  one .txt per image, comma-separated tags (kohya sd-scripts reads these),
            at the image's path relative to a root, under the output directory
  jsonl     one JSON object per image: uri, tags by category, scores, rating, size
  dart      one Dart v2 prompt per image (JSONL with uri and prompt):
            <|bos|><copyright>..</copyright><character>..</character>
            <|rating:R|><|aspect_ratio:A|><|length:L|><general>..<|identity:none|><|input_end|>

Supplement mode (pipeline/corpus/supplement.py) writes the human tags merged with the
model's: captions get the merged list, JSONL rows each tag's provenance (source, model,
both), applying a reviewer's decisions from `tagpipe review` queue files.

Rows with errors are skipped (and counted). Tag text options: underscores or spaces,
escaped parentheses (for prompt syntaxes where "(" means emphasis), an exclude list.
Tags keep the stored order (by score).

Captions also take the options kohya sd-scripts' tag_images_by_wd14_tagger.py users
rely on (CaptionOptions): the file extension, the separator, tags always first (trigger
words), character tags first, the rating tag first, last or left out, tag replacements,
character tags expanded (`name_(series)` -> `name, series`), and appending to existing
captions without repeating a tag.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field

from pipeline.core.errors import TagpipeError
from pipeline.corpus.supplement import (
    Decisions,
    SupplementCounts,
    check_supplement,
    supplement_record,
    supplement_rows,
)
from pipeline.storage.filesystem import filesystem_for, is_local, write_atomic
from pipeline.table.reading import read_parquet

FORMATS = ("captions", "jsonl", "dart")
# Danbooru tags that are emoticons keep their underscores (as the wd-tagger demo does)
KAOMOJIS = frozenset(
    {
        "0_0",
        "(o)_(o)",
        "+_+",
        "+_-",
        "._.",
        "<o>_<o>",
        "<|>_<|>",
        "=_=",
        ">_<",
        "3_3",
        "6_9",
        ">_o",
        "@_@",
        "^_^",
        "o_o",
        "u_u",
        "x_x",
        "|_|",
        "||_||",
    }
)
DART_RATINGS = {
    "safe": "general",
    "general": "general",
    "sensitive": "sensitive",
    "questionable": "questionable",
    "explicit": "explicit",
}


@dataclass(frozen=True)
class TextOptions:
    spaces: bool = False  # "long_hair" -> "long hair"
    escape_parentheses: bool = False  # "(" -> "\\("
    exclude: frozenset[str] = frozenset()
    with_rating: bool = True  # keep rating/quality winners in captions

    def format(self, tags: list[str] | None) -> list[str]:
        out = []
        for tag in tags or []:
            if tag in self.exclude:
                continue
            text = tag.replace("_", " ") if self.spaces and tag not in KAOMOJIS else tag
            if self.escape_parentheses:
                text = text.replace("(", "\\(").replace(")", "\\)")
            out.append(text)
        return out


RATING_PLACES = ("inline", "first", "last", "omit")


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption file is written, beyond the tag text (kohya sd-scripts' options).

    Order of work: rating placement and character-first reorder the stored tags; then
    each tag is dropped (exclude, either spelling), replaced, expanded and formatted;
    always-first tags move to the front in the order given; repeats are dropped."""

    extension: str = ".txt"
    separator: str = ", "
    always_first: tuple[str, ...] = ()
    character_first: bool = False
    rating: str = "inline"  # inline (stored order) | first | last | omit
    replace: tuple[tuple[str, str], ...] = ()  # (old, new): a stored tag name or its written form
    character_expand: bool = False
    append: bool = False  # merge into an existing caption file: its tags first, then new ones

    def __post_init__(self):
        if self.rating not in RATING_PLACES:
            raise TagpipeError(f"--rating {self.rating!r}: choose one of {', '.join(RATING_PLACES)}")
        if not self.extension.startswith(".") or "/" in self.extension:
            raise TagpipeError(f"--caption-extension {self.extension!r}: expected an extension such as .txt")
        if not self.separator.strip():
            raise TagpipeError(f"--separator {self.separator!r}: needs a visible character, e.g. ', '")


def caption_tags(row: dict, text: TextOptions, caption: CaptionOptions) -> list[str]:
    """The written tags of one row's caption, in order."""
    rating, quality = row.get("rating"), row.get("quality")
    tags = [t for t in (row["tags"] or []) if text.with_rating or t not in (rating, quality)]
    characters = set(row.get("tags_character") or [])
    if caption.character_first:
        tags = [t for t in tags if t in characters] + [t for t in tags if t not in characters]
    if caption.rating != "inline" and rating in tags:
        tags.remove(rating)
        if caption.rating == "first":
            tags = [rating, *tags]
        elif caption.rating == "last":
            tags = [*tags, rating]
    replacements = dict(caption.replace)
    written: list[str] = []
    for tag in tags:
        (shown,) = TextOptions(spaces=text.spaces).format([tag]) or [tag]
        if tag in text.exclude or shown in text.exclude:
            continue
        tag = replacements.get(tag, replacements.get(shown, tag))
        parts = _expand_character(tag) if caption.character_expand and tag in characters else [tag]
        written.extend(text.format(parts))
    for tag in reversed(caption.always_first):
        for form in (
            tag,
            *TextOptions(spaces=text.spaces, escape_parentheses=text.escape_parentheses).format([tag]),
        ):
            if form in written:
                written.remove(form)
                written.insert(0, form)
                break
    return list(dict.fromkeys(written))


def _expand_character(tag: str) -> list[str]:
    """kohya's --character_tag_expand: `name_(series)` -> `name`, `series`;
    `name_(costume)_(series)` -> `name_(costume)`, `series`."""
    if not tag.endswith(")") or "(" not in tag:
        return [tag]
    head, _, series = tag.rpartition("(")
    return [head.rstrip("_"), series.rstrip(")")]


def merge_caption(existing: str, new: list[str], separator: str) -> list[str]:
    """kohya's --append_tags: the existing caption's tags, then the new ones it lacks."""
    old = [t.strip() for t in existing.strip("\n").split(separator.strip()) if t.strip()]
    seen = {t.replace("_", " ") for t in old}  # long_hair and long hair are one tag
    return old + [t for t in new if t.replace("_", " ") not in seen]


@dataclass
class ExportSummary:
    written: int = 0  # files written
    skipped_existing: int = 0  # files already there, left as they were (--skip-existing)
    skipped_errors: int = 0  # error rows: nothing to write for them
    files: list = field(default_factory=list)
    supplement: SupplementCounts | None = None  # supplement mode's counts

    def text(self) -> str:
        kept = f", {self.skipped_existing} existing files left as they were" if self.skipped_existing else ""
        line = f"export: {self.written} files written{kept}, {self.skipped_errors} error rows skipped"
        return line + (self.supplement.text() if self.supplement else "")


def aspect_bucket(width: int, height: int) -> str:
    ratio = width / height
    if ratio >= 2:
        return "ultra_wide"
    if ratio > 9 / 8:
        return "wide"
    if ratio >= 8 / 9:
        return "square"
    if ratio > 1 / 2:
        return "tall"
    return "ultra_tall"


def length_bucket(count: int) -> str:
    for limit, name in ((10, "very_short"), (20, "short"), (30, "medium"), (40, "long")):
        if count <= limit:
            return name
    return "very_long"


def dart_prompt(row: dict, text: TextOptions) -> str:
    dart_text = TextOptions(
        spaces=True, escape_parentheses=False, exclude=text.exclude
    )  # Dart's vocabulary uses spaces
    general = dart_text.format(row.get("tags_general"))
    rating = DART_RATINGS.get((row.get("rating") or "general").lower(), "general")
    return (
        "<|bos|>"
        f"<copyright>{', '.join(dart_text.format(row.get('tags_copyright')))}</copyright>"
        f"<character>{', '.join(dart_text.format(row.get('tags_character')))}</character>"
        f"<|rating:{rating}|><|aspect_ratio:{aspect_bucket(row['width'], row['height'])}|>"
        f"<|length:{length_bucket(len(general))}|>"
        f"<general>{', '.join(general)}<|identity:none|><|input_end|>"
    )


MAX_NAME_BYTES = 255  # one path component on common filesystems


def caption_path(relative_key: str, extension: str = ".txt") -> str:
    """The caption file for an image key, relative to the export root, that can never
    leave it. Object keys may hold `..`, `.`, empty segments (`a//b`, a leading slash)
    and names longer than a filesystem allows: those segments become "%2E%2E", "%2E"
    and "%2F", and long names are cut and given a hash of themselves. Ordinary keys
    keep their path, so a caption still sits beside its image; a key that would meet
    another's caption is refused by the caller, never overwritten."""
    *folders, name = relative_key.split("/")
    stem = _safe_segment(name) if name in ("", ".", "..") else posixpath.splitext(name)[0]
    return posixpath.join(*[_safe_segment(s) for s in folders], _shorten(stem, extension))


def _safe_segment(segment: str) -> str:
    if segment in ("", ".", ".."):
        return segment.replace(".", "%2E") or "%2F"
    return _shorten(segment, "")


def _shorten(stem: str, suffix: str) -> str:
    if len((stem + suffix).encode()) <= MAX_NAME_BYTES:
        return stem + suffix
    import hashlib

    digest = hashlib.sha256(stem.encode()).hexdigest()[:16]
    room = MAX_NAME_BYTES - len(f"-{digest}") - len(suffix.encode())
    return stem.encode()[:room].decode(errors="ignore") + f"-{digest}" + suffix


def _common_root(uris: list[str]) -> str:
    return posixpath.dirname(os.path.commonprefix(uris)) if len(uris) > 1 else posixpath.dirname(uris[0])


EXISTING_FILES = ("refuse", "overwrite", "skip")  # what to do with output files already there


def export_tags(
    tags: str,
    output: str,
    fmt: str,
    text: TextOptions = TextOptions(),
    relative_to: str | None = None,
    storage_options: dict | None = None,
    caption: CaptionOptions = CaptionOptions(),
    existing: str = "refuse",
    supplement: Decisions | None = None,
) -> ExportSummary:
    """Plan every output file, refuse collisions and files already there (unless told to
    overwrite, skip or append to them) before writing any, then write each atomically.
    supplement: merge the source tags with the model's, with these reviewer decisions."""
    if fmt not in FORMATS:
        raise TagpipeError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if existing not in EXISTING_FILES:
        raise TagpipeError(f"existing={existing!r}: choose one of {', '.join(EXISTING_FILES)}")
    table = read_parquet(tags, storage_options)
    if supplement is not None:
        check_supplement(table.column_names, tags, fmt)
    rows = table.sort_by("uri").to_pylist()
    summary = ExportSummary()
    good = [r for r in rows if r["error"] is None]
    summary.skipped_errors = len(rows) - len(good)
    if supplement is not None:
        good, summary.supplement = supplement_rows(good, supplement)
    out_fs, out_path = filesystem_for(output, storage_options)
    plan = (
        _caption_plan(good, relative_to, out_path, caption.extension)
        if fmt == "captions"
        else _file_plan(good, fmt, out_path)
    )
    present = _present(out_fs, out_path, [target for target, _ in plan])
    if present and existing == "refuse" and not (fmt == "captions" and caption.append):
        example = ", ".join(sorted(present)[:3])
        raise TagpipeError(
            f"{len(present)} of the {len(plan)} files to write already exist (e.g. {example}); "
            "nothing was written: "
            f"pass --skip-existing to keep them, --overwrite to replace them"
            + (", or --append to merge captions" if fmt == "captions" else "")
        )
    merging = fmt == "captions" and caption.append
    earlier = (
        {t: _read_text(out_fs, t) for t, _ in plan if t in present} if merging else {}
    )  # read all before any write
    for target, content in plan:
        if target in present and existing == "skip":
            summary.skipped_existing += 1
            continue
        data = content(text, caption, earlier.get(target))
        write_atomic(_uri(out_fs, target), data.encode(), storage_options=storage_options)
        summary.files.append(target)
        summary.written += 1
    return summary


def _caption_plan(good: list[dict], relative_to: str | None, out_path: str, extension: str) -> list:
    """(target, content) for every caption; two images meeting in one file are refused here."""
    if relative_to and "://" not in relative_to:
        relative_to = os.path.abspath(relative_to)  # image URIs of local inputs are absolute
    root = (relative_to or (_common_root([r["uri"] for r in good]) if good else "")).rstrip("/")
    owners: dict[str, str] = {}
    plan = []
    for row in good:
        if not row["uri"].startswith(root + "/"):
            raise TagpipeError(f"{row['uri']} is not under --relative-to {root}; nothing was written")
        target = posixpath.join(out_path, caption_path(row["uri"][len(root) + 1 :], extension))
        if target in owners:
            raise TagpipeError(
                f"{owners[target]} and {row['uri']} would write the same caption file {target}; "
                "nothing was written"
            )
        owners[target] = row["uri"]
        plan.append((target, _caption_content(row)))
    return plan


def _caption_content(row: dict):
    def content(text: TextOptions, caption: CaptionOptions, existing: str | None) -> str:
        tags_text = caption_tags(row, text, caption)
        if existing is not None:
            tags_text = merge_caption(existing, tags_text, caption.separator)
        return caption.separator.join(tags_text) + "\n"

    return content


def _file_plan(good: list[dict], fmt: str, out_path: str) -> list:
    def content(text: TextOptions, caption: CaptionOptions, existing: str | None) -> str:
        lines = []
        for row in good:
            if fmt == "jsonl" and "provenance" in row:
                record = supplement_record(row, lambda tag: text.format([tag])[0], text.exclude)
            elif fmt == "jsonl":
                record = {k: v for k, v in row.items() if k == "tags" or k.startswith("tags_")}
                record = {k: text.format(v) for k, v in record.items()}
                record.update(
                    uri=row["uri"],
                    rating=row.get("rating"),
                    quality=row.get("quality"),
                    width=row["width"],
                    height=row["height"],
                )
                record["scores"] = [
                    round(float(s), 4) for t, s in zip(row["tags"], row["scores"]) if t not in text.exclude
                ]
            else:
                record = {"uri": row["uri"], "prompt": dart_prompt(row, text)}
            lines.append(json.dumps(record, ensure_ascii=False))
        return "\n".join(lines) + "\n"

    return [(posixpath.join(out_path, "tags.jsonl" if fmt == "jsonl" else "dart_prompts.jsonl"), content)]


def _present(fs, root: str, targets: list[str]) -> set[str]:
    """Which targets exist, from one listing of the output (not a request per file)."""
    fs.invalidate_cache(root)
    if not fs.exists(root):
        return set()
    norm = os.path.abspath if is_local(fs) else (lambda p: p)
    found = {norm(p) for p in fs.find(root, withdirs=False)}
    return {t for t in targets if norm(t) in found}


def _read_text(fs, path: str) -> str:
    try:
        return fs.cat_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise TagpipeError(
            f"{path}: an existing caption that is not UTF-8 text; nothing was written"
        ) from None


def _uri(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if is_local(fs) else f"{protocol}://{path}"
