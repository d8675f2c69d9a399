"""What a server leaves behind when it is killed: PyTriton's shared memory in ``/dev/shm`` and its
workspace folder. ``anoclip serve`` sweeps both when it starts (what servers that are gone left) and
when it stops (its own).

* Workspaces: each server works in ``<PyTriton home>/anoclip-serve-<pid>-<random>`` (the home is
  ``$PYTRITON_HOME``, else ``$XDG_CACHE_HOME/pytriton``, else ``~/.cache/pytriton``); one whose pid
  is no longer running is removed.
* Triton's shared memory regions are named ``pytrtion<pid>-...`` (PyTriton's spelling) after the
  server's pid: removed when that pid is no longer running.
* PyTriton's tensor segments are ``psm_<random>`` (Python's ``multiprocessing.shared_memory``):
  removed when no running process has them open or mapped and they are older than 5 s (a
  segment being handed from one process to the next is mapped by one of them).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
WORKSPACE_PREFIX = "anoclip-serve-"
TRITON_SHM = re.compile(r"^pytrtion(\d+)-")
WORKSPACE = re.compile(rf"^{WORKSPACE_PREFIX}(\d+)-")
SEGMENT_MIN_AGE_S = 5.0


def pytriton_home() -> Path:
    home = os.environ.get("PYTRITON_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "pytriton")
    return Path(os.path.expanduser(os.path.expandvars(home)))


def new_workspace() -> Path:
    """A workspace path for this server (not created: PyTriton creates it)."""
    home = pytriton_home()
    home.mkdir(parents=True, exist_ok=True)
    return home / f"{WORKSPACE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use() -> set[str]:
    """Names of /dev/shm files that a running process has open or mapped."""
    names: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    names.add(target[len("/dev/shm/"):].split()[0])
        except OSError:  # the process ended, or is not ours to read
            continue
    return names


def sweep(own: Path | None = None, shm: Path = SHM, home: Path | None = None) -> dict[str, int]:
    """Remove what servers that are gone left (and ``own``, this server's workspace, when given);
    {"shm_files": n, "shm_bytes": b, "workspaces": n} removed."""
    removed = {"shm_files": 0, "shm_bytes": 0, "workspaces": 0}
    home = pytriton_home() if home is None else home
    if home.is_dir():
        for path in home.iterdir():
            match = WORKSPACE.match(path.name)
            if path == own or (match and not running(int(match.group(1)))):
                shutil.rmtree(path, ignore_errors=True)
                removed["workspaces"] += not path.exists()
    if shm.is_dir():
        in_use = None
        now = time.time()
        for path in shm.iterdir():
            match = TRITON_SHM.match(path.name)
            try:
                info = path.stat()
                if match:
                    stale = not running(int(match.group(1))) or (own is not None and int(match.group(1)) == os.getpid())
                elif path.name.startswith("psm_") and now - info.st_mtime > SEGMENT_MIN_AGE_S:
                    in_use = _in_use() if in_use is None else in_use
                    stale = path.name not in in_use
                else:
                    continue
                if stale:
                    path.unlink()
                    removed["shm_files"] += 1
                    removed["shm_bytes"] += info.st_blocks * 512
            except OSError:  # gone meanwhile, or not ours to remove
                continue
    if removed["shm_files"] or removed["workspaces"]:
        log.info("removed what stopped servers left: %d shared memory file(s) (%.1f MB), %d workspace(s)",
                 removed["shm_files"], removed["shm_bytes"] / 1e6, removed["workspaces"])
    return removed
