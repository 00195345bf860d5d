"""The CPU stage: read bytes, decode, preprocess, hash. One bad file never fails a batch.

DecodeStage is a plain callable on a dict-of-arrays batch: run it in a loop in tests,
or hand it to Dataset.map_batches. It emits uint8 pixels at the model's input size
(4x less object-store traffic than float32); normalisation happens next to inference.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
import time
from collections.abc import Sequence

import numpy as np

from pipeline.core.errors import ErrorKind
from pipeline.core.schemas import decoded_batch, geometry_column
from pipeline.image.imaging import DecodeOptions, ImageError, Loaded, decode_image
from pipeline.image.phash import unreliable, warm_up_blas
from pipeline.model.profiles import Preprocess
from pipeline.storage.filesystem import read_bytes

try:  # the per-image memory budget needs Linux (RLIMIT_AS and /proc); elsewhere decode runs without it
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]
MEMORY_LIMIT_WORKS = resource is not None and os.path.exists("/proc/self/statm")
TIME_LIMIT_WORKS = hasattr(signal, "setitimer")

DEFAULT_DECODE_TIMEOUT = 60.0  # seconds per image
DEFAULT_MAX_FILE_BYTES = 512 * 1024**2  # larger files are error rows, never read whole


class DecodeTimeout(ImageError):
    def __init__(self, seconds: float):
        super().__init__(ErrorKind.DECODE_TIMEOUT, f"decoding took longer than the {seconds:g} s limit")


def address_space() -> int:
    """This process's virtual memory size in bytes (what RLIMIT_AS counts)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * resource.getpagesize()


# glibc can hand a thread memory its arena reserved earlier and released with
# MADV_DONTNEED: touching it again raises RSS without new address space. A heap of a
# thread arena is at most 64 MiB (HEAP_MAX_SIZE), about what this slack measured in a
# Ray worker (docs/decisions.md, 'Decode memory: an address-space limit around each
# image'), so the address-space limit leaves that much of the budget aside.
ALLOCATOR_SLACK = 64 * 1024**2


@contextlib.contextmanager
def memory_limit(budget: int):
    """Let the code below raise this process's RSS by at most about `budget` bytes.

    RLIMIT_AS is set to the current address space plus the budget (less the allocator's
    slack), and restored after: an allocation past it fails, which Pillow, libjpeg,
    libtiff, OpenJPEG and NumPy turn into MemoryError or a decoder error, and the process
    lives on. Limiting address space also stops memory reserved and never touched.
    Like time_limit, it acts on the main thread only (Ray runs task code there): the
    limit is process-wide, and threads decoding side by side would share one budget."""
    if not budget or not MEMORY_LIMIT_WORKS or threading.current_thread() is not threading.main_thread():
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space() + max(budget - ALLOCATOR_SLACK, budget // 2)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)  # a tighter limit someone set stays
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        _always(lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard)))


def _always(step) -> None:
    """Run a clean-up step to the end even if the time limit's signal interrupts it (it
    fires every 0.1 s until disarmed): a limit left in force would fail every later image."""
    while True:
        try:
            step()
            return
        except DecodeTimeout:
            continue


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise DecodeTimeout in the code below once it has run `seconds`.

    A SIGALRM handler raises it between Python steps (Pillow feeds its decoders from a
    Python loop, so a slow decode is interrupted within one chunk). It fires again every
    0.1 s, so a handler that swallows one exception does not let the image run on. Ray
    runs task code on the worker's main thread, where signals can be used; elsewhere
    (a thread), the limit is checked when the decode returns instead."""
    if not seconds or not TIME_LIMIT_WORKS or threading.current_thread() is not threading.main_thread():
        started = time.monotonic()
        yield
        if seconds and time.monotonic() - started > seconds:
            raise DecodeTimeout(seconds)
        return

    def expired(signum, frame):
        raise DecodeTimeout(seconds)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        yield
    finally:
        _always(lambda: signal.setitimer(signal.ITIMER_REAL, 0))
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def _meter() -> tuple[float, int]:
    """Now, and this process's address space (what the memory limit counts)."""
    return time.monotonic(), address_space() if MEMORY_LIMIT_WORKS else 0


