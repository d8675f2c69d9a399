"""Checks and settings before PyTriton starts Triton: the stub's libpython, numpy, free ports."""

from __future__ import annotations

import os
import re
import socket
import sysconfig

import numpy as np

from anoclip.runtime.errors import AnoclipError


def use_own_libpython() -> None:
    """Make Triton's Python stub load this interpreter's libpython.

    PyTriton's stub for Python 3.11 links ``libpython3.11.so.1.0`` without a path; the dynamic
    loader then finds the distribution's copy (Debian's 3.11.2 under /usr/lib) before a pyenv or
    venv build of another 3.11 release. The stub then runs another interpreter than this one (it
    fails at start-up: either numpy is missing from that interpreter's paths, or this release's
    standard library meets the other release's C core). Putting the library folder of this
    interpreter first on LD_LIBRARY_PATH, which PyTriton passes on to the server and its stubs,
    makes the stub run the same interpreter as the server process.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    library = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if not libdir or not library or not os.path.exists(os.path.join(libdir, library)):
        return  # a static build: the stub finds whatever libpython the system has
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    if paths[:1] != [libdir]:
        os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + [p for p in paths if p != libdir])


def check_numpy() -> None:
    """PyTriton up to 0.7.0 requires numpy < 2: under numpy 2.4 its stub answered every output
    empty. Refuse to start rather than serve that."""
    from importlib.metadata import version

    pytriton = tuple(int(part) for part in re.findall(r"\d+", version("nvidia-pytriton"))[:3])
    if int(np.__version__.split(".")[0]) >= 2 and pytriton <= (0, 7, 0):
        raise AnoclipError(f"nvidia-pytriton {version('nvidia-pytriton')} needs numpy < 2 (it answers empty outputs "
                           f"with numpy {np.__version__}); install 'anoclip[serve]' into an environment of its own, "
                           "e.g. `python -m venv ~/anoclip-serve && ~/anoclip-serve/bin/pip install -e '.[serve]'`")


def check_ports_free(host: str, ports: list[int]) -> None:
    """Fail at once, naming the port, when one is taken (Triton itself would only time out)."""
    for port in ports:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise AnoclipError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another port "
                                   "(--http-port, --grpc-port, --metrics-port) or stop what uses it") from None
