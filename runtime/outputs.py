"""Writing results safely.

* Output folders are checked before any work starts: one clear line when they cannot be written.
* ``results.jsonl`` is only ever appended to, one whole line at a time under an exclusive lock, so
  runs at the same time and runs one after another never lose or truncate each other's lines; it
  is opened without following a symbolic link.
* Images found under the inputs get output names that no other input shares, and a run never
  reads its own output folder back as input.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from collections import Counter
from pathlib import Path

from .errors import AnoclipError

RESULTS = "results.jsonl"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
MAX_KEY_BYTES = 160  # output names stay well below the 255-byte limit of file names


def run_id() -> str:
    """Names one run in the lines it writes: UTC time and process id."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


class ResultsLog:
    """Appends JSON lines to ``folder/results.jsonl``.

    Each line is written whole while holding an exclusive ``flock`` on the file; a line left
    unfinished by a killed run is closed first, so it cannot swallow the next one. The file is
    opened with ``O_NOFOLLOW``: a link in its place is an error, never a way out of the folder.
    """

    def __init__(self, folder: str | os.PathLike, name: str = RESULTS):
        self.path = Path(folder) / name
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AnoclipError(f"{self.path} is a symbolic link; results are not written through links, "
                                   "remove it or write elsewhere") from None
            raise AnoclipError(f"cannot write {self.path}: {exc.strerror or exc}; write elsewhere") from None
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise AnoclipError(f"{self.path} is not a regular file; remove it or write elsewhere")

    def append(self, record: dict) -> str:
        """Append ``record`` as one line (strict JSON: NaN and infinity are refused) and return it."""
        import fcntl

        try:
            line = json.dumps(record, allow_nan=False) + "\n"
        except ValueError:
            raise AnoclipError(f"the result for {record.get('source')} holds NaN or infinity; the model or its "
                               "artifacts are damaged, re-export them") from None
        data = line.encode()
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self.fd).st_size
            if size and os.pread(self.fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return line

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "ResultsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def discover_images(paths: tuple[str, ...] | list[str], exclude: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """(file, output key) for every image file given or found under a given folder.

    ``exclude``: the output folder; it is not searched (its overlays are images too), and it may
    not be one of the input folders. Keys are unique (case-insensitively): images that share a
    name stem take their suffix (``a.png`` -> ``a_png``, ``a.jpg`` -> ``a_jpg``), and any clash that
    remains gets a counter.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            found.append((path, path.stem))
            continue
        root = path.resolve()
        if skip is not None and root == skip:
            raise AnoclipError(f"--out {exclude} is the input folder {raw}; its overlays would be read as inputs on "
                               "the next run, choose another --out")
        for file in _walk(path, skip):
            key = str(file.relative_to(path).with_suffix("")).replace(os.sep, "__")
            found.append((file, f"{path.name}__{key}" if len(paths) > 1 else key))
    return _unique_keys(found)


def _walk(folder: Path, skip: Path | None) -> list[Path]:
    files = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if skip is None or Path(top, d).resolve() != skip)
        files += [Path(top, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and Path(top, n).is_file()]
    return sorted(files)


def _unique_keys(found: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    counts = Counter(key.casefold() for _, key in found)
    used: set[str] = set()
    unique = []
    for file, key in found:
        if counts[key.casefold()] > 1 and file.suffix:
            key = f"{key}_{file.suffix.lstrip('.').lower()}"
        if len(key.encode()) > MAX_KEY_BYTES:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            key = key.encode()[: MAX_KEY_BYTES - 11].decode(errors="ignore") + "_" + digest
        candidate, number = key, 1
        while candidate.casefold() in used:
            number += 1
            candidate = f"{key}_{number}"
        used.add(candidate.casefold())
        unique.append((file, candidate))
    return unique
