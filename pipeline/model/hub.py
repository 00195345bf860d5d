"""`tagpipe model pull`: a supported model family's files from the Hugging Face Hub.

The repository is read through huggingface_hub, which honours HF_ENDPOINT (a mirror, a
private hub) and HF_TOKEN. Which family a repository holds is read from its file list
(the same side files `load_bundle` detects a family by); a repository holding several
bundles in sub-folders needs `--subfolder`. Files go to a temporary folder beside the
target, the bundle is loaded and checked there (vocabulary against model), and only
then is the folder moved into place: a failed pull leaves nothing behind, and an
existing folder is never written into. `tagpipe_source.json` records the repository, the
revision asked for, the commit it resolved to, and each file's size and sha256.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import shutil
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from pydantic import Field

from pipeline.core.errors import TagpipeError
from pipeline.core.settings import KeyRole, Setting, SettingsModel
from pipeline.core.words import counted
from pipeline.model.bundle import LAYOUT_HINTS, file_sha256, load_bundle
from pipeline.storage.filesystem import staged_folder
from pipeline.storage.writable import check_writable

SOURCE_FILE = "tagpipe_source.json"
# Files a family's bundle may hold besides its model and vocabulary (taken when present).
EXTRA_FILES = (
    "model.onnx.data",
    "model_tag_metrics.npz",
    "model_ood_ref.npz",
    "model_metadata.json",
    "tagpipe_profile.toml",
)


@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    commit: str | None  # the Hub's revision sha
    directory: str
    profile: str
    files: list = field(default_factory=list)  # {"path", "size", "sha256"}

    def text(self) -> str:
        size = sum(f["size"] for f in self.files) / 2**20
        return (
            f"pulled {self.repo_id} at {(self.commit or '?')[:12]} ({self.profile}): "
            f"{counted(len(self.files), 'files')}, {size:.1f} MiB "
            f"-> {self.directory}"
        )


def _bundle_folders(files: list[str]) -> dict[str, str]:
    """{folder: profile} for every folder holding a family's vocabulary and an .onnx."""
    found = {}
    for path in files:
        folder, name = posixpath.split(path)
        for hint, profile in LAYOUT_HINTS:
            has_model = any(posixpath.dirname(p) == folder and p.endswith(".onnx") for p in files)
            if name == hint and has_model and folder not in found:
                found[folder] = profile
    return found


def _choose(files: list[str], subfolder: str | None, repo_id: str) -> tuple[str, str]:
    folders = _bundle_folders(files)
    if subfolder is not None:
        subfolder = subfolder.strip("/")
        if subfolder not in folders:
            raise TagpipeError(
                f"{repo_id}: no bundle in {subfolder or 'the top folder'}/ (bundles: {_listed(folders)})"
            )
        return subfolder, folders[subfolder]
    if len(folders) == 1:
        return next(iter(folders.items()))
    if not folders:
        hints = ", ".join(h for h, _ in LAYOUT_HINTS)
        raise TagpipeError(f"{repo_id}: no supported tagger found (an .onnx beside one of {hints})")
    raise TagpipeError(f"{repo_id}: several bundles ({_listed(folders)}); pass --subfolder")


def _listed(folders: dict[str, str]) -> str:
    return ", ".join(f"{folder or '.'} ({profile})" for folder, profile in sorted(folders.items())) or "none"


def _wanted(files: list[str], folder: str, vocabulary: str) -> list[str]:
    inside = [p for p in files if posixpath.dirname(p) == folder]
    names = {posixpath.basename(p) for p in inside}
    models = sorted(n for n in names if n.endswith(".onnx"))
    keep = {vocabulary, *models, *(n for n in EXTRA_FILES if n in names)}
    keep |= {
        n for n in names if any(n.startswith(m) and n.endswith(".data") for m in models)
    }  # external weights
    return [posixpath.join(folder, n) if folder else n for n in sorted(keep)]


def pull_model(
    repo_id: str, directory: str | Path, revision: str | None = None, subfolder: str | None = None
) -> PullResult:
    """The repository's bundle into `directory` (new or empty), checked before it lands."""
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise TagpipeError(f"{target} exists and is not empty: pull into a new folder")
    check_writable(str(target), "DIR")
    with _hub_reachable(repo_id):
        return _pull(repo_id, target, revision, subfolder)


