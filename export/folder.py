"""Writing an artifact folder so that it always loads.

One writer at a time (an export or a calibration) holds the folder's lock (runtime's
``plumbing.folder_lock``). New files are written in a staging folder inside
it, then moved in under content-addressed names (``visual.<sha>.onnx``) beside the files the current
manifest names, which are never overwritten. Replacing ``manifest.json`` is the one commit point: an
export killed at any moment leaves the folder loading with the manifest it had. Afterwards, and at
the start of the next export, files that no manifest names any more, staging folders and temporary
files of killed runs are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from anoclip.runtime.artifacts import MANIFEST, content_addressed
from anoclip.runtime.integrity import sha256_file
from anoclip.runtime.plumbing import sync_folder

log = logging.getLogger(__name__)

# Files a manifest owns: the graphs (the reduced-precision ones written by the calibration too),
# prompt weights and thresholds (written by the calibration), content-addressed or under format-1
# names. The manifest is the one list of those in use.
OWNED = re.compile(r"^((visual|visual_qkv|visual_int8|visual_fp16|tta|anoclip)(\.[0-9a-f]{12})?\.onnx"
                   r"|prompts(\.[0-9a-f]{12})?\.safetensors"
                   r"|thresholds(\.[0-9a-f]{12})?\.json)$")
STAGING_PREFIX = ".staging-"


@contextlib.contextmanager
def staging_folder(folder: Path) -> Iterator[Path]:
    """A fresh staging folder inside ``folder`` (same file system, so moves are renames)."""
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=folder) as staging:
        yield Path(staging)


def place(staging: Path, folder: Path) -> dict[str, tuple[str, str]]:
    """Move every staged file into ``folder`` under its content-addressed name.

    Returns staged name -> (final name, sha256). A file whose content is already there under that
    name is not moved again, so re-running an export changes nothing.
    """
    placed = {}
    for path in sorted(staging.iterdir()):
        sha = sha256_file(path)
        name = content_addressed(path.name, sha)
        target = folder / name
        if target.is_file() and not target.is_symlink() and sha256_file(target) == sha:
            path.unlink()
        else:
            os.replace(path, target)
        placed[path.name] = (name, sha)
    sync_folder(folder)
    return placed


def remove_unreferenced(folder: Path, keep: set[str]) -> list[str]:
    """Remove staging folders, temporary files and owned files that ``keep`` does not name.

    Call it while holding :func:`folder_lock`: then no other export is using them.
    """
    removed = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        stale_staging = name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink()
        stale_temp = name.startswith(".") and name.endswith(".tmp") and not entry.is_dir()
        unreferenced = OWNED.match(name) is not None and name not in keep and not entry.is_dir()
        if not (stale_staging or stale_temp or unreferenced):
            continue
        try:
            shutil.rmtree(entry) if stale_staging else entry.unlink()
        except OSError as exc:
            log.warning("could not remove %s: %s", entry, exc)
            continue
        removed.append(name)
    if removed:
        log.debug("removed from %s: %s", folder, ", ".join(removed))
    return removed


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()
