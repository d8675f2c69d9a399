"""Temporary folders of long runs outside the artifact folder (a calibration's models, a fused
graph being written), that no killed run leaves behind.

A workspace is ``<prefix><pid>-*`` in the system's temporary folder with an owner file the run
holds locked (``flock``) while it works: the kernel releases the lock when the process dies, so the
next run of any kind with the same prefix removes every workspace no live process owns. A run
removes its own on every way out (errors, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

OWNER_FILE = ".owner"  # locked by the run that works in the workspace; the kernel releases it when it dies
UNOWNED_AGE_S = 3600.0  # a workspace without an owner file (an older version's) is removed after this


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _orphaned(path: Path, prefix: str) -> bool:
    """True when no live process owns the workspace ``path`` (its owner file is not locked)."""
    import fcntl

    try:
        fd = os.open(path / OWNER_FILE, os.O_RDONLY)
    except FileNotFoundError:
        match = re.match(rf"{re.escape(prefix)}(\d+)-", path.name)
        if match:  # being created, or its owner died before it locked it
            return not _pid_alive(int(match.group(1)))
        return time.time() - path.stat().st_mtime > UNOWNED_AGE_S
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def sweep_owned(prefix: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the workspaces ``<prefix>*`` under ``root`` (the temporary folder) that no live process
    owns, left by killed runs; returns them."""
    removed = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob(f"{prefix}*")):
        try:
            if path.is_dir() and not path.is_symlink() and _orphaned(path, prefix):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    if removed:
        log.info("removed %d workspace(s) left by runs that were killed: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


@contextlib.contextmanager
def owned_workspace(prefix: str, redirect_tempfiles: bool = False) -> Iterator[Path]:
    """A locked temporary folder ``<prefix><pid>-*``, removed on every way out; orphaned ones of
    killed runs are swept first. ``redirect_tempfiles``: ``tempfile.tempdir`` points into it
    meanwhile (libraries' own temporary files, e.g. onnxruntime's, then go with it)."""
    import fcntl

    sweep_owned(prefix)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))
    previous = tempfile.tempdir
    fd = None
    try:
        fd = os.open(path / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if redirect_tempfiles:
            scratch = path / "tmp"
            scratch.mkdir()
            tempfile.tempdir = str(scratch)
        yield path
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            os.close(fd)
