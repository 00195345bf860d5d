"""Errors a user can act on, and the one list of error kinds a row can carry.

Exceptions: each message names the file or field at fault. ErrorKind: the stable
short codes in a tag row's `error_kind` column (README, "Error kinds", lists the same
table; tests/core/test_error_kinds.py checks they agree).
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """What the command line's exit status means, the same for every command (README,
    "Exit statuses"): a script gating on it never reads a failure or an incomplete
    check as success."""

    OK = 0
    LEAKS = 1  # audit, nightly: eval images that copy train images (also Python's status for a crash)
    ERROR = 2  # one `error:` line: nothing (more) was done; also a usage error
    DRIFT = 3  # nightly: the run's version drifted past the [nightly.drift] limits
    UNCHECKED = 4  # audit, nightly: no leak found, but some eval images could not be checked
    INTERRUPTED = 130  # Ctrl-C


class TagpipeError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(TagpipeError):
    """A config file, profile or option has a bad value."""


class BundleError(TagpipeError):
    """A model bundle is missing files or disagrees with itself."""


class ErrorKind(enum.StrEnum):
    """Why a row has no tags. A str, so it is written to Parquet as its value.

    retryable kinds were transient when they happened (the store, the network, a model
    call that ran out of time): the next run over the same table tries those rows
    again. The others are facts about the file and stay until its bytes change."""

    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED = "unsupported"
    TRUNCATED = "truncated"
    DECODE_ERROR = "decode_error"
    BAD_SIZE = "bad_size"
    TOO_LARGE = "too_large"
    DECODE_TIMEOUT = "decode_timeout"
    NOT_FOUND = "not_found"
    READ_ERROR = "read_error"
    MODEL_ERROR = "model_error"
    MODEL_TIMEOUT = "model_timeout"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE

    @property
    def meaning(self) -> str:
        return _MEANINGS[self]


_RETRYABLE = frozenset({ErrorKind.NOT_FOUND, ErrorKind.READ_ERROR, ErrorKind.MODEL_TIMEOUT})
_MEANINGS = {
    ErrorKind.EMPTY: "zero-byte file",
    ErrorKind.NOT_AN_IMAGE: "no image format recognised (an HTML error page, a text file)",
    ErrorKind.UNSUPPORTED: "a format the installed Pillow cannot read (HEIC, JPEG XL, SVG, PDF, float "
    "TIFF, ...)",
    ErrorKind.TRUNCATED: "the file ends before its image data does, or within its header (a 6-byte GIF)",
    ErrorKind.DECODE_ERROR: "corrupt: a header, chunk, checksum or data stream the decoder rejects",
    ErrorKind.BAD_SIZE: "a declared width or height of zero or less",
    ErrorKind.TOO_LARGE: "over --max-file-bytes, --max-pixels (any frame, tile or sub-image), or the "
    "--max-decode-memory budget",
    ErrorKind.DECODE_TIMEOUT: "decoding took longer than --decode-timeout",
    ErrorKind.NOT_FOUND: "the file was listed but gone when read",
    ErrorKind.READ_ERROR: "the store failed to return the bytes after retries",
    ErrorKind.MODEL_ERROR: "the model rejected this image",
    ErrorKind.MODEL_TIMEOUT: "its model call ran over --batch-timeout",
}
RETRYABLE_ERROR_KINDS: tuple[str, ...] = tuple(sorted(kind.value for kind in _RETRYABLE))
