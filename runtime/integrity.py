"""The artifact folder as a trust boundary.

* Every name the manifest gives resolves inside the folder: no absolute path, no ``..``, no
  symbolic link that leaves it (:func:`resolve_inside`).
* Every file that is loaded is hashed, the external-data files an ONNX graph refers to included
  (:func:`onnx_external_files` finds them without the ``onnx`` package).
* A file already verified is not hashed again while it is unchanged: a record in the user's cache
  folder maps each file's (device, inode, size, mtime, ctime) to the sha256 it had
  (:class:`VerificationRecord`). The ctime cannot be set back by a user, so a file rewritten and
  given its old mtime again still misses the record. The record is used only when the user owns it
  and nobody else can write it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from pathlib import Path, PurePosixPath

from .errors import ArtifactError
from .plumbing import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_ENV = "ANOCLIP_CACHE_DIR"
RECORD_NAME = "verified.json"
MAX_RECORD_ENTRIES = 256


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Names that stay inside the folder


def resolve_inside(folder: str | os.PathLike, name: object, what: str = "the manifest") -> Path:
    """The real path of ``name`` inside ``folder``; an ArtifactError for any name that leaves it."""
    folder = Path(folder)
    bad = not isinstance(name, str) or not name or "\\" in name or "\x00" in name
    pure = PurePosixPath(name) if not bad else None
    if bad or pure.is_absolute() or any(part in ("..", ".") for part in pure.parts) or name.endswith("/"):
        raise ArtifactError(
            f"{what} names {name!r}, which is not a file inside {folder}; an artifact folder may only refer to its "
            f"own files, re-export it with `anoclip-export --out {folder}`"
        )
    root = folder.resolve()
    path = (root / pure).resolve()
    if not path.is_relative_to(root):
        raise ArtifactError(
            f"{folder / name} is a link to {path}, outside the artifact folder; an artifact folder may only "
            f"refer to its own files, replace the link with the file itself"
        )
    return path


# ----------------------------------------------------------------------------------------------
# External data of ONNX graphs, read from the protobuf wire format
#
# Field numbers of onnx.proto that can hold a TensorProto, directly or through a subgraph or a
# function: ModelProto.graph 7 and .functions 25; GraphProto.node 1, .initializer 5,
# .sparse_initializer 15; NodeProto.attribute 5; AttributeProto.t 5, .g 6, .tensors 10, .graphs 11,
# .sparse_tensor 22, .sparse_tensors 23; FunctionProto.node 7, .attribute_proto 11;
# SparseTensorProto.values 1, .indices 2; TensorProto.external_data 13 (key 1, value 2).

_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}


def _varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, start, end) of every length-delimited field of one message; others skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise ValueError("field runs past its message")
            yield number, pos, pos + length
            pos += length
        else:
            raise ValueError(f"wire type {wire} is not used by ONNX")
    if pos != end:
        raise ValueError("message runs past its end")


def _locations(data, kind: str, start: int, end: int, depth: int, found: set[str]) -> None:
    if depth > 64:
        raise ValueError("graphs nested too deeply")
    if kind == "entry":
        fields = {n: bytes(data[s:e]) for n, s, e in _fields(data, start, end)}
        if fields.get(1) == b"location":
            found.add(fields.get(2, b"").decode("utf-8", "replace"))
        return
    children = _CHILDREN[kind]
    for number, s, e in _fields(data, start, end):
        child = children.get(number)
        if child is not None:
            _locations(data, child, s, e, depth + 1, found)


def onnx_external_files(path: str | os.PathLike) -> list[str]:
    """The ``location`` of every external-data tensor of the ONNX file at ``path``, as written."""
    path = Path(path)
    found: set[str] = set()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise ArtifactError(f"{path} is empty; re-export it")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                _locations(data, "model", 0, size, 0, found)
            except ValueError as exc:
                raise ArtifactError(f"{path} is not a readable ONNX file ({exc}); re-export it") from None
    return sorted(found)


# ----------------------------------------------------------------------------------------------
# Hashes, remembered while a file is unchanged


def _cache_folder() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "anoclip"


def _private(stat: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else (always true where there are no uids)."""
    if not hasattr(os, "getuid"):
        return True
    return stat.st_uid == os.getuid() and not stat.st_mode & 0o022


def _identity(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class VerificationRecord:
    """sha256 of files verified before, valid while their (device, inode, size, mtime, ctime) hold."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else _cache_folder()
        self.path = self.folder / RECORD_NAME
        self.entries = self._read()
        self.changed = False

    def _read(self) -> dict[str, dict]:
        try:
            if not (_private(os.stat(self.folder)) and _private(os.lstat(self.path))):
                log.warning("ignoring %s: it must belong to you and be writable by you only", self.path)
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def verified(self, path: Path, sha256: str) -> bool:
        entry = self.entries.get(str(path))
        try:
            return (isinstance(entry, dict) and entry.get("sha256") == sha256
                    and entry.get("stat") == _identity(os.stat(path)))
        except OSError:
            return False

    def remember(self, path: Path, sha256: str, stat: os.stat_result) -> None:
        self.entries.pop(str(path), None)
        self.entries[str(path)] = {"sha256": sha256, "stat": _identity(stat)}
        self.changed = True

    def save(self) -> None:
        """Write the record (newest entries kept); a cache that cannot be written only costs hashing."""
        if not self.changed:
            return
        entries = dict(list(self.entries.items())[-MAX_RECORD_ENTRIES:])
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(os.stat(self.folder)):
                return
            atomic_write_bytes(self.path, json.dumps(entries).encode(), mode=0o600)
        except OSError as exc:
            log.debug("verification record not saved: %s", exc)
        self.changed = False


def verify_file(path: Path, expected: str, record: VerificationRecord | None, shown: str) -> None:
    """Check ``path`` against ``expected``; skip hashing when the record says it is unchanged."""
    if record is not None and record.verified(path, expected):
        return
    before = os.stat(path)
    actual = sha256_file(path)
    if actual != expected:
        raise ArtifactError(
            f"{shown} does not match the sha256 in the manifest (it was changed or belongs to another export); "
            f"re-run `anoclip-export --out {Path(shown).parent}`"
        )
    if record is not None and _identity(before) == _identity(os.stat(path)):
        record.remember(path, actual, before)
