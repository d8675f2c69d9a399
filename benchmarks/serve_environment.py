"""A Python environment that can run ``anoclip serve``, built from this source checkout, for the
serving tests and the serve benchmark.

PyTriton 0.7.0 requires numpy < 2 (and its Python stub returned empty outputs under numpy 2.4), while
the rest of the project is developed and tested with numpy 2 and OpenCV 5. So the server side gets a
virtual environment of its own: the same interpreter, this checkout installed editable with the
``serve`` extra (pip resolves numpy 1.x and OpenCV 4.x there). Clients stay in the main environment.

    python -m anoclip.benchmarks.serve_environment     # builds it once, prints its python

The environment lives under ``$ANOCLIP_SERVE_ENV`` (default ``~/.cache/anoclip/serve-env``), one per
interpreter and install settings of setup.cfg, and is reused until either changes (environments
unused for a week are removed when another is built).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from anoclip.runtime.errors import AnoclipError

READY = "anoclip-serve-env-ready"


def checkout_root() -> Path:
    """The source checkout this package runs from (an editable install)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "setup.cfg").is_file() or not (root / "runtime" / "serving").is_dir():
        raise AnoclipError("anoclip is not running from a source checkout; install 'anoclip[serve]' into an "
                           "environment of its own and run `anoclip serve` from there")
    return root


def environment_folder(python: str = sys.executable, cache: str | os.PathLike | None = None) -> Path:
    root = checkout_root()
    cache = Path(cache or os.environ.get("ANOCLIP_SERVE_ENV") or Path.home() / ".cache" / "anoclip" / "serve-env")
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True,
                             text=True, check=True).stdout.strip()
    # the checkout is part of the key: the environment's editable install serves that checkout's code,
    # so another checkout (a clone, a worktree) must not reuse it
    key = hashlib.sha256((_install_settings(root) + os.path.realpath(python) + str(root.resolve())).encode()
                         ).hexdigest()[:12]
    return cache / f"py{version}-{key}"


def _install_settings(root: Path) -> str:
    """What an editable install with the serve extra depends on in setup.cfg (other edits, such as
    another extra, keep the environment)."""
    import configparser

    config = configparser.ConfigParser(interpolation=None)
    config.read(root / "setup.cfg")
    options = config["options"] if config.has_section("options") else {}
    parts = [options.get(key, "") for key in ("python_requires", "packages", "package_dir", "install_requires")]
    parts.append(config.get("options.extras_require", "serve", fallback=""))
    parts.append(config.get("options.entry_points", "anoclip.commands", fallback=""))
    return "\n".join(parts)


def _remove_stale(folder: Path, days: float = 7.0) -> None:
    """Other environments of the cache unused for ``days`` (each holds some 600 MB)."""
    for other in folder.parent.glob("py*-*"):
        stamp = other / READY
        if other != folder and (not stamp.exists() or time.time() - stamp.stat().st_mtime > days * 86400):
            shutil.rmtree(other, ignore_errors=True)


def server_python(python: str = sys.executable, cache: str | os.PathLike | None = None, quiet: bool = True) -> Path:
    """The python of a virtual environment with this checkout and the ``serve`` extra; built on
    first use (about 30 s with a package index at hand), reused afterwards."""
    folder = environment_folder(python, cache)
    executable = folder / "bin" / "python"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait and reuse it
        if (folder / READY).is_file():
            (folder / READY).touch()  # in use: kept by _remove_stale
            return executable
        _remove_stale(folder)
        shutil.rmtree(folder, ignore_errors=True)  # a build that was interrupted
        steps = [[python, "-m", "venv", str(folder)],
                 [str(executable), "-m", "pip", "install", *(["-q"] if quiet else []), "--disable-pip-version-check",
                  "-e", f"{checkout_root()}[serve]"]]
        for step in steps:
            done = subprocess.run(step, capture_output=quiet, text=True)
            if done.returncode != 0:
                tail = (done.stderr or "").strip().splitlines()[-3:] if quiet else []
                raise AnoclipError(f"could not build the server environment in {folder} (`{' '.join(step)}` failed"
                                   f"{': ' + ' | '.join(tail) if tail else ''}); check that pip reaches a package index")
        (folder / READY).write_text(" ".join(sys.argv) + "\n")
    return executable


if __name__ == "__main__":
    print(server_python(quiet=False))
