"""Writing results safely.

* Output folders are checked before any work starts: one clear line when they cannot be written.
* ``results.jsonl`` is only ever appended to, one whole line at a time under an exclusive lock, so
  runs at the same time and runs one after another never lose or truncate each other's lines; it
  is opened without following a symbolic link.
* Inputs and their output names come from ``anoclip.runtime.inputs``.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from pathlib import Path

from .errors import AnoclipError

RESULTS = "results.jsonl"


def run_id() -> str:
    """Names one run in the lines it writes: UTC time and process id."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


class ResultsLog:
    """Appends JSON lines to ``folder/results.jsonl``.

    Each line is written whole while holding an exclusive ``flock`` on the file, or not at all: a
    write that fails part-way (a full disk) is truncated back to where the line began; a line left
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
            try:
                while view:
                    view = view[os.write(self.fd, view):]
            except OSError as exc:  # e.g. a full disk: the part written is taken back, the file ends in a whole line
                os.ftruncate(self.fd, size)
                raise AnoclipError(f"cannot append to {self.path}: {exc.strerror or exc}; the line was not written") from None
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return line

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "ResultsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