@contextlib.contextmanager
def _hub_reachable(repo_id: str):
    """No Hub to reach (offline mode, a refused connection, a name that does not resolve,
    a timeout) is one line saying where tagpipe looked and the two ways round it: a mirror
    through HF_ENDPOINT, or a bundle folder copied by hand."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    by_hand = "or copy a bundle folder by hand (README, 'Model bundles and profiles') and pass it as --model"
    try:
        yield
    except OfflineModeIsEnabled:
        raise TagpipeError(
            f"{repo_id}: HF_HUB_OFFLINE is set, so the Hub cannot be asked: unset it, {by_hand}"
        ) from None
    except Exception as exc:
        reason = _unreachable(exc)
        if reason is None:
            raise
        raise TagpipeError(
            f"{repo_id}: cannot reach the Hub at {constants.ENDPOINT} ({reason}): set HF_ENDPOINT to a "
            f"mirror you can reach, {by_hand}"
        ) from None


def _unreachable(exc: BaseException) -> str | None:
    """The network's reason when exc (or what caused it) is a failure to reach a server,
    whichever HTTP client huggingface_hub uses; None for any other failure."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        name = type(seen).__name__
        if isinstance(seen, ConnectionError | TimeoutError) or any(
            word in name for word in ("Connect", "Timeout", "NetworkError", "NameResolution", "gaierror")
        ):
            return str(seen).splitlines()[0][:160] or name
        seen = seen.__cause__ or seen.__context__
    return None


def _pull(repo_id: str, target: Path, revision: str | None, subfolder: str | None) -> PullResult:
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except RevisionNotFoundError:
        raise TagpipeError(f"{repo_id}: no revision {revision!r}") from None
    except GatedRepoError:
        raise TagpipeError(
            f"{repo_id} is gated: accept its conditions on the Hub, then set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        where = constants.ENDPOINT
        raise TagpipeError(
            f"{repo_id}: no such model repository on {where} (a private one needs HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        raise TagpipeError(f"{repo_id}: {exc}".splitlines()[0]) from None
    files = [s.rfilename for s in info.siblings or []]
    folder, profile = _choose(files, subfolder, repo_id)
    vocabulary = next(h for h, p in LAYOUT_HINTS if p == profile)
    result = PullResult(repo_id, revision, info.sha, str(target), profile)
    with staged_folder(target) as staging:  # a failure leaves nothing; files 0644, folders 0755
        for path in _wanted(files, folder, vocabulary):
            local = Path(hf_hub_download(repo_id, path, revision=info.sha, local_dir=staging / ".download"))
            name = staging / posixpath.basename(path)
            shutil.move(str(local), name)
            result.files.append({"path": path, "size": name.stat().st_size, "sha256": file_sha256(name)})
        shutil.rmtree(staging / ".download", ignore_errors=True)
        record = {**asdict(result), "pulled_at": datetime.now(UTC).isoformat()}
        (staging / SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        result.profile = load_bundle(
            staging
        ).profile.name  # checks vocabulary against the model, before it lands
    return result


class PullSettings(SettingsModel):
    """What `tagpipe model pull` takes (its arguments and options come from these fields)."""

    repo_id: Annotated[
        str,
        Field(min_length=1, description="a Hugging Face model repository, e.g. SmilingWolf/wd-vit-tagger-v3"),
        Setting(KeyRole.NONE, argument=True, metavar="REPO_ID"),
    ]
    directory: Annotated[
        Path,
        Field(description="a new folder for the bundle"),
        Setting(KeyRole.NONE, argument=True, metavar="DIR"),
    ]
    revision: Annotated[
        str | None,
        Field(description="a branch, tag or commit"),
        Setting(KeyRole.NONE, default_text="the main branch"),
    ] = None
    subfolder: Annotated[
        str | None,
        Field(description="the bundle's folder, for repositories holding several"),
        Setting(KeyRole.NONE, default_text="the top"),
    ] = None