class DecodeStage:
    """preprocess: the distinct preprocessings of a pass's models (one Preprocess is a
    pass of one). Each file is read and hashed once and decoded once per distinct draft
    (imaging.open_image); preprocessing g's columns are named by schemas.geometry_column
    (the first one's by their plain names)."""

    def __init__(
        self,
        preprocess: Preprocess | Sequence[Preprocess],
        options: DecodeOptions = DecodeOptions(),
        storage_options: dict | None = None,
        timeout: float = DEFAULT_DECODE_TIMEOUT,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ):
        self.preprocesses = tuple(preprocess) if not isinstance(preprocess, Preprocess) else (preprocess,)
        self.options = options
        self.storage_options = storage_options or {}
        self.timeout = timeout  # seconds per image's decode; 0: none
        self.max_file_bytes = max_file_bytes  # at most this much of a file is read
        warm_up_blas()  # before any memory limit: see phash.warm_up_blas

    def _decode(self, data: bytes, pre: Preprocess, loaded: Loaded):
        """One image under the time limit and the memory budget. Raises ImageError.

        The time limit's exception is raised wherever the decode happens to be, and code
        there may turn it into another (an enum's constructor, a plugin's except clause):
        whatever is raised once the limit has passed counts as the timeout."""
        started = time.monotonic()
        try:
            # the memory limit outside the time limit: the timer is disarmed before the
            # budget is restored, so its signal cannot cut that short
            with memory_limit(self.options.max_memory), time_limit(self.timeout):
                return decode_image(data, pre, self.options, loaded)
        except MemoryError:
            budget = f"the {self.options.max_memory / 2**20:.0f} MiB max_decode_memory budget"
            raise ImageError(ErrorKind.TOO_LARGE, f"decoding needs more memory than {budget}") from None
        except Exception as exc:
            if (
                self.timeout
                and not isinstance(exc, DecodeTimeout)
                and time.monotonic() - started >= self.timeout
            ):
                raise DecodeTimeout(self.timeout) from None
            raise

    def read(self, uri: str) -> tuple[bytes | None, tuple[str, str] | None]:
        """The file's bytes, or (error kind, message): a read that failed for good is a row."""
        try:
            data = read_bytes(uri, self.storage_options, max_bytes=self.max_file_bytes + 1)
        except Exception as exc:
            kind = ErrorKind.NOT_FOUND if isinstance(exc, FileNotFoundError) else ErrorKind.READ_ERROR
            return None, (kind, f"{type(exc).__name__}: {exc}"[:500])
        return self._within_limit(data)

    def _within_limit(self, data: bytes) -> tuple[bytes | None, tuple[str, str] | None]:
        if len(data) > self.max_file_bytes:  # from a store, only the first max_file_bytes + 1 were read
            limit = f"the {self.max_file_bytes}-byte limit (max_file_bytes)"
            return None, (ErrorKind.TOO_LARGE, f"file is larger than {limit}")
        return data, None

    def __call__(self, batch: dict[str, np.ndarray], needed: list[np.ndarray] | None = None):
        """The batch decoded (the manifest's columns passed through). needed: per
        preprocessing, the rows to decode for it (None: all); a row no model of that
        preprocessing needs keeps its empty columns."""
        uris = [str(u) for u in batch["uri"]]
        return self._decoded(batch, uris, lambda i: self.read(uris[i]), needed)

    def decode_bytes(self, uris: Sequence[str], contents: Sequence[bytes]) -> dict[str, np.ndarray]:
        """Files already in memory, named by `uris` (tag-time calibration's edited copies,
        pipeline/job/edit_calibration.py): the same size limit, decode, limits and columns
        as files read from a store, so a copy is decoded exactly as the corpus was."""
        names = [str(u) for u in uris]
        return self._decoded(
            {"uri": np.asarray(names, object)}, names, lambda i: self._within_limit(contents[i])
        )

    def _decoded(self, batch, uris: list[str], read, needed: list[np.ndarray] | None = None):
        """Each row's bytes from read(i), decoded per preprocessing into the declared columns."""
        sizes = [(pre.height, pre.width) for pre in self.preprocesses]
        out = decoded_batch(len(uris), sizes)  # the declared columns
        for i in range(len(uris)):
            data, failure = read(i)
            for g in range(len(self.preprocesses)):
                if failure is not None:
                    out[geometry_column("error_kind", g)][i], out[geometry_column("error", g)][i] = failure
            if data is None:
                continue
            out["size"][i] = len(data)
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            loaded = Loaded(_meter, self._charge)  # shared by profiles whose draft is the same
            for g, pre in enumerate(self.preprocesses):
                if needed is None or needed[g][i]:
                    self._decode_into(out, i, g, data, pre, loaded)
        out["uri"] = np.asarray(uris, object)
        passed = {key: np.asarray(batch[key]) for key in batch if key not in out}  # the manifest's columns
        return {**passed, **out}

    def _charge(self, seconds: float, grown: int) -> None:
        """A profile takes a load an earlier profile of the same file paid for: the time
        and memory that load took come off this profile's limits, as if it had loaded."""
        if threading.current_thread() is not threading.main_thread():
            return
        if TIME_LIMIT_WORKS and self.timeout:
            remaining, interval = signal.getitimer(signal.ITIMER_REAL)
            if remaining > 0:
                if remaining - seconds <= 0:
                    raise DecodeTimeout(self.timeout)
                signal.setitimer(signal.ITIMER_REAL, remaining - seconds, interval)
        if MEMORY_LIMIT_WORKS and self.options.max_memory and grown:
            soft, hard = resource.getrlimit(resource.RLIMIT_AS)
            if soft != resource.RLIM_INFINITY:
                resource.setrlimit(resource.RLIMIT_AS, (max(soft - grown, address_space()), hard))

    def _decode_into(self, out, i: int, g: int, data: bytes, pre: Preprocess, loaded: Loaded) -> None:
        """Row i of geometry g's columns: the decoded image, or its error."""

        def column(name):
            return out[geometry_column(name, g)]

        try:
            decoded = self._decode(data, pre, loaded)
        except ImageError as exc:
            column("error_kind")[i], column("error")[i] = exc.kind, str(exc)[:500]
            column("width")[i], column("height")[i] = exc.size or (0, 0)  # what the file declares, if said
            return
        except Exception as exc:  # a decoder bug must not take the batch down
            column("error_kind")[i], column("error")[i] = (
                ErrorKind.DECODE_ERROR,
                f"{type(exc).__name__}: {exc}"[:500],
            )
            return
        column("pixels")[i] = decoded.pixels
        column("width")[i], column("height")[i] = decoded.width, decoded.height
        column("phash")[i] = decoded.phash
        column("phash_degenerate")[i] = unreliable(decoded.phash, decoded.phash_fragile_bits)
