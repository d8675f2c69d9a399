"""Plumbing every stage shares, imported from the runtime side (the export, calibration and
benchmark stages depend on the runtime, never the other way): logging set-up, commands that end in
one error line, atomic writes, the lock of a folder being written and output folders checked before
the work."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import click

from .errors import AnoclipError

log = logging.getLogger(__name__)


def configure_logging(verbose: bool = False) -> None:
    """Warnings from every library; info (or debug with ``verbose``) from anoclip itself."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("anoclip").setLevel(logging.DEBUG if verbose else logging.INFO)


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    """Raise the level of the named loggers ("" is the root logger) for the duration."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def run_guarded(command: click.Command) -> None:
    """Run a click command; a user error ends as one line on stderr and a nonzero exit."""
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AnoclipError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a file or folder the user named cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        click.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    else:
        sys.exit(0)


def given_command(ctx: click.Context, *prefix: str) -> str:
    """The command ``ctx`` runs as given: ``prefix`` then the options that differ from their defaults
    and the arguments, shell-quoted (for provenance records and manifest history)."""
    import shlex

    words = list(prefix)
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words += [str(item) for item in value or ()] if param.nargs != 1 else [str(value)]
            continue
        given = ctx.get_parameter_source(param.name) not in (click.core.ParameterSource.DEFAULT, None)
        if not isinstance(param, click.Option) or not given or value in (None, ()):
            continue
        if param.is_flag:
            words += [param.opts[0]] if value else param.secondary_opts[:1]
            continue
        for item in value if param.multiple else (value,):
            words += [param.opts[0], str(item)]
    return " ".join(shlex.quote(word) for word in words)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any exception (including KeyboardInterrupt) the temporary file is removed, so an
    interrupted write never leaves a half-written file under the final name. The rename replaces
    a symbolic link at ``path`` rather than writing through it. ``mode``: the file's permissions
    (default: ordinary ones, 0666 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    if mode is None:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # mkstemp makes 0600
    os.chmod(tmp, mode)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on the folder itself while writing into it (export, calibration);
    the kernel releases it if the process dies. ``wait``: seconds to wait for another holder."""
    import fcntl
    import time

    deadline = time.monotonic() + wait
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AnoclipError(f"another anoclip process is writing {folder}; wait for it to finish and run "
                                       "again") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def sync_folder(folder: str | os.PathLike) -> None:
    """Flush the folder's entries (renames) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_writable_folder(path: str | os.PathLike, option: str = "--out") -> bool:
    """Create ``path`` if needed and check that it can be written; True when it was created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AnoclipError(f"{option} {path} is a file, not a folder; choose a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AnoclipError(f"cannot create {option} {path}: {exc.strerror or exc}; choose a folder you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise AnoclipError(f"cannot write to {option} {path}: permission denied; choose a folder you can write")
    return created
