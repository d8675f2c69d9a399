"""Triton requests over several servers: round-robin, failover and backoff (tritonclient only)."""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import re
import threading
import time
from typing import Sequence
from urllib.parse import urlsplit

from anoclip.runtime.errors import AnoclipError

log = logging.getLogger(__name__)

# what Triton answers for a model it has not loaded (yet)
LOADING = re.compile(r"unknown model|is not found|not ready|UNAVAILABLE", re.IGNORECASE)


class ServersUnavailable(AnoclipError):
    """Every server failed a request (refused, timed out, unavailable): the servers are gone, and a
    run that depends on them ends (one line, exit 1) rather than failing frame after frame.
    ``loading``: a server answered that the model is not there yet (it is still loading it)."""

    def __init__(self, message: str, loading: bool = False):
        super().__init__(message)
        self.loading = loading


class Server:
    """One server: ``http://host:port`` (Triton's HTTP port) or ``grpc://host:port`` (its gRPC port)."""

    def __init__(self, url: str):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "grpc") or not parts.hostname or parts.port is None:
            raise AnoclipError(f"server URL {url!r} is not http://HOST:PORT or grpc://HOST:PORT")
        self.url, self.protocol = f"{parts.scheme}://{parts.netloc}", parts.scheme
        self.address = parts.netloc
        self.down_until = 0.0


class ServerPool:
    """Sends each request to the next server in turn; a server that fails (refused, timed out,
    unavailable, any error of Triton itself) is skipped for ``backoff`` seconds (tried again sooner
    only when every other one failed) and the request goes to the next one. Only when every server
    failed does the request fail. Thread-safe: each thread keeps its own tritonclient clients."""

    def __init__(self, urls: Sequence[str], timeout: float = 30.0, backoff: float = 10.0):
        if not urls:
            raise AnoclipError("no server URL given")
        self.servers = [Server(url) for url in urls]
        self.timeout, self.backoff = timeout, backoff
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._local = threading.local()  # tritonclient clients are not shared between threads

    def _order(self) -> list[Server]:
        start = next(self._turn) % len(self.servers)
        ring = self.servers[start:] + self.servers[:start]
        now = time.monotonic()
        with self._lock:
            up = [s for s in ring if s.down_until <= now]
            down = sorted((s for s in ring if s.down_until > now), key=lambda s: s.down_until)
        return up + down

    def call(self, model: str, inputs: list, outputs: Sequence[str], backoff: bool = True) -> dict:
        """Run ``model`` on ``inputs`` ([(name, array, Triton dtype)]); {output name: array}.
        ``backoff=False``: a failing server is not skipped afterwards (while waiting for servers to start)."""
        failures, loading = [], False
        for server in self._order():
            try:
                result = self._infer(server, model, inputs, outputs)
            except Exception as exc:  # the server, not the request: the next one may answer
                if backoff:
                    with self._lock:
                        server.down_until = time.monotonic() + self.backoff
                self._drop_client(server)
                failures.append(f"{server.url}: {_one_line(exc)}")
                loading = loading or bool(LOADING.search(str(exc)))
                log.log(_failure_level.get(), "server %s failed (%s); skipping it for %.0f s", server.url, _one_line(exc), self.backoff)
                continue
            with self._lock:
                server.down_until = 0.0
            return result
        raise ServersUnavailable(f"no server answered: {'; '.join(failures)}", loading)

    def _infer(self, server: Server, model: str, inputs: list, outputs: Sequence[str]) -> dict:
        if server.protocol == "http":
            import tritonclient.http as proto
        else:
            import tritonclient.grpc as proto
        tensors = []
        for name, data, dtype in inputs:
            tensor = proto.InferInput(name, list(data.shape), dtype)
            tensor.set_data_from_numpy(data, **({"binary_data": True} if server.protocol == "http" else {}))
            tensors.append(tensor)
        client = self._client(server, proto)
        if server.protocol == "http":
            requested = [proto.InferRequestedOutput(name, binary_data=True) for name in outputs]
            result = client.infer(model, tensors, outputs=requested)
        else:
            requested = [proto.InferRequestedOutput(name) for name in outputs]
            result = client.infer(model, tensors, outputs=requested, client_timeout=self.timeout)
        return {name: result.as_numpy(name) for name in outputs}

    def _client(self, server: Server, proto):
        clients = self._local.__dict__.setdefault("clients", {})
        if server.url not in clients:
            if server.protocol == "http":
                clients[server.url] = proto.InferenceServerClient(server.address, connection_timeout=self.timeout,
                                                                  network_timeout=self.timeout)
            else:
                clients[server.url] = proto.InferenceServerClient(server.address)
        return clients[server.url]

    def _drop_client(self, server: Server) -> None:
        client = self._local.__dict__.get("clients", {}).pop(server.url, None)
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass


_failure_level = contextvars.ContextVar("failure_level", default=logging.WARNING)


@contextlib.contextmanager
def quiet_failures():
    """Server failures are logged at DEBUG inside (expected while waiting for servers to start)."""
    token = _failure_level.set(logging.DEBUG)
    try:
        yield
    finally:
        _failure_level.reset(token)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
