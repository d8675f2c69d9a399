"""``anoclip serve`` as a child process, for the serve benchmark and the serving tests: started on
given (or free) loopback ports in a process group of its own, ready once it prints its URLs, stopped
with SIGTERM, or killed whole (Triton and its model stubs included) with SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from anoclip.runtime.errors import AnoclipError


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServeProcess:
    """``python -m anoclip serve --artifacts ARTIFACTS OPTIONS`` on 127.0.0.1; logs go to ``folder``."""

    def __init__(self, python: str | os.PathLike, artifacts: str | os.PathLike, folder: str | os.PathLike,
                 options: Sequence[str] = (), ports: Sequence[int] | None = None, env: dict | None = None):
        self.http_port, self.grpc_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"grpc://127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.command = [str(python), "-c", "from anoclip.runtime.cli import main; main()", "serve",
                        "--artifacts", str(artifacts), "--http-port", str(self.http_port), "--grpc-port",
                        str(self.grpc_port), "--metrics-port", str(self.metrics_port), *options]
        self.env = env  # the server's environment variables (default: this process's)
        folder = Path(folder)
        self.stdout_path, self.stderr_path = folder / f"serve-{self.http_port}.out", folder / f"serve-{self.http_port}.err"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "ServeProcess":
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                code = self.process.poll()
                self.kill()
                raise AnoclipError(f"`anoclip serve` did not come up ({'exit %s' % code if code is not None else 'timed out'}"
                                   f"): {self.log()[-1500:]}")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        """Every model loaded: the server prints its URLs once Triton answers."""
        return self.process is not None and self.http_url in self.stdout_path.read_text(errors="replace")

    def log(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, model: str) -> float:
        """A Prometheus counter of one model, e.g. ``nv_inference_exec_count`` (model runs)."""
        for line in self.metrics().splitlines():
            if line.startswith(name + "{") and f'model="{model}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AnoclipError(f"{name} of {model} is not in the metrics of {self.metrics_url}")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/live", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            return False

    def signal(self, sig: int, timeout: float = 60.0) -> int:
        """Send ``sig`` to the serve process alone and wait for it to exit; its return code."""
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean stop), then :meth:`kill` if it has not exited within ``timeout``."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole process group: the Python process, Triton and its model stubs; the
        shared-memory files they had mapped, which nothing else removes after SIGKILL, go too."""
        if self.process is None:
            return
        segments = self._shared_memory()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        for segment in segments:
            segment.unlink(missing_ok=True)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _shared_memory(self) -> set[Path]:
        """The /dev/shm files mapped by the processes of the server's group."""
        found = set()
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) != self.process.pid:
                    continue
                for line in (proc / "maps").read_text().splitlines():
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                        found.add(Path(fields[5].strip()))
            except (OSError, IndexError, ValueError):
                continue
        return found
