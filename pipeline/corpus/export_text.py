"""One row of a tag table as the text an export writes: caption tags, a JSONL record, a
Dart v2 prompt, and the caption file's path. Pure functions of the row and the options;
pipeline/corpus/export.py reads the rows and writes the files.

Tag text options: underscores or spaces, escaped parentheses (for prompt syntaxes where
"(" means emphasis), an exclude list. Tags keep the stored order (by score). Captions
also take the options kohya sd-scripts' tag_images_by_wd14_tagger.py users rely on
(CaptionOptions).
"""

from __future__ import annotations

import enum
import json
import posixpath
from dataclasses import dataclass

from pipeline.core.errors import TagpipeError
from pipeline.corpus.supplement import supplement_record

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


class ExportFormat(enum.StrEnum):
    """What `tagpipe export` writes (each one writer, pipeline/corpus/export.py WRITERS)."""

    CAPTIONS = "captions"
    JSONL = "jsonl"
    DART = "dart"


class ExistingFiles(enum.StrEnum):
    """What an export does with output files already there."""

    REFUSE = "refuse"
    OVERWRITE = "overwrite"
    SKIP = "skip"


class RatingPlace(enum.StrEnum):
    """Where a caption puts the rating tag: as stored (by score), first, last, or nowhere."""

    INLINE = "inline"
    FIRST = "first"
    LAST = "last"
    OMIT = "omit"


RATING_PLACES = tuple(p.value for p in RatingPlace)


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
        for flag, check, value in (
            ("--caption-extension", check_extension, self.extension),
            ("--separator", check_separator, self.separator),
        ):
            try:
                check(value)
            except ValueError as exc:
                raise TagpipeError(f"{flag} {value!r}: {exc}") from None


def check_extension(value: str) -> str:
    """A caption file's extension (also the export settings' check)."""
    if not value.startswith(".") or "/" in value:
        raise ValueError("expected an extension such as .txt")
    return value


def check_separator(value: str) -> str:
    if not value.strip():
        raise ValueError("needs a visible character, e.g. ', '")
    return value


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


def jsonl_line(row: dict, text: TextOptions) -> str:
    """A JSONL export's line (no newline) of one row: supplement mode's when the row has
    provenance, else its tags by category, scores, rating and size."""
    if "provenance" in row:
        record = supplement_record(row, lambda tag: text.format([tag])[0], text.exclude)
    else:
        record = {k: text.format(v) for k, v in row.items() if k == "tags" or k.startswith("tags_")}
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
    return json.dumps(record, ensure_ascii=False)


def dart_line(row: dict, text: TextOptions) -> str:
    """A Dart export's line (no newline) of one row: its uri and its prompt."""
    return json.dumps({"uri": row["uri"], "prompt": dart_prompt(row, text)}, ensure_ascii=False)


# The line of each format written one line per image (captions are files of their own).
LINES = {ExportFormat.JSONL: jsonl_line, ExportFormat.DART: dart_line}


def row_line(row: dict, fmt: str, text: TextOptions) -> str:
    """The JSONL line (no newline) of one row in a line format (jsonl or dart)."""
    return LINES[ExportFormat(fmt)](row, text)


def caption_text(row: dict, text: TextOptions, caption: CaptionOptions, existing: str | None) -> str:
    """A caption file's content; existing: the caption already there, to append to."""
    tags_text = caption_tags(row, text, caption)
    if existing is not None:
        tags_text = merge_caption(existing, tags_text, caption.separator)
    return caption.separator.join(tags_text) + "\n"
